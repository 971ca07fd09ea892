"""Paged decode attention (one query token per sequence), flash-decoding style.

Cache layout (jaxserve's): k_cache, v_cache [P, B, K, H] — P pages of B tokens, K kv heads, H dims;
the kernel sees it as token-slot rows [P*B, K, H] (a free reshape). Grid (S sequences, K kv heads,
splits): each program takes the G = N/K query heads that share one kv head (read straight from the
unpadded query rows as one masked tile of a power of two >= 16 rows, for the tensor-core dot),
walks its share of the sequence's page table `pages_per_block` pages at a time (one row gather of
the tile's token slots; tiles wholly inside the context run without masks; the page index is
clamped to the table, so tables need no padding), and keeps an online softmax in fp32 with base-2
logits (log2 e folded into the query scale, so each probability is one exp2). With one split the
kernel stores its G normalised rows straight into the [S, N, H] output (masked stores), so no XLA
pad, slice or copy runs around it; with several, a jnp epilogue merges the splits' fp32 partials
(log-sum-exp merge).

Fused variant (`paged_decode_fused`): the input is the layer's fused q/k/v rows of each kv head
([S, K, G+2, H]: G query heads, the new key, the new value; RoPE already applied), so no XLA
slicing, padding or scatter runs between the projection and the kernel. The kernel writes the new
key/value into their slot of the cache in place (input/output aliasing) and attends over the
cache's first seq_len - 1 tokens plus the new token taken straight from its input rows.

Layers: `_decode_kernel` (body) -> `_decode_call` (pallas_call: grid, BlockSpecs) ->
`paged_decode_attention` (jitted, static tuning knobs, `interpret`) -> `paged_decode_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import online_softmax as osm


def _decode_kernel(
    q_ref,        # [S*K*R, H]   every sequence's rows, kv head by kv head: R = G query rows (fused:
                  #              then the new key and the new value, R = G + 2), unpadded
    k_ref,        # [P*B, H]     this kv head's slice of the key pages, one row per token slot
    v_ref,        # [P*B, H]
    tables_ref,   # [S, M]       page tables
    lens_ref,     # [S]          KV length of each sequence (0 = padding), new token included
    *out_refs,    # one split: o [S*K*G, H], the normalised output; several: o [Gp, H] (this
                  # split's output / l), m [Gp] and l [Gp] (its running max and sum); then fused:
                  # (k pages, v pages) of this kv head, aliased to k_ref / v_ref
    pages_per_block: int,
    pages_per_split: int,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    page_size: int,
    group: int,                   # G query heads per kv head
    q_tile: int,                  # Gp: the query tile's rows (a power of two >= 16, >= R)
    fused: bool,                  # rows G and G + 1 are the new key and value
    splits: int,                  # the grid's split count (one split: no m / l outputs)
):
    o_ref, m_ref, l_ref = out_refs[:3] if splits > 1 else (out_refs[0], None, None)
    cache_out = out_refs[3:] if splits > 1 else out_refs[1:]
    s = pl.program_id(0)
    j = pl.program_id(1)
    split = pl.program_id(2)
    k_heads = pl.num_programs(1)
    gp, h = q_tile, k_ref.shape[1]
    n_rows = group + 2 if fused else group
    b = page_size
    block = pages_per_block * b
    slot = jnp.arange(block, dtype=jnp.int32)
    seq_len = lens_ref[s]
    # fused: the newest token comes from the input rows, the cache supplies the ones before it
    cached = seq_len if not fused else jnp.maximum(seq_len - 1, 0)
    n_pages = (cached + b - 1) // b
    first = split * pages_per_split
    last = jnp.minimum(first + pages_per_split, n_pages)
    r = jnp.arange(gp, dtype=jnp.int32)
    start = (s * k_heads + j) * n_rows
    # this kv head's rows, the tile's rows past them zero (masked: nothing past the array is read)
    q_rows = plgpu.load(q_ref.at[pl.ds(start, gp), :], mask=(r < n_rows)[:, None], other=0)
    q = osm.scaled_query(q_rows, scale, soft_cap, k_ref.dtype)            # base-2 logits

    def step(i, carry, masked: bool):
        p0 = first + i * pages_per_block
        rows = osm.tile_rows(tables_ref, s, p0, slot, b)                  # [ppb*B]
        k, v = k_ref[rows], v_ref[rows]                                   # [ppb*B, H] each
        logits = osm.cap_logits(jnp.dot(q, k.T, preferred_element_type=jnp.float32), soft_cap)
        if not masked:
            return osm.step(carry, logits, v)
        pos = p0 * b + slot
        valid = (pos < cached) & (pos < last * b)
        if sliding_window is not None:
            valid &= pos > seq_len - 1 - sliding_window
        return osm.step(carry, logits, v, valid[None, :], valid)

    n_iter = jnp.maximum(last - first + pages_per_block - 1, 0) // pages_per_block
    # tiles wholly inside the cached tokens and the split (and no window) need no masks; with
    # several splits each program walks few tiles and one masked loop measured faster
    n_full = 0
    if sliding_window is None and splits == 1:
        n_full = jnp.clip((jnp.minimum(cached // b, last) - first) // pages_per_block, 0, n_iter)
    init = osm.init(gp, h)
    if fused:
        # split 0 starts from the new token (a softmax over one key: m = its logit, l = 1)
        k_new = q_ref[start + group, :]
        v_new = q_ref[start + group + 1, :]
        mine = (split == 0) & (seq_len > 0)
        logit = osm.cap_logits(
            jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1), soft_cap)
        ones = jnp.ones((gp,), jnp.float32)
        init = (jnp.where(mine, ones[:, None] * v_new.astype(jnp.float32)[None, :], init[0]),
                jnp.where(mine, logit, init[1]), jnp.where(mine, ones, init[2]))
        ko_ref, vo_ref = cache_out

        @pl.when(mine)
        def _write():
            t = seq_len - 1
            row = tables_ref[s, t // b] * b + t % b
            ko_ref[row, :] = k_new.astype(ko_ref.dtype)
            vo_ref[row, :] = v_new.astype(vo_ref.dtype)

    carry = jax.lax.fori_loop(0, n_full, functools.partial(step, masked=False), init)
    o, m, l = jax.lax.fori_loop(n_full, n_iter, functools.partial(step, masked=True), carry)
    if m_ref is None:
        # one split: the normalised rows of the G query heads, stored in place in [S*K*G, H]
        out = jnp.where(l[:, None] > 0, o / jnp.maximum(l, 1e-30)[:, None], 0.0)
        plgpu.store(o_ref.at[pl.ds((s * k_heads + j) * group, gp), :], out.astype(o_ref.dtype),
                    mask=(r < group)[:, None])
        return
    o_ref[...] = o
    m_ref[...] = m
    l_ref[...] = l


def _decode_call(rows, k_cache, v_cache, tables, lens, *, group, fused, splits, pages_per_block,
                 pages_per_split, scale, sliding_window, soft_cap, num_warps, num_stages,
                 interpret):
    """rows: [S, K, R, H] (R = G, or G + 2 fused). One split returns [o [S*K*G, H]]; several
    return the partials [o, m, l]; fused, the updated caches follow."""
    s_, k_heads, n_rows, h = rows.shape
    p, b, _, _ = k_cache.shape
    m = tables.shape[1]
    gp = max(16, 1 << (n_rows - 1).bit_length())
    kernel = functools.partial(_decode_kernel, pages_per_block=pages_per_block,
                               pages_per_split=pages_per_split, scale=scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, page_size=b,
                               group=group, q_tile=gp, fused=fused, splits=splits)
    # token-slot rows: [P, B, K, H] -> [P*B, K, H] is a bitcast (the in-place update survives it),
    # as is [S, K, R, H] -> [S*K*R, H]
    k_rows = k_cache.reshape(p * b, k_heads, h)
    v_rows = v_cache.reshape(p * b, k_heads, h)
    if splits == 1:
        # the normalised output in the query dtype, every program storing its G rows
        n_out = s_ * k_heads * group
        out_shape = [jax.ShapeDtypeStruct((n_out, h), rows.dtype)]
        out_specs = [pl.BlockSpec((n_out, h), lambda i, j, c: (0, 0))]
    else:
        # fp32 partials and their running max and sum, for the merge
        out_shape = [jax.ShapeDtypeStruct((splits, s_, k_heads, gp, h), jnp.float32),
                     jax.ShapeDtypeStruct((splits, s_, k_heads, gp), jnp.float32),
                     jax.ShapeDtypeStruct((splits, s_, k_heads, gp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, gp, h), lambda i, j, c: (c, i, j, 0, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda i, j, c: (c, i, j, 0)),
                     pl.BlockSpec((None, None, None, gp), lambda i, j, c: (c, i, j, 0))]
    pages_spec = pl.BlockSpec((p * b, None, h), lambda i, j, c: (0, j, 0))   # head j's slots
    aliases = {}
    if fused:   # the caches come back as outputs, updated in place
        aliases = {1: len(out_shape), 2: len(out_shape) + 1}
        out_shape += [jax.ShapeDtypeStruct(k_rows.shape, k_rows.dtype),
                      jax.ShapeDtypeStruct(v_rows.shape, v_rows.dtype)]
        out_specs += [pages_spec, pages_spec]
    compiler_params = None
    if not interpret:
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    n_in = s_ * k_heads * n_rows
    outs = pl.pallas_call(
        kernel,
        grid=(s_, k_heads, splits),
        in_specs=[
            pl.BlockSpec((n_in, h), lambda i, j, c: (0, 0)),                      # all rows
            pages_spec,                                                           # k pages, head j
            pages_spec,                                                           # v pages, head j
            pl.BlockSpec((s_, m), lambda i, j, c: (0, 0)),                        # page tables
            pl.BlockSpec((s_,), lambda i, j, c: (0,)),                            # lengths
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=compiler_params,
        interpret=interpret,
        name="jaxserve_paged_decode_fused" if fused else "jaxserve_paged_decode",
    )(rows.reshape(n_in, h), k_rows, v_rows, tables, lens)
    if fused:
        outs = [*outs[:-2], outs[-2].reshape(k_cache.shape), outs[-1].reshape(v_cache.shape)]
    return outs


@functools.partial(jax.jit, static_argnames=("scale", "splits", "pages_per_block", "sliding_window",
                                             "soft_cap", "num_warps", "num_stages", "interpret"))
def paged_decode_attention(
    q: jax.Array,            # [S, N, H]  one query token per sequence
    k_cache: jax.Array,      # [P, B, K, H]
    v_cache: jax.Array,      # [P, B, K, H]
    block_tables: jax.Array,  # [S, M] int32
    seq_lens: jax.Array,     # [S] int32; the query sits at position seq_len - 1
    *,
    scale: float,
    splits: int = 4,
    pages_per_block: int = 8,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:              # [S, N, H]
    s_, n, h = q.shape
    k_heads = k_cache.shape[2]
    g = n // k_heads
    outs = _launch(q.reshape(s_, k_heads, g, h), k_cache, v_cache, block_tables, seq_lens,
                   group=g, splits=splits, pages_per_block=pages_per_block, scale=scale,
                   sliding_window=sliding_window, soft_cap=soft_cap, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)
    return _merge_splits(outs, s_, k_heads, g).astype(q.dtype)


def _launch(rows, k_cache, v_cache, block_tables, seq_lens, *, group, splits, pages_per_block,
            fused=False, **knobs):
    """Split the page tables' walk and run the kernel -> [o] (one split) or [o, m, l], then the
    updated caches when fused."""
    m = block_tables.shape[1]
    pages_per_block = min(pages_per_block, 1 << (m - 1).bit_length())
    pages_per_split = -(-m // splits)
    pages_per_split = -(-pages_per_split // pages_per_block) * pages_per_block
    return _decode_call(rows, k_cache, v_cache, block_tables.astype(jnp.int32),
                        seq_lens.astype(jnp.int32), group=group, fused=fused, splits=splits,
                        pages_per_block=pages_per_block, pages_per_split=pages_per_split, **knobs)


def _merge_splits(outs, s_: int, k_heads: int, g: int):
    """-> [S, K*G, H]: one split's output as it is (already normalised, G rows per kv head);
    several splits' partials merged in fp32 (log-sum-exp), without the tile's padding rows."""
    if len(outs) == 1:
        return outs[0].reshape(s_, k_heads * g, -1)
    o, mx, l = outs
    m_all = mx.max(axis=0)                                      # [S, K, Gp]
    w = jnp.exp2(mx - m_all[None])        # the kernel's running maxima are base-2 logits
    l_all = (l * w).sum(axis=0)
    o_all = (o * w[..., None]).sum(axis=0)
    out = jnp.where(l_all[..., None] > 0, o_all / jnp.maximum(l_all, 1e-30)[..., None], 0.0)
    return out[:, :, :g, :].reshape(s_, k_heads * g, -1)


@functools.partial(jax.jit, static_argnames=("scale", "splits", "pages_per_block", "sliding_window",
                                             "soft_cap", "num_warps", "num_stages", "interpret"))
def paged_decode_fused(
    qkv: jax.Array,          # [S, K, G+2, H]  per kv head: G query rows, the new key, the new value
    k_cache: jax.Array,      # [P, B, K, H]
    v_cache: jax.Array,      # [P, B, K, H]
    block_tables: jax.Array,  # [S, M] int32
    seq_lens: jax.Array,     # [S] int32, the new token included (it goes to slot seq_len - 1)
    *,
    scale: float,
    splits: int = 4,
    pages_per_block: int = 8,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:   # out [S, N, H], k_cache, v_cache (updated in place)
    """Decode attention with the KV write fused in: writes each sequence's new key/value at
    position seq_len - 1 (sequences with seq_len 0 write nothing) and attends over its whole
    context. Inside a jitted step whose caches are donated, the update is in place."""
    s_, k_heads, c, h = qkv.shape
    g = c - 2
    *outs, k_cache, v_cache = _launch(
        qkv, k_cache, v_cache, block_tables, seq_lens, group=g, splits=splits,
        pages_per_block=pages_per_block, scale=scale, sliding_window=sliding_window,
        soft_cap=soft_cap, num_warps=num_warps, num_stages=num_stages, interpret=interpret,
        fused=True)
    out = _merge_splits(outs, s_, k_heads, g).astype(qkv.dtype)
    return out, k_cache, v_cache


def paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None):
    """Pure jnp: gather each sequence's pages, mask beyond its length, softmax in fp32."""
    s_, n, h = q.shape
    _, b, k_heads, _ = k_cache.shape
    g = n // k_heads
    m = block_tables.shape[1]
    k = k_cache[block_tables].reshape(s_, m * b, k_heads, h).astype(jnp.float32)
    v = v_cache[block_tables].reshape(s_, m * b, k_heads, h).astype(jnp.float32)
    pos = jnp.arange(m * b)
    valid = pos[None, :] < seq_lens[:, None]                    # [S, C]
    if sliding_window is not None:
        valid &= pos[None, :] > seq_lens[:, None] - 1 - sliding_window
    qg = q.reshape(s_, k_heads, g, h).astype(jnp.float32)
    logits = jnp.einsum("skgh,sckh->skgc", qg, k) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(valid[:, None, None, :], logits, osm.MASK)
    p = jax.nn.softmax(logits, axis=-1)
    v = jnp.where(valid[:, :, None, None], v, 0.0)
    out = jnp.einsum("skgc,sckh->skgh", p, v)
    out = jnp.where(valid.any(-1)[:, None, None, None], out, 0.0)
    return out.reshape(s_, n, h).astype(q.dtype)


