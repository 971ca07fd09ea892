"""Pure-jnp paged attention: the reference every kernel is tested against.

It gathers each token's whole context from the page table, so it moves T x L x K x H elements per
layer: exact and portable (CPU, GPU), but slow for long prefills. The Pallas kernels replace it on GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.attention.metadata import AttentionMetadata, AttentionSpec

_MASKED = -1e30


def write_kv_reference(
    k_cache: jax.Array,   # [P, B, K, H]
    v_cache: jax.Array,   # [P, B, K, H]
    k: jax.Array,         # [T, K, H]
    v: jax.Array,         # [T, K, H]
    slot_mapping: jax.Array,  # [T]
) -> tuple[jax.Array, jax.Array]:
    p, b, kh, h = k_cache.shape
    k_flat = k_cache.reshape(p * b, kh, h).at[slot_mapping].set(k.astype(k_cache.dtype))
    v_flat = v_cache.reshape(p * b, kh, h).at[slot_mapping].set(v.astype(v_cache.dtype))
    return k_flat.reshape(p, b, kh, h), v_flat.reshape(p, b, kh, h)


def paged_attention_reference(
    q: jax.Array,          # [T, N, H]
    k_cache: jax.Array,    # [P, B, K, H]
    v_cache: jax.Array,    # [P, B, K, H]
    meta: AttentionMetadata,
    positions: jax.Array,  # [T] absolute position of each query token
    spec: AttentionSpec,
) -> jax.Array:            # [T, N, H]
    t, n, h = q.shape
    _, b, kh, _ = k_cache.shape
    g = n // kh
    s_, m = meta.block_tables.shape
    ctx = m * b
    k_seq = k_cache[meta.block_tables].reshape(s_, ctx, kh, h)  # [S, C, K, H]
    v_seq = v_cache[meta.block_tables].reshape(s_, ctx, kh, h)
    k_tok = k_seq[meta.seq_ids]                                  # [T, C, K, H]
    v_tok = v_seq[meta.seq_ids]
    kv_pos = jnp.arange(ctx, dtype=jnp.int32)                   # [C]
    seq_len = meta.seq_lens[meta.seq_ids]                       # [T]
    valid = (kv_pos[None, :] <= positions[:, None]) & (kv_pos[None, :] < seq_len[:, None])  # [T, C]
    if spec.sliding_window is not None:
        valid &= positions[:, None] - kv_pos[None, :] < spec.sliding_window
    qg = q.reshape(t, kh, g, h).astype(jnp.float32)
    scores = jnp.einsum("tkgh,tckh->tkgc", qg, k_tok.astype(jnp.float32)) * spec.scale
    if spec.soft_cap is not None:
        scores = spec.soft_cap * jnp.tanh(scores / spec.soft_cap)
    scores = jnp.where(valid[:, None, None, :], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    # NOTE: zero the values at masked slots so NaN/garbage in unused pages cannot leak through 0 * NaN.
    v_tok = jnp.where(valid[:, :, None, None], v_tok.astype(jnp.float32), 0.0)
    out = jnp.einsum("tkgc,tckh->tkgh", probs, v_tok)
    out = jnp.where(valid.any(axis=-1)[:, None, None, None], out, 0.0)
    return out.reshape(t, n, h).astype(q.dtype)
