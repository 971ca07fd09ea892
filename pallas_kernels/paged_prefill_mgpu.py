"""Ragged paged prefill attention for Hopper GPUs, in Mosaic GPU (TMA copies, wgmma, warp-specialised).

The same operation as `paged_prefill.paged_prefill_attention` (the Triton-lowered kernel, which
stays the portable path and the one for fp32, sliding windows and logit soft-caps): flat query
tokens q [T, N, H] of several sequences (query_start_loc), causal within each sequence's new
tokens, over paged K/V [P, B, K, H] through block tables. This version runs on the tensor cores
the way Hopper wants to be fed:

- Rows: each kv head's G = N/K query heads of a token are adjacent in q ([T, K, G, H] is a free
  reshape), so one TMA copy per token lands a token's G rows in shared memory and a compute
  warpgroup owns 64 // G tokens = their rows of one wgmma M-tile (G = 7: 9 tokens, 63 rows). No
  transpose of q or of the output runs around the kernel; each output token is one TMA store.
- A program (grid: work item x kv head) has three warpgroups: two compute warpgroups (one row tile
  each, so a work item is 2 * (64 // G) tokens of one sequence) and one memory warpgroup that walks
  the sequence's block table and copies K and V a page at a time (one TMA copy per page per
  tensor) into `stages` slots of `block_kv` keys, 128-byte swizzled for wgmma. K/V are read once
  per kv head for all its query heads.
- Compute: S = Q K^T by wgmma into fp32 registers, online softmax in base 2 (scale folded into one
  multiply), P V by wgmma with P from registers. Tiles wholly before a warpgroup's first query run
  without masks; the diagonal ones mask causally. With `pingpong` the two compute warpgroups take
  turns on the tensor cores (one does its softmax while the other multiplies).
- Safety: pages past a sequence's end are not copied (their slots keep stale data), and slots past
  its length in its last page may hold anything (NaN included): keys there are masked to -inf, and
  the V rows of the sequence's last tile at or past its length are zeroed in shared memory before
  P V (P is 0 there, but 0 * NaN is NaN).
- Tokens after the last sequence (bucket padding) get zeros, written by work items of their own, so
  no zero-filled output buffer is needed.

Layers: `_kernel` (body) -> `_call` (plgpu.kernel) -> `paged_prefill_attention_mgpu` (jitted,
static tuning knobs; measured values in `tuning.MGPU_PREFILL_TABLE`) ->
`paged_prefill_mgpu_reference` (pure jnp: the same operation as the Triton kernel's, so it is that
kernel's reference). Runs on GPUs of compute capability 9.x only (no interpret mode: Mosaic GPU's
interpreter does not run kernels with several warpgroups); `supported` says which configurations
it covers.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.paged_prefill import paged_prefill_reference, work_items

paged_prefill_mgpu_reference = paged_prefill_reference   # same operation, same jnp reference

ROWS = 64          # query rows per compute warpgroup: one wgmma M tile
_LOG2E = math.log2(math.e)


_SMEM_BYTES = 227 * 1024   # shared memory one Hopper block may use


def smem_bytes(head_dim: int, block_kv: int, stages: int, itemsize: int = 2) -> int:
    """Shared memory of one program: query staging and swizzled query tiles of both compute
    warpgroups, and `stages` K and V tiles (barriers aside)."""
    return itemsize * head_dim * (4 * ROWS + 2 * stages * block_kv)


def available(device=None) -> bool:
    """Whether the kernel can run on `device` (default: JAX's first device): a GPU of compute
    capability 9.x (Hopper)."""
    device = jax.devices()[0] if device is None else device
    return (device.platform == "gpu"
            and str(getattr(device, "compute_capability", "")).startswith("9"))


def supported(dtype, num_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
              block_kv: int = 128, stages: int = 2, sliding_window=None, soft_cap=None,
              kv_dtype=None) -> bool:
    """Configurations this kernel covers; the others use the Triton-lowered kernel. `kv_dtype`
    (default: `dtype`) is the caches' dtype, which must be q's."""
    group = num_heads // num_kv_heads if num_kv_heads else 0
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and (kv_dtype is None or jnp.dtype(kv_dtype) == jnp.dtype(dtype))
            and num_kv_heads > 0 and num_heads % num_kv_heads == 0 and 1 <= group <= ROWS
            and head_dim in (64, 128) and page_size % 8 == 0 and block_kv % page_size == 0
            and block_kv % ROWS == 0 and stages >= 1
            and smem_bytes(head_dim, block_kv, stages) + 1024 <= _SMEM_BYTES
            and sliding_window is None and soft_cap is None)


def _kernel(work_ref, q_ref, k_ref, v_ref, tables_ref, lens_ref, qsl_ref, o_ref, scoped, *,
            group, block_kv, page_size, stages, scale, pingpong):
    # q_ref, o_ref: [T, K, G, H]; k_ref, v_ref: [P, B, K, H]; tables_ref [S, M]; lens_ref [S];
    # qsl_ref [S+1]; work_ref [W, 3] (sequence, first token, tokens; sequence S = padding tokens)
    (stage_smem, q_smem, k_smem, v_smem), (q_bar, k_bar, v_bar), (k_free, v_free), sched = scoped
    t_total = q_ref.shape[0]
    num_seqs, max_pages = tables_ref.shape
    h = q_ref.shape[3]
    dtype = q_ref.dtype
    tb = ROWS // group                       # tokens per compute warpgroup
    ppb = block_kv // page_size              # pages per K/V tile

    wg = lax.axis_index("wg")
    kvh = lax.axis_index("kv")
    w = lax.axis_index("item")
    seq = work_ref[w, 0]
    start = work_ref[w, 1]
    count = work_ref[w, 2]
    is_pad = seq >= num_seqs
    seq_c = jnp.minimum(seq, num_seqs - 1)
    seq_len = lens_ref[seq_c]
    first_tok = qsl_ref[seq_c]
    ctx = seq_len - (qsl_ref[seq_c + 1] - first_tok)          # keys before the new tokens
    live = jnp.logical_and(count > 0, jnp.logical_not(is_pad))
    # K/V tiles the program needs: up to its last query's position
    # (clamped at 0 so that inconsistent lengths cannot unbalance the barriers and hang)
    n_steps = jnp.where(live, jnp.maximum((ctx + start - first_tok + count + block_kv - 1)
                                          // block_kv, 0), 0)

    def sched_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < 2)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        stage = stage_smem.at[wg]
        qs = q_smem.at[wg]
        t0 = start + wg * tb                                   # this warpgroup's first token
        cnt = jnp.clip(count - wg * tb, 0, tb)
        my_live = jnp.logical_and(live, cnt > 0)
        first_pos = ctx + t0 - first_tok
        my_steps = jnp.where(my_live, jnp.clip((first_pos + cnt + block_kv - 1) // block_kv, 0,
                                               n_steps), 0)
        full_steps = jnp.clip(first_pos // block_kv, 0, my_steps)

        for j in range(tb):
            tok = jnp.minimum(t0 + j, t_total - 1)
            plgpu.copy_gmem_to_smem(q_ref.at[tok, kvh], stage.at[pl.ds(j * group, group)],
                                    q_bar.at[wg], predicate=jnp.logical_and(my_live, j < cnt))
        plgpu.barrier_wait(q_bar.at[wg])
        row = plgpu.broadcasted_iota(jnp.int32, (ROWS, h), 0, layout=plgpu.Layout.WGMMA)
        qv = plgpu.load(stage, layout=plgpu.Layout.WGMMA, optimized=False)
        # rows past the warpgroup's tokens were never written: zero them (they are never stored)
        qs[...] = jnp.where(row < cnt * group, qv, jnp.zeros_like(qv))
        plgpu.commit_smem()

        m_i = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, jnp.float32),
                                plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((ROWS, h), 0, jnp.float32), plgpu.Layout.WGMMA)

        if pingpong:
            pl.when(wg == 1)(sched_sync)

        def step(i, carry, masked):
            acc, m_i, l_i = carry
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_bar.at[slot])

            def qk(acc_ref):
                plgpu.wgmma(acc_ref, qs, k_smem.at[slot].transpose((1, 0)))
                if pingpong:
                    sched_sync()
                return acc_ref[...]

            s = pl.run_scoped(qk, plgpu.ACC((ROWS, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * (scale * _LOG2E)
            if masked:
                r = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, (ROWS, block_kv), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(i * block_kv + c <= first_pos + r // group, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p16 = p.astype(dtype)
            if pingpong:
                plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_bar.at[slot])
            if masked:
                @pl.when((i + 1) * block_kv > seq_len)
                def _zero_tail():
                    # the sequence's last tile: V rows at or past its length may be garbage.
                    # Both compute warpgroups may pass here for the same slot; each writes back
                    # the valid rows unchanged and zeros elsewhere, so whichever runs second
                    # rewrites the values already there while the first one's wgmma reads them
                    valid = seq_len - i * block_kv
                    for part in range(block_kv // ROWS):
                        ref = v_smem.at[slot, pl.ds(part * ROWS, ROWS)]
                        x = plgpu.load(ref, layout=plgpu.Layout.WGMMA)
                        rr = plgpu.broadcasted_iota(jnp.int32, (ROWS, h), 0,
                                                    layout=plgpu.Layout.WGMMA) + part * ROWS
                        ref[...] = jnp.where(rr < valid, x, jnp.zeros_like(x))
                    plgpu.commit_smem()
            if pingpong:
                plgpu.barrier_wait(sched)

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), carry)
        acc, m_i, l_i = lax.fori_loop(full_steps, my_steps, functools.partial(step, masked=True),
                                      carry)

        @pl.loop(my_steps, n_steps)
        def _drain(i):
            # tiles the memory warpgroup loads for the other warpgroup's later tokens
            slot = lax.rem(i, stages)
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            if pingpong:
                sched_sync()
                sched_sync()

        if pingpong:
            pl.when(wg == 0)(sched_sync)

        out = acc / lax.broadcast_in_dim(jnp.maximum(l_i, 1e-30), acc.shape, [0])
        out = jnp.where(jnp.logical_or(is_pad, row >= cnt * group), jnp.zeros_like(out), out)
        stage[...] = out.astype(dtype)
        plgpu.commit_smem()
        for j in range(tb):
            tok = jnp.minimum(t0 + j, t_total - 1)
            plgpu.copy_smem_to_gmem(stage.at[pl.ds(j * group, group)], o_ref.at[tok, kvh],
                                    predicate=j < cnt)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def issue(i, slot, ref, smem, bar):
            for j in range(ppb):
                pidx = i * ppb + j
                page = tables_ref[seq_c, jnp.minimum(pidx, max_pages - 1)]
                plgpu.copy_gmem_to_smem(ref.at[page, :, kvh],
                                        smem.at[slot, pl.ds(j * page_size, page_size)],
                                        bar.at[slot], predicate=pidx * page_size < seq_len)

        for i in range(stages):
            @pl.when(i < n_steps)
            def _prologue():
                issue(i, i, k_ref, k_smem, k_bar)
                issue(i, i, v_ref, v_smem, v_bar)

        @pl.loop(stages, jnp.maximum(n_steps, stages))
        def _steady(i):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(k_free.at[slot])
            issue(i, slot, k_ref, k_smem, k_bar)
            plgpu.barrier_wait(v_free.at[slot])
            issue(i, slot, v_ref, v_smem, v_bar)


def _call(work, q4, k_cache, v_cache, tables, lens, qsl, *, block_kv, stages, scale, pingpong):
    t, k_heads, group, h = q4.shape
    page_size = k_cache.shape[1]
    dtype = q4.dtype
    tb = ROWS // group
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def entry(work_ref, q_ref, k_ref, v_ref, tables_ref, lens_ref, qsl_ref, o_ref):
        pl.run_scoped(
            lambda *scoped: _kernel(work_ref, q_ref, k_ref, v_ref, tables_ref, lens_ref, qsl_ref,
                                    o_ref, scoped, group=group, block_kv=block_kv,
                                    page_size=page_size, stages=stages, scale=scale,
                                    pingpong=pingpong),
            (plgpu.SMEM((2, ROWS, h), dtype),                               # q in / out staging
             plgpu.SMEM((2, ROWS, h), dtype, transforms=swizzled),          # q for wgmma
             plgpu.SMEM((stages, block_kv, h), dtype, transforms=swizzled),  # K tiles
             plgpu.SMEM((stages, block_kv, h), dtype, transforms=swizzled)),  # V tiles
            (plgpu.Barrier(num_arrivals=tb, num_barriers=2),
             plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages),
             plgpu.Barrier(num_arrivals=block_kv // page_size, num_barriers=stages)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q4.shape, dtype),
        # Pallas launches the last grid axis fastest: every kv head of the heaviest work item
        # first, then the next item's (kv-major order would launch each head's items heaviest
        # first in turn, a sawtooth of K teeth)
        grid=(work.shape[0], k_heads),
        grid_names=("item", "kv"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(work, q4, k_cache, v_cache, tables, lens, qsl)


@functools.partial(jax.jit, static_argnames=("scale", "block_kv", "stages", "pingpong"))
def paged_prefill_attention_mgpu(
    q: jax.Array,                # [T, N, H] flat new tokens of all sequences
    k_cache: jax.Array,          # [P, B, K, H] (the new tokens' K/V already written)
    v_cache: jax.Array,          # [P, B, K, H]
    block_tables: jax.Array,     # [S, M] int32
    seq_lens: jax.Array,         # [S] int32: keys of each sequence, new tokens included
    query_start_loc: jax.Array,  # [S+1] int32
    *,
    scale: float,
    block_kv: int = 128,
    stages: int = 2,
    pingpong: bool = True,
) -> jax.Array:                  # [T, N, H]; rows of tokens outside every sequence are 0
    t, n, h = q.shape
    _, b, k_heads, _ = k_cache.shape
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"paged_prefill_attention_mgpu needs q and the caches in one dtype, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not supported(q.dtype, n, k_heads, h, b, block_kv, stages):
        raise ValueError(f"paged_prefill_attention_mgpu does not cover dtype={q.dtype}, "
                         f"heads={n}/{k_heads}, head_dim={h}, page_size={b}, block_kv={block_kv}, "
                         f"stages={stages}")
    s_ = block_tables.shape[0]
    g = n // k_heads
    tokens = 2 * (ROWS // g)                               # per work item (two warpgroups)
    qsl = query_start_loc.astype(jnp.int32)
    # the padding tokens after the last sequence form one more "sequence" whose items write zeros
    qsl_ext = jnp.concatenate([qsl, jnp.full((1,), t, jnp.int32)])
    work = work_items(qsl_ext, tokens, -(-t // tokens) + s_ + 1)[::-1]   # heaviest first
    # Mosaic GPU wants every operand 256-byte aligned; the engine's small int inputs are slices of
    # one packed array, which XLA may hand over as views at odd offsets. A clamp is a computation
    # XLA cannot drop, so each becomes a buffer of its own (and page ids stay inside the cache).
    tables = jnp.clip(block_tables.astype(jnp.int32), 0, k_cache.shape[0] - 1)
    lens = jnp.maximum(seq_lens.astype(jnp.int32), 0)
    out = _call(work, q.reshape(t, k_heads, g, h), k_cache, v_cache, tables, lens,
                jnp.maximum(qsl, 0), block_kv=block_kv, stages=stages, scale=scale,
                pingpong=pingpong)
    return out.reshape(t, n, h)


__all__ = ["available", "paged_prefill_attention_mgpu", "paged_prefill_mgpu_reference", "smem_bytes", "supported"]
