"""Building blocks shared by the decoder-only families (Llama, Mistral, Qwen2, Qwen3).

Activations are flat ragged tokens: `x` is [T, D] for T tokens of any number of sequences, with an
explicit `positions` [T]. Attention goes through an `AttentionBackend` over the paged KV cache, so the
same forward serves a single-sequence generate, the engine's mixed prefill/decode steps and a user's
own `jax.jit`. Einsum letters are listed in docs/GLOSSARY.md.

Weights keep an explicit head layout (fused q/k/v [D, K, G+2, H], o [N, H, D]) so sharding rules
can name the head axis; the loaders convert and fuse Hugging Face's [out, in] matrices once at load
time (`hf_weight_map`).

Tensor parallelism (Megatron style): called inside `jax.shard_map` with `tp` set (a
`jaxserve.collectives.TensorParallel`), every module sees its local shard of the weights and adds
the collectives itself: an all-reduce (`tp.psum`) after the row-parallel o and down projections, a
masked lookup + all-reduce for a vocab-split embedding, an all-gather of vocab-split logits
(`compute_logits`; greedy decode steps take the shard's own slice, `compute_local_logits`).
Whether a weight is split is read from its local shape, so the same code runs unsplit (tp=None, or
a dimension the rules replicate).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.attention import (AttentionBackend, AttentionMetadata, AttentionSpec, LayerCache,
                                split_qkv)
from jaxserve.collectives import TensorParallel
from jaxserve.config import ModelConfig, RopeConfig

Array = jax.Array


def _psum_if(x: Array, split: bool, tp: TensorParallel | None) -> Array:
    return tp.psum(x) if (tp is not None and split) else x


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: Array) -> Array:  # [..., D] -> [..., D]
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * xf.astype(x.dtype)

    def add_norm(self, h: Array, residual: Array) -> tuple[Array, Array]:
        """Pre-norm residual step: s = h + residual; returns (norm(s), s). [T, D] each. On GPUs
        one Pallas kernel instead of XLA's add, reduce and scale (JAXSERVE_FUSED_NORM)."""
        if _fused_norm():
            from pallas_kernels.rms_norm import add_rms_norm
            return add_rms_norm(h, residual, self.scale[...], eps=self.eps,
                                interpret=jax.default_backend() != "gpu")
        s = h + residual
        return self(s), s


def _kernel_switch(var: str) -> str:
    """A kernel's environment switch, read when a layer is traced (so a per-process setting):
    unset = "default" on GPUs and "off" elsewhere; "1" = "on" (the kernel wherever it fits,
    interpret mode off GPU, for tests); anything else = "off" (XLA's ops)."""
    flag = os.environ.get(var)
    if flag is None:
        return "default" if jax.default_backend() == "gpu" else "off"
    return "on" if flag == "1" else "off"


def _fused_norm() -> bool:
    """The fused residual-add + RMSNorm kernel (JAXSERVE_FUSED_NORM): on by default on GPUs (an
    H200 decode step 2% faster on one GPU, 2.5-7% under tp=2, docs/benchmarks/2026-11-to-12.md)."""
    return _kernel_switch("JAXSERVE_FUSED_NORM") != "off"


def _skinny_params(x: Array, w: Array) -> tuple[int, int, int, int, int] | None:
    """The skinny-matmul kernel's launch parameters for x @ w where it is to run, else None.
    JAXSERVE_SKINNY_MATMUL (`_kernel_switch`): by default on GPUs wherever its table
    (pallas_kernels/tuning.py) lists the card and shape (measured faster than XLA's GEMM there);
    =1 every shape it takes, table or not."""
    mode = _kernel_switch("JAXSERVE_SKINNY_MATMUL")
    if mode == "off":
        return None
    from pallas_kernels.tuning import matmul_params
    (t, k), n = x.shape, w.shape[1]
    return matmul_params(jax.devices()[0].device_kind, t, k, n, tuned_only=mode == "default",
                         dtype=x.dtype)


