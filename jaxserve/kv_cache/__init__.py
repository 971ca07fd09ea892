"""Paged KV cache storage (and, with the engine, the block pool and its manager)."""
