"""Ragged paged attention for mixed steps (prefill chunks and decodes in one flat batch).

Queries are flat tokens q [T, N, H]: sequence s owns tokens query_start_loc[s] .. [s+1]-1, which sit
at the last positions of its seq_lens[s] keys (their K/V are already written into the cache), so
attention is causal within each sequence's new tokens and full over its cached prefix.

Query rows: each kv head sees its queries as token-major rows [T * G, H] (row r: token r // G,
query head r % G of the G = N/K heads that share the kv head), packed without padding the group to
a power of two (Qwen2.5-7B's G = 7 would waste 1/8 of every dot).

Work items: each sequence's rows are cut into blocks of R = block_q * Gp rows (Gp: G rounded up to a
power of two, so a block holds about block_q tokens' worth of rows; the last block of a sequence may
be partial); a block of sequence s is one program per kv head (grid: max work items x K), launched
in reverse order so the blocks with the most keys start first. The program loads its block's rows,
walks the sequence's pages `pages_per_block` at a time up to the block's last position (skipping
pages before a sliding window) and keeps an online softmax in fp32 (base-2 logits, as the decode
kernel): tiles wholly before the block's first query run without masks, the diagonal tiles mask
causally. K/V tiles are one gather of token-slot rows (the cache seen as [P*B, K, H], a free
reshape). Rows of padding tokens are left zero (the output buffer is zero-initialised and aliased),
and each program stores only its own valid rows.

Layers: `_prefill_kernel` (body) -> `_prefill_call` (pallas_call) -> `paged_prefill_attention`
(jitted, static tuning knobs, `interpret`) -> `paged_prefill_reference` (pure jnp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import online_softmax as osm


def _prefill_kernel(
    work_ref,     # [W, 3]       per work item: sequence, first row, number of rows (0 = none)
    q_ref,        # [T*G+R, H]   this kv head's queries, token-major (row r: token r // G)
    k_ref,        # [P*B, H]     this kv head's key pages, one row per token slot
    v_ref,        # [P*B, H]
    tables_ref,   # [S, M]       page tables
    lens_ref,     # [S]          KV length of each sequence, new tokens included
    qsl_ref,      # [S+1]        query start offsets
    o_in_ref,     # [T*G+R, H]   zeros (aliased with o_ref)
    o_ref,        # [T*G+R, H]
    *,
    block_rows: int,
    group: int,
    pages_per_block: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    page_size: int,
):
    del o_in_ref
    w = pl.program_id(0)
    seq = work_ref[w, 0]
    start = work_ref[w, 1]
    count = work_ref[w, 2]
    b = page_size
    h = k_ref.shape[1]
    rows = block_rows
    block = pages_per_block * b
    slot = jnp.arange(block, dtype=jnp.int32)

    @pl.when(count > 0)
    def _():
        seq_len = lens_ref[seq]
        first_tok = qsl_ref[seq]
        n_new = qsl_ref[seq + 1] - first_tok
        ctx = seq_len - n_new                                     # keys before the new tokens
        r = jnp.arange(rows, dtype=jnp.int32)
        row_ok = r < count
        pos = ctx + ((start + r) // group - first_tok)            # query position of each row
        q = osm.scaled_query(q_ref[pl.ds(start, rows), :], scale, soft_cap, k_ref.dtype)
        first_pos = ctx + (start // group - first_tok)            # the block's first query
        last_pos = ctx + ((start + count - 1) // group - first_tok)
        n_pages = last_pos // b + 1
        first_page = 0
        if sliding_window is not None:
            lowest = first_pos - sliding_window + 1
            first_page = jnp.maximum(lowest, 0) // b // pages_per_block * pages_per_block

        def step(p0, carry, masked: bool):
            kv_rows = osm.tile_rows(tables_ref, seq, p0, slot, b)
            k, v = k_ref[kv_rows], v_ref[kv_rows]
            logits = osm.cap_logits(jnp.dot(q, k.T, preferred_element_type=jnp.float32),
                                    soft_cap)                                 # [rows, block]
            if not masked:
                # a tile wholly before the block's first query: every key visible to every row,
                # all slots written
                return osm.step(carry, logits, v)
            kpos = p0 * b + slot
            valid = (kpos[None, :] <= pos[:, None]) & row_ok[:, None]
            if sliding_window is not None:
                valid &= kpos[None, :] > pos[:, None] - sliding_window
            return osm.step(carry, logits, v, valid, kpos < seq_len)

        carry = osm.init(rows, h)
        if sliding_window is None:
            # unmasked tiles first (keys before the block's first query), then the diagonal ones
            n_full = first_pos // block
            carry = jax.lax.fori_loop(
                0, n_full, lambda i, c: step(i * pages_per_block, c, masked=False), carry)
            first_page = n_full * pages_per_block
        n_iter = (n_pages - first_page + pages_per_block - 1) // pages_per_block
        o, _, l = jax.lax.fori_loop(
            0, n_iter, lambda i, c: step(first_page + i * pages_per_block, c, masked=True), carry)
        out = o / jnp.maximum(l, 1e-30)[:, None]
        # only this block's valid rows: the rows after them belong to the next sequence's block
        plgpu.store(o_ref.at[pl.ds(start, rows), :], out.astype(o_ref.dtype),
                    mask=jnp.broadcast_to(row_ok[:, None], (rows, h)))


def _prefill_call(work, qk, k_cache, v_cache, tables, lens, qsl, *, block_rows, group,
                  pages_per_block, scale, sliding_window, soft_cap, num_warps, num_stages,
                  interpret):
    k_heads, rows_total, h = qk.shape
    p, b, _, _ = k_cache.shape
    s_, m = tables.shape
    w = work.shape[0]
    kernel = functools.partial(_prefill_kernel, block_rows=block_rows, group=group,
                               pages_per_block=pages_per_block, scale=scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, page_size=b)
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    zeros = jnp.zeros((k_heads, rows_total, h), qk.dtype)
    return pl.pallas_call(
        kernel,
        grid=(w, k_heads),
        in_specs=[
            pl.BlockSpec((w, 3), lambda i, j: (0, 0)),                         # work items
            pl.BlockSpec((None, rows_total, h), lambda i, j: (j, 0, 0)),       # queries, head j
            pl.BlockSpec((p * b, None, h), lambda i, j: (0, j, 0)),            # k slots, head j
            pl.BlockSpec((p * b, None, h), lambda i, j: (0, j, 0)),            # v slots, head j
            pl.BlockSpec((s_, m), lambda i, j: (0, 0)),                        # page tables
            pl.BlockSpec((s_,), lambda i, j: (0,)),                            # lengths
            pl.BlockSpec((s_ + 1,), lambda i, j: (0,)),                        # query starts
            pl.BlockSpec((None, rows_total, h), lambda i, j: (j, 0, 0)),       # zeros (aliased)
        ],
        out_specs=pl.BlockSpec((None, rows_total, h), lambda i, j: (j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((k_heads, rows_total, h), qk.dtype),
        input_output_aliases={7: 0},
        compiler_params=compiler_params,
        interpret=interpret,
        name="jaxserve_paged_prefill",
    )(work, qk, k_cache.reshape(p * b, k_heads, h), v_cache.reshape(p * b, k_heads, h), tables,
      lens, qsl, zeros)


def work_items(query_start_loc: jax.Array, block_q: int, max_items: int) -> jax.Array:
    """[max_items, 3] int32 (sequence, first token, tokens) covering every sequence's new tokens in
    blocks of `block_q`; unused items have 0 tokens. (The kernel passes row offsets, token offsets
    times the group size, and gets row blocks.)"""
    qsl = query_start_loc.astype(jnp.int32)
    n_new = qsl[1:] - qsl[:-1]                                    # [S]
    n_blocks = (n_new + block_q - 1) // block_q
    ends = jnp.cumsum(n_blocks)                                   # work items up to each sequence
    w = jnp.arange(max_items, dtype=jnp.int32)
    # searchsorted(ends, w, side="right") as one compare-and-count: jnp.searchsorted's default
    # method is a loop, which on the GPU runs as an XLA while loop (host round trips per level)
    seq = jnp.sum(ends[None, :] <= w[:, None], axis=1).astype(jnp.int32)
    ok = seq < n_new.shape[0]
    seq_c = jnp.minimum(seq, n_new.shape[0] - 1)
    j = w - (ends[seq_c] - n_blocks[seq_c])
    start = qsl[seq_c] + j * block_q
    count = jnp.where(ok, jnp.clip(n_new[seq_c] - j * block_q, 0, block_q), 0)
    return jnp.stack([seq_c, jnp.where(ok, start, 0), count], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "pages_per_block", "sliding_window",
                                             "soft_cap", "num_warps", "num_stages", "interpret"))
def paged_prefill_attention(
    q: jax.Array,                # [T, N, H] flat new tokens of all sequences
    k_cache: jax.Array,          # [P, B, K, H] (the new tokens' K/V already written)
    v_cache: jax.Array,          # [P, B, K, H]
    block_tables: jax.Array,     # [S, M] int32
    seq_lens: jax.Array,         # [S] int32: keys of each sequence, new tokens included
    query_start_loc: jax.Array,  # [S+1] int32
    *,
    scale: float,
    block_q: int | None = None,
    pages_per_block: int = 4,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_warps: int = 4,
    num_stages: int = 1,
    interpret: bool = False,
) -> jax.Array:                  # [T, N, H]; rows of tokens outside every sequence are 0
    t, n, h = q.shape
    _, b, k_heads, _ = k_cache.shape
    s_, m = block_tables.shape
    g = n // k_heads
    gp = 1 << (g - 1).bit_length()
    if block_q is None:
        block_q = max(1, 128 // gp)
    block_q = max(block_q, -(-16 // gp))                  # at least 16 rows for the tensor-core dot
    pages_per_block = min(pages_per_block, 1 << (m - 1).bit_length())
    tables = block_tables.astype(jnp.int32)    # a tile past the table's end is clamped, masked
    rows = block_q * gp                                   # query rows per program
    # token-major rows per kv head, the group unpadded; R spare rows keep a last block in bounds
    qk = q.reshape(t, k_heads, g, h).transpose(1, 0, 2, 3).reshape(k_heads, t * g, h)
    qk = jnp.pad(qk, ((0, 0), (0, rows), (0, 0)))
    qsl = query_start_loc.astype(jnp.int32)
    # heavy first: a sequence's last blocks see the most keys, so they start first and the short
    # ones fill in behind them (measured 4-8% faster on a 2048-token chunk than the natural order)
    work = work_items(qsl * g, rows, -(-(t * g) // rows) + s_)[::-1]
    out = _prefill_call(work, qk, k_cache, v_cache, tables, seq_lens.astype(jnp.int32), qsl,
                        block_rows=rows, group=g, pages_per_block=pages_per_block, scale=scale,
                        sliding_window=sliding_window, soft_cap=soft_cap, num_warps=num_warps,
                        num_stages=num_stages, interpret=interpret)
    out = out[:, :t * g].reshape(k_heads, t, g, h).transpose(1, 0, 2, 3)
    return out.reshape(t, n, h)


def paged_prefill_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *,
                            scale: float, sliding_window: int | None = None,
                            soft_cap: float | None = None):
    """Pure jnp: every token gathers its sequence's pages and attends causally, softmax in fp32."""
    t, n, h = q.shape
    _, b, k_heads, _ = k_cache.shape
    s_, m = block_tables.shape
    g = n // k_heads
    qsl = query_start_loc.astype(jnp.int32)
    tok = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(qsl, tok, side="right") - 1, 0, s_ - 1)
    inside = tok < qsl[-1]
    n_new = qsl[seq + 1] - qsl[seq]
    pos = seq_lens[seq] - n_new + (tok - qsl[seq])                       # [T]
    k = k_cache[block_tables[seq]].reshape(t, m * b, k_heads, h).astype(jnp.float32)
    v = v_cache[block_tables[seq]].reshape(t, m * b, k_heads, h).astype(jnp.float32)
    kpos = jnp.arange(m * b)
    valid = (kpos[None, :] <= pos[:, None]) & inside[:, None]
    if sliding_window is not None:
        valid &= kpos[None, :] > pos[:, None] - sliding_window
    qg = q.reshape(t, k_heads, g, h).astype(jnp.float32)
    logits = jnp.einsum("tkgh,tckh->tkgc", qg, k) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(valid[:, None, None, :], logits, osm.MASK)
    p = jax.nn.softmax(logits, axis=-1)
    v = jnp.where(valid[:, :, None, None], v, 0.0)
    out = jnp.einsum("tkgc,tckh->tkgh", p, v)
    out = jnp.where(inside[:, None, None, None], out, 0.0)
    return out.reshape(t, n, h).astype(q.dtype)


def prefill_flops(query_start_loc, seq_lens, num_heads: int, head_dim: int) -> int:
    """Attention FLOPs of a ragged step (QK^T and PV, causal: each query sees its prefix only)."""
    import numpy as np
    qsl, lens = np.asarray(query_start_loc), np.asarray(seq_lens)
    total = 0
    for s in range(len(lens)):
        n_new = int(qsl[s + 1] - qsl[s])
        ctx = int(lens[s]) - n_new
        keys = n_new * ctx + n_new * (n_new + 1) // 2      # sum of visible keys over the queries
        total += 4 * keys * num_heads * head_dim
    return total


__all__ = ["paged_prefill_attention", "paged_prefill_reference", "prefill_flops", "work_items"]