def project(x: Array, w: Array, *, glu: bool = False) -> Array:
    """x [T, K] @ w [K, N] -> [T, N] in x's dtype (fp32 accumulation), the weight projections'
    one matmul: XLA's GEMM, or at decode row counts (T <= 64) the weight-streaming kernel of
    `pallas_kernels.skinny_matmul` (JAXSERVE_SKINNY_MATMUL). glu: w is the fused gate/up [K, 2F]
    and the result silu(gate) * up [T, F] (in the kernel's epilogue when it takes the shape in
    one split and JAXSERVE_SKINNY_GLU is not 0; else XLA's activation after the product)."""
    params = _skinny_params(x, w)
    if params is not None:
        from pallas_kernels import skinny_matmul as sk
        bn, bk, splits, warps, stages = params
        fused = (glu and os.environ.get("JAXSERVE_SKINNY_GLU") != "0"
                 and sk.supports(*x.shape, w.shape[1], block_n=bn, block_k=bk, splits=splits,
                                 dtype=x.dtype, glu=True))
        y = sk.skinny_matmul(x, w, block_n=bn, block_k=bk, splits=splits, num_warps=warps,
                             num_stages=stages, glu=fused, interpret=jax.default_backend() != "gpu")
        if fused or not glu:
            return y
    else:
        y = jnp.dot(x, w)   # (XLA accumulates bf16 products in fp32 and rounds once, as the kernel)
    if not glu:
        return y
    gate, up = jnp.split(y, 2, axis=1)
    return jax.nn.silu(gate) * up


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """Inverse frequencies [H/2] (float32), with the rope scaling of the config applied."""
    inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    if rope.rope_type == "linear":
        inv = inv / rope.factor
    elif rope.rope_type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotate-half RoPE (the HF/NeoX layout). x [T, N, H], positions [T], inv_freq [H/2]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]   # [T, H/2]
    cos = jnp.cos(freqs)[:, None, :].astype(x.dtype)                       # [T, 1, H/2]
    sin = jnp.sin(freqs)[:, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    """Self-attention with one fused q/k/v weight.

    `wqkv` is [D, K, G+2, H] (DKCH): for each kv head, its G = N/K query heads, then its key and its
    value head. One projection instead of three (the small k/v GEMVs alone ran far below the memory
    bandwidth), and a tp split over K keeps each shard's q heads with their kv head.
    """

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = n // k
        self.wqkv = nnx.Param(_normal(rngs, (d, k, g + 2, h), dtype))   # DKCH
        self.wo = nnx.Param(_normal(rngs, (n, h, d), dtype))             # NHD
        self.qkv_bias = cfg.qkv_bias
        if cfg.qkv_bias:
            self.bqkv = nnx.Param(jnp.zeros((k, g + 2, h), dtype))       # KCH
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype)
        self.rope = cfg.rope        # static: inverse frequencies are compile-time constants
        self.head_dim = h
        self.num_heads = n
        self.spec = AttentionSpec(scale=h ** -0.5, sliding_window=cfg.sliding_window)

    def __call__(self, x: Array, positions: Array, cache: LayerCache, meta: AttentionMetadata,
                 backend: AttentionBackend, tp: TensorParallel | None = None
                 ) -> tuple[Array, LayerCache]:
        wqkv = self.wqkv[...]
        qkv = project(x, wqkv.reshape(wqkv.shape[0], -1)).reshape(x.shape[0], *wqkv.shape[1:])
        if self.qkv_bias:
            qkv = qkv + self.bqkv[...]
        qkv = self._norm_rope(qkv, positions)
        attend_qkv = getattr(backend, "attend_qkv", None)
        if attend_qkv is not None:   # the backend takes the fused rows (e.g. to fuse the KV write)
            out, cache = attend_qkv(qkv, cache, meta, positions, self.spec)
        else:
            out, cache = backend(*split_qkv(qkv), cache, meta, positions, self.spec)   # [T, N, H]
        wo = self.wo[...]
        y = project(out.reshape(out.shape[0], -1), wo.reshape(-1, wo.shape[-1]))   # TNH,NHD->TD
        return _psum_if(y, self.wo[...].shape[0] < self.num_heads, tp), cache


    def _norm_rope(self, qkv: Array, positions: Array) -> Array:
        """q/k norms (Qwen3) and RoPE on the query and key rows of [T, K, G+2, H]; value rows pass
        through. One elementwise pass over the fused rows (XLA makes it one fusion)."""
        t, kh, c, h = qkv.shape
        g = c - 2
        if self.qk_norm:
            qkv = jnp.concatenate([self.q_norm(qkv[:, :, :g]), self.k_norm(qkv[:, :, g:g + 1]),
                                   qkv[:, :, g + 1:]], axis=2)
        inv_freq = jnp.asarray(rope_inv_freq(self.head_dim, self.rope))
        roped = apply_rope(qkv.reshape(t, kh * c, h), positions, inv_freq).reshape(qkv.shape)
        is_v = (jnp.arange(c) == g + 1)[None, None, :, None]
        return jnp.where(is_v, qkv, roped)


