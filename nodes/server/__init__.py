"""asyncio around the sans-IO protocol core: listeners, sessions, streams, the node runtime."""
