"""Allocation of the paged KV cache: one `(k, v)` pair of [P, B, K, H] arrays per layer.

NOTE: page 0 is the null page (see jaxserve/attention/metadata.py); usable pages are 1..P-1.
The arrays are created inside `jit` so they are born on the device (and, with a mesh, born sharded).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig

KVCache = list[tuple[jax.Array, jax.Array]]


def kv_cache_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> int:
    return num_pages * page_size * cfg.kv_bytes_per_token(jnp.dtype(dtype).itemsize)


def allocate_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, dtype,
                      sharding: jax.sharding.Sharding | None = None) -> KVCache:
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)

    def make():
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]

    if sharding is None:
        return jax.jit(make)()
    out = [(sharding, sharding) for _ in range(cfg.num_layers)]
    return jax.jit(make, out_shardings=out)()