class MLP(nnx.Module):
    """SwiGLU with one fused gate/up weight `w_gate_up` [D, 2, F] (index 0 gate, 1 up)."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.w_gate_up = nnx.Param(_normal(rngs, (d, 2, f), dtype))  # DCF
        self.w_down = nnx.Param(_normal(rngs, (f, d), dtype))        # FD
        self.intermediate_size = f

    def __call__(self, x: Array, tp: TensorParallel | None = None) -> Array:  # [T, D] -> [T, D]
        w = self.w_gate_up[...]
        act = project(x, w.reshape(w.shape[0], -1), glu=True)   # silu(TD,DF->TF) * (TD,DF->TF)
        y = project(act, self.w_down[...])                      # TF,FD->TD
        return _psum_if(y, self.w_down[...].shape[0] < self.intermediate_size, tp)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, h, residual, positions, cache, meta, backend, tp=None):
        """h: the previous block's output, residual: the stream before it ([T, D] each). Returns
        this layer's MLP output and the residual stream before it: the add is done by the next
        norm (`add_norm`), so it fuses with it."""
        x, residual = self.input_norm.add_norm(h, residual)
        a, cache = self.attn(x, positions, cache, meta, backend, tp)
        x, residual = self.post_attn_norm.add_norm(a, residual)
        return self.mlp(x, tp), residual, cache


@functools.partial(jax.jit, static_argnums=(0, 7))
def _run_layer(graphdef, state, h, residual, positions, cache, meta, backend, tp):
    # NOTE: every layer has the same structure and shapes, so this is traced and lowered once per
    # step shape and called L times (XLA inlines the calls): start-up traces one layer, not L.
    return nnx.merge(graphdef, state)(h, residual, positions, cache, meta, backend, tp)


class CausalLM(nnx.Module):
    """A decoder-only transformer over flat ragged tokens and a paged KV cache.

    `__call__` returns final hidden states [T, D] for every token; `compute_logits` projects only the
    rows the caller selects, so the engine pays for the LM head only where it samples.
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.bfloat16, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))  # VD
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), dtype))  # VD

    def __call__(
        self,
        input_ids: Array,        # [T] int32
        positions: Array,        # [T] int32
        kv_caches: list[LayerCache],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        tp: TensorParallel | None = None,
    ) -> tuple[Array, list[LayerCache]]:  # hidden [T, D], updated caches
        table = self.embed[...]
        if tp is not None and table.shape[0] < self.config.vocab_size:
            # vocab-split embedding: each shard looks up the ids in its range, the psum adds them
            rows = table.shape[0]
            local = input_ids - tp.index() * rows
            mine = (local >= 0) & (local < rows)
            x = jnp.where(mine[:, None], table[jnp.clip(local, 0, rows - 1)], 0).astype(table.dtype)
            x = tp.psum(x)
        else:
            x = table[input_ids]
        new_caches = []
        h, residual = x, jnp.zeros_like(x)   # layer 0's add_norm: embeddings + 0
        for layer, cache in zip(self.layers, kv_caches):
            graphdef, state = nnx.split(layer)
            h, residual, cache = _run_layer(graphdef, state, h, residual, positions, cache, meta,
                                            backend, tp)
            new_caches.append(cache)
        return self.norm.add_norm(h, residual)[0], new_caches

    def compute_logits(self, hidden: Array, tp: TensorParallel | None = None) -> Array:
        """[S, D] -> [S, V] float32 (vocab-split heads are gathered whole)."""
        logits, _, split = self.compute_local_logits(hidden, tp)
        return tp.all_gather(logits, axis=1) if split else logits

    def compute_local_logits(self, hidden: Array, tp: TensorParallel | None = None
                             ) -> tuple[Array, Array | int, bool]:
        """[S, D] -> (this shard's logits [S, V / tp] float32, the first vocab id they cover,
        whether the head is split over tp); unsplit: ([S, V], 0, False)."""
        w = self.embed[...] if self.config.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("SD,VD->SV", hidden, w, preferred_element_type=jnp.float32)
        split = tp is not None and w.shape[0] < self.config.vocab_size
        return logits, (tp.index() * w.shape[0] if split else 0), split
