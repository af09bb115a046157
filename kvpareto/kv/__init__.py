"""KV caches: the cache contract, one registry of schemes, and their implementations."""