def paged_decode_fused_reference(qkv, k_cache, v_cache, block_tables, seq_lens, *, scale: float,
                                 sliding_window: int | None = None, soft_cap: float | None = None):
    """Pure jnp: scatter the new key/value rows into slot seq_len - 1, then attend."""
    s_, k_heads, c, h = qkv.shape
    g = c - 2
    b = k_cache.shape[1]
    t = jnp.maximum(seq_lens - 1, 0)
    page = jnp.take_along_axis(block_tables, (t // b)[:, None], axis=1)[:, 0]
    page = jnp.where(seq_lens > 0, page, k_cache.shape[0])      # padding: out of range, dropped
    k_cache = k_cache.at[page, t % b].set(qkv[:, :, g].astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[page, t % b].set(qkv[:, :, g + 1].astype(v_cache.dtype), mode="drop")
    q = qkv[:, :, :g].reshape(s_, k_heads * g, h)
    out = paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale=scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap)
    return out, k_cache, v_cache


def bytes_read(seq_lens, num_kv_heads: int, head_dim: int, itemsize: int) -> int:
    """K + V bytes a decode step must read (for TB/s figures)."""
    return int(2 * sum(int(x) for x in seq_lens) * num_kv_heads * head_dim * itemsize)


__all__ = ["paged_decode_attention", "paged_decode_fused", "paged_decode_fused_reference",
           "paged_decode_reference", "bytes_read"]
