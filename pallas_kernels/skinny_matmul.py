"""A matmul for few rows against a large weight: x [M, K] @ w [K, N] with M <= 64 (decode steps).

At decode batch sizes a projection is a weight read: the activation is a few KB, the weight tens
to hundreds of MB. XLA's GEMMs read the Qwen2.5-7B shapes at 57-86% of the HBM ceiling at 64 rows
and the tensor-parallel halves at 38-68% (docs/benchmarks/2026-11-to-12.md, "the decode matmuls"): too few
output tiles to keep every SM streaming, and the tile shapes chosen for compute. This kernel
streams the weight instead. Grid (N / block_n column tiles, splits over K): each program walks its
[~K / splits, block_n] slab of the weight `block_k` rows at a time (Triton pipelines the loads
over `num_stages`; the splits share K's block_k pieces as evenly as they go, one more for some
where they do not divide), multiplies each slab piece by the matching [Mp, block_k] columns of the
activation (rows padded to a power of two >= 16 by masked loads, for the tensor-core dot; nothing
past M is read or written) and accumulates in fp32. One split stores the result in the output
dtype; several store fp32 partials [splits, M, N] that a jnp epilogue sums (a small XLA fusion,
~1.5 µs).

SwiGLU variant (`glu=True`, one split): the weight is the MLP's fused gate/up [K, 2F]; a program
accumulates a gate tile and the matching up tile and stores silu(gate) * up [M, F], so the [M, 2F]
product never goes to memory and XLA's activation kernels do not run.

Layers: `_skinny_kernel` (body) -> `_skinny_call` (pallas_call: grid, BlockSpecs) ->
`skinny_matmul` (jitted, static tuning knobs, `interpret`) -> `skinny_matmul_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_ROWS = 64


def _skinny_kernel(x_ref, w_ref, o_ref, *, rows: int, block_n: int, block_k: int, total: int,
                   splits: int, glu: bool):
    # x_ref: [M, K] the activation; w_ref: [K, N] the weight; o_ref: [M, N], the output (one
    # split) or this split's fp32 partial. The K rows are `total` pieces of block_k; split s of
    # S = splits takes pieces [s*total//S, (s+1)*total//S) in ceil(total / S) iterations (where
    # S does not divide total, an iteration past its split's end loads nothing: masked).
    # Program (j, s) computes columns [j*block_n, (j+1)*block_n) over its split's pieces.
    # glu: w_ref is [K, 2F] (gate columns, then up columns), o_ref [M, F]; program j computes
    # block_n gate and block_n up columns and stores silu(gate) * up.
    from jax.experimental.pallas import triton as plgpu

    j = pl.program_id(0)
    s = pl.program_id(1)
    m = x_ref.shape[0]
    r = jnp.arange(rows, dtype=jnp.int32)
    row_mask = (r < m)[:, None]
    even = total % splits == 0
    steps = -(-total // splits)
    first = s * steps if even else s * total // splits
    end = (s + 1) * total // splits
    n0 = pl.multiple_of(j * block_n, block_n)
    halves = (0, w_ref.shape[1] // 2) if glu else (0,)

    def step(i, accs):
        piece = first + i if even else jnp.minimum(first + i, total - 1)
        valid = None if even else first + i < end        # (uneven: past the split's end)
        k = pl.multiple_of(piece * block_k, block_k)
        a = plgpu.load(x_ref.at[pl.ds(0, rows), pl.ds(k, block_k)],
                       mask=row_mask if even else row_mask & valid, other=0)

        def weight(h):
            tile = w_ref.at[pl.ds(k, block_k), pl.ds(h + n0, block_n)]
            if even:
                return tile[...]
            return plgpu.load(tile, mask=jnp.broadcast_to(valid, (block_k, block_n)), other=0)
        return tuple(acc + jnp.dot(a, weight(h), preferred_element_type=jnp.float32)
                     for acc, h in zip(accs, halves))

    zeros = tuple(jnp.zeros((rows, block_n), jnp.float32) for _ in halves)
    accs = jax.lax.fori_loop(0, steps, step, zeros)
    if glu:
        # each product rounded to the activation dtype first, as two separate matmuls would be;
        # then the activation in fp32, rounded once
        gate, up = (acc.astype(x_ref.dtype).astype(jnp.float32) for acc in accs)
        out = gate * jax.nn.sigmoid(gate) * up
    else:
        out = accs[0]
    plgpu.store(o_ref.at[pl.ds(0, rows), pl.ds(n0, block_n)], out.astype(o_ref.dtype),
                mask=row_mask)


def _skinny_call(x, w, *, block_n, block_k, splits, num_warps, num_stages, out_dtype, glu,
                 interpret):
    m, k = x.shape
    n = w.shape[1] // 2 if glu else w.shape[1]     # output columns
    rows = max(16, 1 << (m - 1).bit_length())
    kernel = functools.partial(_skinny_kernel, rows=rows, block_n=block_n, block_k=block_k,
                               total=k // block_k, splits=splits, glu=glu)
    whole = lambda shape: pl.BlockSpec(shape, lambda j, s: (0,) * len(shape))
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
        out_spec = whole((m, n))
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
        out_spec = pl.BlockSpec((None, m, n), lambda j, s: (s, 0, 0))   # split s's partial
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(n // block_n, splits),
        in_specs=[whole((m, k)), whole(w.shape)],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=compiler_params,
        interpret=interpret,
        name="jaxserve_skinny_glu" if glu else "jaxserve_skinny_matmul",
    )(x, w)
    if splits > 1:
        out = out.sum(axis=0).astype(out_dtype)
    return out


DTYPES = (jnp.bfloat16, jnp.float16)   # (fp32 would go through the tensor cores as tf32)


def supports(m: int, k: int, n: int, *, block_n: int, block_k: int, splits: int,
             dtype=jnp.bfloat16, glu: bool = False) -> bool:
    """Whether the kernel takes x [m, k] @ w [k, n] with these knobs: a 16-bit float dtype, at
    most MAX_ROWS rows, N a multiple of block_n, K a multiple of block_k with at least `splits`
    pieces (power-of-two blocks, >= 16 for the dot; the splits need not divide the pieces
    evenly). glu: one split, and each half of N in tiles of block_n // 2."""
    if glu:
        return (splits == 1 and n % 2 == 0
                and supports(m, k, n // 2, block_n=block_n // 2, block_k=block_k, splits=1,
                             dtype=dtype))
    pow2 = lambda v: v >= 16 and v & (v - 1) == 0
    return (jnp.dtype(dtype) in DTYPES and 1 <= m <= MAX_ROWS and pow2(block_n)
            and pow2(block_k) and n % block_n == 0 and k % block_k == 0
            and 1 <= splits <= k // block_k)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps",
                                             "num_stages", "glu", "interpret"))
