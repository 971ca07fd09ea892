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


def paged_attention_blockwise(
    q: jax.Array,          # [T, N, H]
    k_cache: jax.Array,    # [P, B, K, H]
    v_cache: jax.Array,    # [P, B, K, H]
    meta: AttentionMetadata,
    positions: jax.Array,  # [T]
    spec: AttentionSpec,
    pages_per_chunk: int = 8,
) -> jax.Array:            # [T, N, H]
    """The same function as `paged_attention_reference`, computed chunk by chunk of pages with an
    online (flash) softmax, and only over as many chunks as the longest sequence needs. Memory per
    iteration is T x chunk x K x H instead of T x (whole table) x K x H: this is the portable
    backend the engine runs where no kernel exists (CPU)."""
    t, n, h = q.shape
    _, b, kh, _ = k_cache.shape
    g = n // kh
    m_pages = meta.block_tables.shape[1]
    ppc = min(pages_per_chunk, m_pages)
    pad = (-m_pages) % ppc
    tables = meta.block_tables[meta.seq_ids]                     # [T, M]
    if pad:
        tables = jnp.pad(tables, ((0, 0), (0, pad)))
    chunk = ppc * b
    seq_len = meta.seq_lens[meta.seq_ids]                        # [T]
    n_chunks = (jnp.max(meta.seq_lens) + chunk - 1) // chunk
    qg = q.reshape(t, kh, g, h).astype(jnp.float32) * spec.scale

    def body(carry):
        i, m, l, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(tables, i * ppc, ppc, axis=1)      # [T, ppc]
        k = k_cache[pages].reshape(t, chunk, kh, h).astype(jnp.float32)        # [T, c, K, H]
        v = v_cache[pages].reshape(t, chunk, kh, h).astype(jnp.float32)
        kv_pos = i * chunk + jnp.arange(chunk, dtype=jnp.int32)
        valid = (kv_pos[None, :] <= positions[:, None]) & (kv_pos[None, :] < seq_len[:, None])
        if spec.sliding_window is not None:
            valid &= positions[:, None] - kv_pos[None, :] < spec.sliding_window
        s = jnp.einsum("tkgh,tckh->tkgc", qg, k)
        if spec.soft_cap is not None:
            s = spec.soft_cap * jnp.tanh(s / spec.soft_cap)
        vmask = valid[:, None, None, :]
        s = jnp.where(vmask, s, _MASKED)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(vmask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        v = jnp.where(valid[:, :, None, None], v, 0.0)
        acc = acc * corr[..., None] + jnp.einsum("tkgc,tckh->tkgh", p, v)
        return i + 1, m_new, l * corr + p.sum(-1), acc

    init = (jnp.int32(0), jnp.full((t, kh, g), _MASKED, jnp.float32),
            jnp.zeros((t, kh, g), jnp.float32), jnp.zeros((t, kh, g, h), jnp.float32))
    _, _, l, acc = jax.lax.while_loop(lambda c: c[0] < n_chunks, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.maximum(l, 1e-30)[..., None], 0.0)
    return out.reshape(t, n, h).astype(q.dtype)
