"""The fused residual-add + RMSNorm kernel (interpret mode on CPU) against its jnp reference, and
the model's forward with it equal to the forward without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.rms_norm import add_rms_norm, add_rms_norm_reference

ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("t,d", [(1, 64), (5, 576), (3, 3584), (2, 100)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_add_rms_norm_matches_reference(t, d, dtype):
    """Hidden sizes that are not powers of two (576, 3584, 100) exercise the masked columns."""
    rng = np.random.default_rng(t * 1000 + d)
    h, r = (jnp.asarray(rng.normal(size=(t, d)) * 3, dtype) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(d,)), dtype)
    out, res = add_rms_norm(h, r, w, eps=1e-6, interpret=not ON_GPU)
    want_out, want_res = add_rms_norm_reference(h, r, w, eps=1e-6)
    np.testing.assert_array_equal(np.asarray(res, np.float32), np.asarray(want_res, np.float32))
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32),
                               rtol=tol, atol=tol)


def test_model_forward_with_fused_norm_equals_xla(monkeypatch):
    """Same logits through the whole tiny model with JAXSERVE_FUSED_NORM=1 (kernel) and =0."""
    import pallas_kernels.rms_norm as kernel_module
    from tests.engine_fixtures import greedy_with_env

    traced = []
    real = kernel_module.add_rms_norm
    monkeypatch.setattr(kernel_module, "add_rms_norm", lambda *a, **k: traced.append(1) or real(*a, **k))
    outs = {}
    for flag in ("0", "1"):
        traced.clear()
        outs[flag] = greedy_with_env(monkeypatch, "JAXSERVE_FUSED_NORM", flag)
        assert bool(traced) == (flag == "1")
    for (ids0, lp0), (ids1, lp1) in zip(outs["0"], outs["1"]):
        assert ids0 == ids1
        for a, b in zip(lp0, lp1):
            assert [t for t, _ in a] == [t for t, _ in b]
            np.testing.assert_allclose([x.logprob for _, x in a], [x.logprob for _, x in b],
                                       rtol=1e-4, atol=1e-4)