def skinny_matmul(
    x: jax.Array,        # [M, K] M <= MAX_ROWS
    w: jax.Array,        # [K, N]; glu: [K, 2F], the gate's columns then the up projection's
    *,
    block_n: int = 64,
    block_k: int = 128,
    splits: int = 1,
    num_warps: int = 4,
    num_stages: int = 4,
    glu: bool = False,
    interpret: bool = False,
) -> jax.Array:          # [M, N] in x's dtype (fp32 accumulation); glu: silu(x @ gate) * (x @ up)
    """x @ w, or with `glu` the SwiGLU of the fused gate/up projection (one split only: the
    activation needs whole sums). The tuning knobs describe the plain product's column tiles:
    with `glu` a program takes block_n // 2 gate and as many up columns, the same bytes."""
    m, k = x.shape
    n = w.shape[1]
    if not supports(m, k, n, block_n=block_n, block_k=block_k, splits=splits, dtype=x.dtype,
                    glu=glu):
        raise ValueError(f"skinny_matmul: {x.dtype} [{m}, {k}] @ [{k}, {n}] does not fit "
                         f"block_n={block_n}, block_k={block_k}, splits={splits}, glu={glu} "
                         "(see supports())")
    return _skinny_call(x, w.astype(x.dtype), block_n=block_n // 2 if glu else block_n,
                        block_k=block_k, splits=splits, num_warps=num_warps,
                        num_stages=num_stages, out_dtype=x.dtype, glu=glu, interpret=interpret)


def skinny_matmul_reference(x: jax.Array, w: jax.Array, *, glu: bool = False) -> jax.Array:
    """Pure jnp: x @ w with fp32 accumulation, in x's dtype; glu: silu(gate) * up of the two
    halves of the product's columns (the activation in fp32, rounded once)."""
    y = jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    if not glu:
        return y
    gate, up = (h.astype(jnp.float32) for h in jnp.split(y, 2, axis=1))
    return (jax.nn.silu(gate) * up).astype(x.dtype)


__all__ = ["DTYPES", "MAX_ROWS", "skinny_matmul", "skinny_matmul_reference", "supports"]
