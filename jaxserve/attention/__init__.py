"""Attention backends: how a layer writes its new K/V into the paged cache and attends over it.

A backend is a callable
    backend(q [T,N,H], k [T,K,H], v [T,K,H], layer_cache (k_cache, v_cache), meta, positions, spec)
        -> (out [T,N,H], new layer_cache)
so a kernel may fuse the cache write with attention. Models only ever call this interface; the
runner chooses the implementation ("reference" everywhere, GPU kernels where available).
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax

from jaxserve.attention.metadata import AttentionMetadata, AttentionSpec, build_metadata
from jaxserve.attention.reference import (paged_attention_blockwise, paged_attention_reference,
                                         write_kv_reference)

LayerCache = tuple[jax.Array, jax.Array]


class AttentionBackend(Protocol):
    name: str

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache,
                 meta: AttentionMetadata, positions: jax.Array,
                 spec: AttentionSpec) -> tuple[jax.Array, LayerCache]: ...


class ReferenceBackend:
    """Pure jnp: scatter K/V into the cache, then a blockwise online-softmax over the pages
    (`paged_attention_blockwise`, tested equal to the plain gather `paged_attention_reference`)."""

    name = "reference"

    def __call__(self, q, k, v, cache, meta, positions, spec):
        k_cache, v_cache = write_kv_reference(cache[0], cache[1], k, v, meta.slot_mapping)
        out = paged_attention_blockwise(q, k_cache, v_cache, meta, positions, spec)
        return out, (k_cache, v_cache)


class GatherBackend:
    """The plain gather reference: slower, but differentiable (no while_loop), for grads."""

    name = "gather"

    def __call__(self, q, k, v, cache, meta, positions, spec):
        k_cache, v_cache = write_kv_reference(cache[0], cache[1], k, v, meta.slot_mapping)
        out = paged_attention_reference(q, k_cache, v_cache, meta, positions, spec)
        return out, (k_cache, v_cache)


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"reference": ReferenceBackend,
                                                        "gather": GatherBackend}


def get_backend(name: str = "auto") -> AttentionBackend:
    if name == "auto":
        name = "reference"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionSpec", "GatherBackend", "LayerCache",
           "ReferenceBackend",
           "build_metadata", "get_backend", "paged_attention_blockwise", "paged_attention_reference",
           "write_kv_reference"]
