"""Attention backends: how a layer writes its new K/V into the paged cache and attends over it.

A backend is a callable
    backend(q [T,N,H], k [T,K,H], v [T,K,H], layer_cache (k_cache, v_cache), meta, positions, spec)
        -> (out [T,N,H], new layer_cache)
so a kernel may fuse the cache write with attention. A backend may also offer
    backend.attend_qkv(qkv [T,K,G+2,H], layer_cache, meta, positions, spec) -> (out, new layer_cache)
taking the layer's fused rows as they come out of the projection (per kv head: G query heads, the
key, the value; RoPE applied), which models prefer when present: the decode kernel then reads its
queries and writes the new key/value without any XLA slicing or scatter in between. Models only
ever call this interface; the runner chooses the implementation ("reference" everywhere, GPU
kernels where available).
"""

from __future__ import annotations

import os
from typing import Callable, Protocol

import jax

from jaxserve.attention.metadata import AttentionMetadata, AttentionSpec, build_metadata
from jaxserve.attention.reference import (paged_attention_blockwise, paged_attention_reference,
                                         write_kv_reference)

LayerCache = tuple[jax.Array, jax.Array]


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[T, K, G+2, H] fused rows -> q [T, N, H] (head n = k*G + g), k [T, K, H], v [T, K, H]."""
    t, _, c, h = qkv.shape
    g = c - 2
    return qkv[:, :, :g].reshape(t, -1, h), qkv[:, :, g], qkv[:, :, g + 1]


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
    """The Pallas GPU kernels. The runner compiles two variants of every step: a decode variant
    (`decode_only=True`, used when every sequence feeds exactly one token) that calls the paged
    decode kernel (split-K over pages), and the general variant that calls a ragged paged
    prefill kernel for steps with prefill chunks (decodes mixed in): the Mosaic GPU one (TMA +
    wgmma) on Hopper where it applies, the Triton-lowered one otherwise. Choosing on the host keeps
    data-dependent control flow out of the compiled step. Decode steps write K/V inside the decode
    kernel (`attend_qkv`); steps with prefill use a donated scatter. On CPU the kernel runs in Pallas
    interpret mode (slow; for tests). Under tensor parallelism the runner calls the backend per
    shard (inside shard_map), so it only ever sees local heads."""

    name = "pallas"

    def __init__(self, interpret: bool | None = None, decode_only: bool = False):
        self.interpret = (jax.default_backend() != "gpu") if interpret is None else interpret
        self.decode_only = decode_only
        self.device_kind = jax.devices()[0].device_kind
        if decode_only and _fused_decode_enabled():
            # the decode variant takes the fused rows and writes K/V inside the kernel; the
            # general variant (prefill chunks) keeps the XLA scatter before the prefill kernel
            self.attend_qkv = self._attend_qkv_decode

    def _mgpu_prefill_params(self, q, k_cache, spec) -> tuple[int, int, bool] | None:
        """(block_kv, stages, pingpong) when steps with prefill chunks run the Mosaic GPU kernel
        (TMA + wgmma): Hopper GPUs, for the configurations it covers (bf16/fp16, head_dim 64/128,
        no window or soft-cap); None: the Triton-lowered kernel (JAXSERVE_PREFILL_KERNEL=triton
        forces it)."""
        if self.interpret or _prefill_kernel_choice() == "triton":
            return None
        from pallas_kernels.tuning import mgpu_prefill_choice

        return mgpu_prefill_choice(self.device_kind, q.dtype, q.shape[1], k_cache.shape[2],
                                   q.shape[2], k_cache.shape[1], spec.sliding_window,
                                   spec.soft_cap, kv_dtype=k_cache.dtype)

    def decode_variant(self) -> "PallasBackend":
        return PallasBackend(self.interpret, decode_only=True)

    def _attend_qkv_decode(self, qkv, cache, meta, positions, spec):
        """Decode step with the KV write fused into the kernel (paged_decode_fused)."""
        from pallas_kernels.paged_decode import paged_decode_fused
        from pallas_kernels.tuning import decode_params

        s_, m = meta.block_tables.shape
        k_heads, c = qkv.shape[1], qkv.shape[2]
        splits, ppb, warps, stages = decode_params(self.device_kind, s_, k_heads * (c - 2), k_heads,
                                                   qkv.shape[3], cache[0].shape[1], m)
        out, k_cache, v_cache = paged_decode_fused(
            qkv, cache[0], cache[1], meta.block_tables, meta.seq_lens, scale=spec.scale,
            splits=splits, pages_per_block=ppb, sliding_window=spec.sliding_window,
            soft_cap=spec.soft_cap, num_warps=warps, num_stages=stages, interpret=self.interpret)
        return out, (k_cache, v_cache)

    def __call__(self, q, k, v, cache, meta, positions, spec):
        k_cache, v_cache = write_kv_reference(cache[0], cache[1], k, v, meta.slot_mapping)
        if not self.decode_only:
            mgpu = self._mgpu_prefill_params(q, k_cache, spec)
            if mgpu is not None:
                from pallas_kernels.paged_prefill_mgpu import paged_prefill_attention_mgpu

                block_kv, stages, pingpong = mgpu
                out = paged_prefill_attention_mgpu(
                    q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                    scale=spec.scale, block_kv=block_kv, stages=stages, pingpong=pingpong)
                return out, (k_cache, v_cache)
            from pallas_kernels.paged_prefill import paged_prefill_attention
            from pallas_kernels.tuning import prefill_params

            block_q, ppb, warps, stages = prefill_params(
                self.device_kind, q.shape[1] // k_cache.shape[2], q.shape[2], k_cache.shape[1])
            out = paged_prefill_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                scale=spec.scale, block_q=block_q, pages_per_block=ppb,
                sliding_window=spec.sliding_window, soft_cap=spec.soft_cap, num_warps=warps,
                num_stages=stages, interpret=self.interpret)
            return out, (k_cache, v_cache)
        from pallas_kernels.paged_decode import paged_decode_attention
        from pallas_kernels.tuning import decode_params

        # NOTE: decode steps have T == S and token i belongs to sequence i (padding: seq_len 0).
        s_, m = meta.block_tables.shape
        splits, ppb, warps, stages = decode_params(self.device_kind, s_, q.shape[1], k_cache.shape[2],
                                                   q.shape[2], k_cache.shape[1], m)
        out = paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                     scale=spec.scale, splits=splits, pages_per_block=ppb,
                                     sliding_window=spec.sliding_window, soft_cap=spec.soft_cap,
                                     num_warps=warps, num_stages=stages, interpret=self.interpret)
        return out, (k_cache, v_cache)


def _prefill_kernel_choice() -> str:
    """JAXSERVE_PREFILL_KERNEL=triton keeps steps with prefill chunks on the Triton-lowered kernel
    on Hopper too (comparisons); unset or `mosaic`: the Mosaic GPU kernel where it applies."""
    choice = os.environ.get("JAXSERVE_PREFILL_KERNEL", "mosaic").lower()
    if choice not in ("mosaic", "triton"):
        raise ValueError(f"JAXSERVE_PREFILL_KERNEL must be 'mosaic' or 'triton', got {choice!r}")
    return choice


def _fused_decode_enabled() -> bool:
    """JAXSERVE_FUSED_DECODE=0 keeps the XLA scatter before the decode kernel (for comparisons)."""
    return os.environ.get("JAXSERVE_FUSED_DECODE", "1") != "0"


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
           "PallasBackend",
           "ReferenceBackend",
           "build_metadata", "get_backend", "paged_attention_blockwise", "paged_attention_reference",
           "split_qkv", "write_kv_reference"]
