"""Pieces both attention kernels share, traced inside their kernel bodies: the base-2 query scale
and soft cap, the token-row gather of a K/V tile, and one step of the fp32 online softmax.

Logits are kept in base 2: log2(e) folds into the query scale (or into the soft cap, which needs
natural-base logits), so every probability is one `exp2` (a single special-function instruction;
the `exp` the Triton lowering calls is an accurate libdevice routine of several).
"""

from __future__ import annotations

import jax.numpy as jnp

MASK = -1e30
LOG2E = 1.4426950408889634


def scaled_query(q, scale: float, soft_cap: float | None, dtype):
    """The query rows times the softmax scale (and log2 e unless a soft cap follows), in `dtype`."""
    return (q.astype(jnp.float32) * (scale if soft_cap is not None else scale * LOG2E)).astype(dtype)


def cap_logits(x, soft_cap: float | None):
    """Base-2 logits from the q.k products (soft-capped in the natural base when set)."""
    return x if soft_cap is None else soft_cap * jnp.tanh(x / soft_cap) * LOG2E


def tile_rows(tables_ref, seq, first_page, slot, page_size: int):
    """Token-slot rows [len(slot)] of the cache seen as [P*B, K, H] for the tile that starts at
    page `first_page` of sequence `seq`'s page table (one gather, no in-kernel reshape). A tile
    that runs past the table's last entry reads that entry again for the missing pages (slots the
    caller masks: they lie past the sequence's length), so tables need no padding."""
    page = jnp.minimum(first_page + slot // page_size, tables_ref.shape[1] - 1)
    return tables_ref[seq, page] * page_size + slot % page_size


def step(carry, logits, v, valid=None, kv_ok=None):
    """One tile of the online softmax: carry (o [R, H], m [R], l [R]) in fp32, base-2 logits
    [R, C], values v [C, H]. `valid` [R, C] masks logits (None: every key visible to every row);
    `kv_ok` [C] zeroes the value rows of unwritten slots, which may hold NaN."""
    o, m, l = carry
    if valid is not None:
        logits = jnp.where(valid, logits, MASK)
    m_new = jnp.maximum(m, logits.max(axis=-1))
    p = jnp.exp2(logits - m_new[:, None])
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    if kv_ok is not None:
        v = jnp.where(kv_ok[:, None], v, jnp.zeros_like(v))
    corr = jnp.exp2(m - m_new)
    o = o * corr[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o, m_new, l * corr + p.sum(axis=-1)


def init(rows: int, head_dim: int):
    """The empty carry: o = 0, m = MASK, l = 0."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
