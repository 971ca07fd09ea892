"""The skinny-matmul kernel (interpret mode on CPU) against its jnp reference, its launch-parameter
choice, and the model's forward with it equal to the forward with XLA's GEMMs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import skinny_matmul, skinny_matmul_reference, supports
from pallas_kernels.tuning import MATMUL_TABLE, matmul_params

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("m", [1, 5, 16, 17, 64])
@pytest.mark.parametrize("k,n,block_n,block_k,splits", [
    (256, 128, 64, 64, 1),      # several K steps, two column tiles
    (512, 256, 128, 64, 2),     # fp32 partials summed after the kernel
    (384, 96, 32, 32, 4),       # K and N not powers of two
    (448, 64, 32, 64, 3),       # 7 K pieces over 3 splits: 2, 2, 3 (one masked step for two)
    (320, 64, 64, 64, 5),       # as many splits as pieces
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_skinny_matmul_matches_reference(m, k, n, block_n, block_k, splits, dtype):
    """Row counts below, at and across the 16-row tile (1, 5, 17) exercise the masked rows."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, n)) * 0.05, dtype)
    got = skinny_matmul(x, w, block_n=block_n, block_k=block_k, splits=splits, interpret=not ON_GPU)
    want = skinny_matmul_reference(x, w)
    assert got.shape == (m, n) and got.dtype == x.dtype
    # fp32 accumulation both ways; only the order differs, so at most a rounding of the output
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_skinny_matmul_rejects_what_it_does_not_take():
    x = jnp.zeros((65, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not fit"):
        skinny_matmul(x, jnp.zeros((256, 128), jnp.bfloat16), interpret=True)   # 65 rows
    assert not supports(4, 200, 128, block_n=64, block_k=64, splits=1)   # K % block_k
    assert not supports(4, 256, 100, block_n=64, block_k=64, splits=1)   # N % block_n
    assert not supports(4, 256, 128, block_n=64, block_k=64, splits=1, dtype=jnp.float32)
    assert supports(64, 256, 128, block_n=64, block_k=64, splits=4)
    assert supports(64, 448, 128, block_n=64, block_k=64, splits=3)       # 7 pieces, uneven
    assert not supports(64, 256, 128, block_n=64, block_k=64, splits=5)   # more splits than pieces
    assert supports(8, 256, 256, block_n=64, block_k=64, splits=1, glu=True)
    assert not supports(8, 256, 256, block_n=64, block_k=64, splits=2, glu=True)   # whole sums
    assert not supports(8, 256, 256, block_n=16, block_k=64, splits=1, glu=True)   # 8-col halves


def test_matmul_params_table_and_default():
    # the default (shapes the table lacks) gives every SM about two programs, as far as K divides
    bn, bk, splits, _, _ = matmul_params("NVIDIA H100 80GB HBM3", 64, 3584, 3072)
    assert (bn, bk) == (64, 128) and splits == 4   # 192 programs; 8 splits would not divide K
    assert matmul_params("NVIDIA H100 80GB HBM3", 64, 3584, 3072, tuned_only=True) is None
    bn, bk, splits, _, _ = matmul_params("NVIDIA H100 80GB HBM3", 64, 4096, 4096)
    assert 4096 // bn * splits >= 2 * 132 and 4096 // bn * splits // 2 < 2 * 132
    assert matmul_params("NVIDIA H100 80GB HBM3", 65, 3584, 3584) is None   # too many rows
    assert matmul_params("NVIDIA H100 80GB HBM3", 8, 3584, 100) is None     # no tile divides N
    assert matmul_params("NVIDIA H100 80GB HBM3", 8, 3584, 3584, tuned_only=True,
                         dtype="float32") is None
    # entries claim "faster than XLA" for the card measured: not for other H100 variants
    assert matmul_params("NVIDIA H100 80GB HBM3", 64, 3584, 18944, tuned_only=True) is not None
    assert matmul_params("NVIDIA H100 PCIe", 64, 3584, 18944, tuned_only=True) is None
    # every table entry is taken by the kernel at its rows tile
    for (card, rows, k, n), params in MATMUL_TABLE.items():
        assert matmul_params(f"NVIDIA {card}", rows, k, n, tuned_only=True) == params
        assert matmul_params("some other GPU", rows, k, n, tuned_only=True) is None


def test_model_forward_with_skinny_matmul_equals_xla(monkeypatch):
    """Same greedy tokens through the whole tiny model (bf16) with JAXSERVE_SKINNY_MATMUL=1
    (the kernel for every projection of the decode steps, the SwiGLU in its epilogue) and =0
    (XLA's GEMMs)."""
    import pallas_kernels.skinny_matmul as kernel_module
    from tests.engine_fixtures import greedy_with_env

    traced = []
    real = kernel_module.skinny_matmul
    monkeypatch.setattr(kernel_module, "skinny_matmul",
                        lambda *a, **k: traced.append(k.get("glu", False)) or real(*a, **k))
    outs = {}
    for flag in ("0", "1"):
        traced.clear()
        outs[flag] = greedy_with_env(monkeypatch, "JAXSERVE_SKINNY_MATMUL", flag, jnp.bfloat16)
        assert bool(traced) == (flag == "1")
        assert (True in traced) == (flag == "1")   # the MLP's SwiGLU ran in the kernel's epilogue
    # the epilogue switched off: the kernel still runs, the SwiGLU goes back to XLA
    traced.clear()
    monkeypatch.setenv("JAXSERVE_SKINNY_GLU", "0")
    outs["no_glu"] = greedy_with_env(monkeypatch, "JAXSERVE_SKINNY_MATMUL", "1", jnp.bfloat16)
    assert traced and True not in traced
    for other in ("1", "no_glu"):
        for (ids0, lp0), (ids1, lp1) in zip(outs["0"], outs[other]):
            assert ids0 == ids1
            for a, b in zip(lp0, lp1):
                np.testing.assert_allclose([x.logprob for _, x in a], [x.logprob for _, x in b],
                                           rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("m", [1, 7, 64])
@pytest.mark.parametrize("k,f,block_n,block_k", [(256, 128, 64, 64), (384, 96, 64, 32)])
def test_skinny_glu_matches_reference(m, k, f, block_n, block_k):
    """silu(x @ gate) * (x @ up) from the fused [K, 2F] weight; F not a power of two included."""
    rng = np.random.default_rng(m + k + f)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(k, 2 * f)) * 0.05, jnp.bfloat16)
    got = skinny_matmul(x, w, block_n=block_n, block_k=block_k, glu=True, interpret=not ON_GPU)
    want = skinny_matmul_reference(x, w, glu=True)
    assert got.shape == (m, f) and got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="glu=True"):   # the activation needs whole sums
        skinny_matmul(x, w, block_n=block_n, block_k=block_k, splits=2, glu=True, interpret=True)
