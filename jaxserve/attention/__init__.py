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
import jax.numpy as jnp

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


class PallasBackend:
    """GPU kernels where they exist: the Pallas paged decode kernel when every sequence in the step
    feeds exactly one token (decided on device with `lax.cond`), the jnp blockwise attention for
    steps with prefill chunks. K/V are written with a donated scatter. On CPU the kernel runs in
    Pallas interpret mode (slow; for tests)."""

    name = "pallas"

    def __init__(self, interpret: bool | None = None):
        self.interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
        self.device_kind = jax.devices()[0].device_kind

    def __call__(self, q, k, v, cache, meta, positions, spec):
        from pallas_kernels.paged_decode import paged_decode_attention
        from pallas_kernels.tuning import decode_params

        k_cache, v_cache = write_kv_reference(cache[0], cache[1], k, v, meta.slot_mapping)
        t, n, h = q.shape
        s_, m = meta.block_tables.shape
        splits, ppb, warps, stages = decode_params(self.device_kind, s_, n, k_cache.shape[2], h,
                                                   k_cache.shape[1], m)
        starts = meta.query_start_loc[:-1]
        all_decode = jnp.all(meta.query_start_loc[1:] - starts <= 1)

        def decode(q):
            o = paged_decode_attention(q[jnp.minimum(starts, t - 1)], k_cache, v_cache,
                                       meta.block_tables, meta.seq_lens, scale=spec.scale,
                                       splits=splits, pages_per_block=ppb,
                                       sliding_window=spec.sliding_window, soft_cap=spec.soft_cap,
                                       num_warps=warps, num_stages=stages, interpret=self.interpret)
            has_token = meta.query_start_loc[1:] > starts
            rows = jnp.where(has_token, starts, t)            # padded sequences write nowhere
            return jnp.zeros_like(q).at[rows].set(o, mode="drop")

        def ragged(q):
            return paged_attention_blockwise(q, k_cache, v_cache, meta, positions, spec)

        out = jax.lax.cond(all_decode, decode, ragged, q)
        return out, (k_cache, v_cache)


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"reference": ReferenceBackend,
                                                        "gather": GatherBackend,
                                                        "pallas": PallasBackend}


def get_backend(name: str = "auto") -> AttentionBackend:
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" else "reference"
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


__all__ = ["AttentionBackend", "AttentionMetadata", "AttentionSpec", "GatherBackend", "LayerCache",
           "ReferenceBackend",
           "build_metadata", "get_backend", "paged_attention_blockwise", "paged_attention_reference",
           "write_kv_reference"]
