"""Node kinds: plugins (one module each; see nodes/registry.py)."""
