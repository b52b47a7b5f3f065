"""Node kinds: filters (one module each; see nodes/registry.py)."""
