"""Node kinds: fans (one module each; see nodes/registry.py)."""
