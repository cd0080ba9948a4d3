"""Target service: runs the target model, verifies draft trees, and holds per-session KV caches."""
