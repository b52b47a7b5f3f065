"""Where nodes run: local processes (process.py), the embedded default."""
