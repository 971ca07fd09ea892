"""Residual add + RMSNorm in one kernel (the pre-norm transformer's `x = x + h; y = norm(x)`).

XLA runs this as three kernels per norm (the add, the sum-of-squares reduction, the scaling), each
reading and writing the [T, D] activations; at decode batch sizes each is a ~1.3 µs launch-bound
kernel, 4 of them per layer more than needed. One program per token row: it loads the row of both
inputs (D padded to a power of two with masked loads, so any hidden size works), writes the sum
(the new residual, rounded to the activation dtype exactly like XLA's add) and the normalised,
scaled row. Sum of squares and the rsqrt in fp32, as the model's jnp RMSNorm.

Layers: `_add_rms_norm_kernel` (body) -> `_add_rms_norm_call` (pallas_call) -> `add_rms_norm`
(jitted, static knobs, `interpret`) -> `add_rms_norm_reference` (pure jnp).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _add_rms_norm_kernel(h_ref, r_ref, w_ref, o_ref, ro_ref, *, eps: float, width: int):
    # h_ref, r_ref, o_ref, ro_ref: [D] one token row; w_ref: [D]. Rows are loaded `width` (D
    # rounded up to a power of two) wide with the columns >= D masked off.
    from jax.experimental.pallas import triton as plgpu

    d = h_ref.shape[0]
    cols = jnp.arange(width, dtype=jnp.int32)
    mask = cols < d
    h = plgpu.load(h_ref.at[cols], mask=mask, other=0.0)
    r = plgpu.load(r_ref.at[cols], mask=mask, other=0.0)
    w = plgpu.load(w_ref.at[cols], mask=mask, other=0.0)
    s = (h.astype(jnp.float32) + r.astype(jnp.float32)).astype(h.dtype)   # the new residual
    sf = s.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(jnp.where(mask, sf * sf, 0.0)) / d + eps)
    y = w * (sf * inv).astype(h.dtype)
    plgpu.store(ro_ref.at[cols], s, mask=mask)
    plgpu.store(o_ref.at[cols], y.astype(o_ref.dtype), mask=mask)


def _add_rms_norm_call(h, residual, weight, *, eps, num_warps, interpret):
    t, d = h.shape
    width = 1 << (d - 1).bit_length()
    kernel = functools.partial(_add_rms_norm_kernel, eps=eps, width=width)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        compiler_params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    row = pl.BlockSpec((None, d), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        grid=(t,),
        in_specs=[row, row, pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t, d), h.dtype), jax.ShapeDtypeStruct((t, d), h.dtype)],
        compiler_params=compiler_params,
        interpret=interpret,
        name="jaxserve_add_rms_norm",
    )(h, residual, weight)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(
    h: jax.Array,          # [T, D] the block's output (or the embeddings)
    residual: jax.Array,   # [T, D] the residual stream so far (zeros before the first layer)
    weight: jax.Array,     # [D]
    *,
    eps: float,
    num_warps: int = 4,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:   # (normalised [T, D], new residual h + residual [T, D])
    return tuple(_add_rms_norm_call(h, residual, weight.astype(h.dtype), eps=eps,
                                    num_warps=num_warps, interpret=interpret))


def add_rms_norm_reference(h, residual, weight, *, eps: float):
    """Pure jnp: the model's `x = h + residual; y = weight * rmsnorm(x)` (fp32 statistics)."""
    s = h + residual
    sf = s.astype(jnp.float32)
    sf = sf * jax.lax.rsqrt(jnp.mean(sf * sf, axis=-1, keepdims=True) + eps)
    return weight.astype(h.dtype) * sf.astype(h.dtype), s


__all__ = ["add_rms_norm", "add_rms_norm_reference"]
