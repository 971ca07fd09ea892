"""The Mosaic GPU ragged paged prefill kernel against the jnp reference: mixed prefill chunks and
decodes, shuffled page tables, NaN in unused slots and pages, padding tokens, GQA 1/4/7/8, page
sizes 16-128, head_dim 64/128, long cached prefixes (unmasked and masked tiles). Runs on Hopper
GPUs only: Mosaic GPU has no interpret mode for warp-specialised kernels, so on the CPU only the
lowering is checked (it catches layout and shape errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill_mgpu import (available, paged_prefill_attention_mgpu,
                                               paged_prefill_mgpu_reference as paged_prefill_reference,
                                               supported)
from tests.test_pallas_prefill import MIXED, _case


needs_hopper = pytest.mark.skipif(not available(), reason="Mosaic GPU kernel: needs a compute "
                                  "capability 9.x GPU (no interpret mode for it)")
TOL = 3e-2   # bf16 inputs and outputs


def _check(args, scale, **kw):
    want = paged_prefill_reference(*args, scale=scale)
    got = np.asarray(paged_prefill_attention_mgpu(*args, scale=scale, **kw), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=TOL, atol=TOL)
    return got


@needs_hopper
@pytest.mark.parametrize("n,k", [(4, 4), (8, 2), (28, 4), (8, 1), (9, 3)])   # (9, 3): SmolLM2
@pytest.mark.parametrize("b", [16, 32])
def test_mgpu_prefill_matches_reference(n, k, b):
    rng = np.random.default_rng(n * 100 + k * 10 + b)
    args = _case(rng, n, k, 128, b, MIXED, dtype=jnp.bfloat16)
    got = _check(args, 128 ** -0.5)
    assert np.all(got[-3:] == 0)   # padding tokens


@needs_hopper
@pytest.mark.parametrize("pingpong,stages,block_kv", [(True, 2, 128), (False, 2, 128), (True, 3, 64)])
def test_mgpu_prefill_long_prefix_and_pipeline(pingpong, stages, block_kv):
    """Chunks after long cached prefixes: several unmasked tiles, then diagonal ones; blocks whose
    two warpgroups split the boundary differently; a sequence whose last tile is mostly past its
    end (NaN slots and uncopied pages behind it)."""
    rng = np.random.default_rng(13)
    args = _case(rng, 28, 4, 128, 16, [(300, 50), (33, 2), (0, 200), (257, 1), (129, 130)],
                 dtype=jnp.bfloat16)
    _check(args, 128 ** -0.5, pingpong=pingpong, stages=stages, block_kv=block_kv)


@needs_hopper
@pytest.mark.parametrize("h,b", [(64, 64), (128, 128), (64, 16)])
def test_mgpu_prefill_head_dims_and_pages(h, b):
    rng = np.random.default_rng(h + b)
    args = _case(rng, 8, 2, h, b, [(120, 20), (0, 5), (255, 1), (0, 70)], dtype=jnp.bfloat16)
    _check(args, h ** -0.5)


@needs_hopper
def test_mgpu_prefill_fp16_and_one_long_chunk():
    rng = np.random.default_rng(7)
    args = _case(rng, 32, 8, 128, 16, [(0, 600)], pad_tokens=40, dtype=jnp.float16)
    got = _check(args, 128 ** -0.5)
    assert np.all(got[-40:] == 0)


@needs_hopper
def test_mgpu_prefill_takes_int_inputs_sliced_from_one_array():
    """As in the engine: lengths, query starts and tables are slices of one packed int32 array
    (views at offsets that are not 256-byte aligned unless the wrapper makes buffers of them)."""
    rng = np.random.default_rng(21)
    q, kc, vc, tables, lens, qsl = _case(rng, 28, 4, 128, 16, MIXED, dtype=jnp.bfloat16)
    s_, m = tables.shape
    packed = jnp.concatenate([jnp.arange(3, dtype=jnp.int32), lens, qsl, tables.reshape(-1)])

    @jax.jit
    def run(q, kc, vc, buf):
        o = 3
        return paged_prefill_attention_mgpu(q, kc, vc, buf[o + 2 * s_ + 1:].reshape(s_, m),
                                            buf[o:o + s_], buf[o + s_:o + 2 * s_ + 1],
                                            scale=128 ** -0.5)

    want = paged_prefill_reference(q, kc, vc, tables, lens, qsl, scale=128 ** -0.5)
    got = np.asarray(run(q, kc, vc, packed), np.float32)
    np.testing.assert_allclose(got, np.asarray(want, np.float32), rtol=TOL, atol=TOL)


def test_mgpu_supported_configurations():
    assert supported(jnp.bfloat16, 28, 4, 128, 16)
    assert supported(jnp.float16, 8, 1, 64, 128)
    assert not supported(jnp.float32, 28, 4, 128, 16)            # fp32: Triton kernel
    assert not supported(jnp.bfloat16, 28, 4, 96, 16)            # head_dim 96
    assert not supported(jnp.bfloat16, 28, 4, 128, 12)           # page not a multiple of 8
    assert not supported(jnp.bfloat16, 28, 4, 128, 16, sliding_window=64)
    assert not supported(jnp.bfloat16, 28, 4, 128, 16, soft_cap=30.0)
    assert supported(jnp.bfloat16, 28, 4, 128, 16, kv_dtype=jnp.bfloat16)
    assert not supported(jnp.bfloat16, 28, 4, 128, 16, kv_dtype=jnp.float16)   # mixed: Triton
    assert supported(jnp.bfloat16, 28, 4, 128, 16, block_kv=64, stages=3)
    # 3 stages of 128 keys at head_dim 128: 256 KiB of tiles (the GPU reported 264,312
    # bytes with barriers and alignment; a block may use 227 KiB)
    assert not supported(jnp.bfloat16, 28, 4, 128, 16, block_kv=128, stages=3)
    # every tuned or default launch shape fits
    from pallas_kernels.tuning import MGPU_PREFILL_TABLE, mgpu_prefill_params
    for (card, g, h, b) in MGPU_PREFILL_TABLE:
        block_kv, stages, _ = mgpu_prefill_params(card, g, h, b)
        assert supported(jnp.bfloat16, 4 * g, 4, h, b, block_kv=block_kv, stages=stages)
    assert mgpu_prefill_params("NVIDIA H100 80GB HBM3", 2, 64, 256)[0] == 256
    # the engine's and the benchmark's decision: the tuned parameters where the kernel runs here
    from pallas_kernels.tuning import mgpu_prefill_choice
    got = mgpu_prefill_choice("NVIDIA H200", jnp.bfloat16, 28, 4, 128, 16)
    assert got == ((128, 2, True) if available() else None)
    assert mgpu_prefill_choice("NVIDIA H200", jnp.float32, 28, 4, 128, 16) is None
    assert mgpu_prefill_choice("NVIDIA H200", jnp.bfloat16, 28, 4, 128, 16, soft_cap=30.0) is None
    assert mgpu_prefill_choice("NVIDIA H200", jnp.bfloat16, 28, 4, 128, 16,
                               kv_dtype=jnp.float8_e4m3fn) is None


def test_mgpu_prefill_refuses_mixed_dtypes():
    q = jnp.zeros((4, 8, 64), jnp.bfloat16)
    kc = jnp.zeros((3, 16, 2, 64), jnp.float16)
    ints = jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32), jnp.asarray([0, 1], jnp.int32)
    with pytest.raises(ValueError, match="one dtype"):
        paged_prefill_attention_mgpu(q, kc, kc, *ints, scale=0.125)


@pytest.mark.parametrize("n,k,h,b", [(28, 4, 128, 16), (8, 1, 64, 128), (4, 4, 128, 32)])
def test_mgpu_prefill_lowers_for_cuda(n, k, h, b):
    """On any machine: the kernel lowers to a Mosaic GPU module for CUDA (no GPU needed), so
    shape and layout errors show up in CI."""
    s, m, t = 3, 8, 40
    q = jax.ShapeDtypeStruct((t, n, h), jnp.bfloat16)
    kc = jax.ShapeDtypeStruct((s * m + 1, b, k, h), jnp.bfloat16)
    f = jax.jit(lambda *a: paged_prefill_attention_mgpu(*a, scale=h ** -0.5))
    low = f.trace(q, kc, kc, jax.ShapeDtypeStruct((s, m), jnp.int32),
                  jax.ShapeDtypeStruct((s,), jnp.int32),
                  jax.ShapeDtypeStruct((s + 1,), jnp.int32)).lower(lowering_platforms=("cuda",))
    text = low.as_text()
    assert "mosaic_gpu" in text and "wgmma" in text


@needs_hopper
def test_engine_mosaic_prefill_equals_reference(monkeypatch):
    """An fp16 engine with attention_backend="pallas" runs its prefill steps through the Mosaic GPU
    kernel (counted) and gives the greedy tokens of the jnp reference backend: prompts of 1 to 150
    tokens (several K/V tiles), chunked prefill with decodes mixed in, a prefix-cache hit. fp16,
    not bf16: with bf16's 8-bit mantissa this random tiny model's greedy choices already differ
    between the reference and the Triton-lowered kernel (CPU, interpret mode), which round P to
    the cache dtype before P V as every flash kernel does; with fp16 they agree."""
    import pallas_kernels.paged_prefill_mgpu as mgpu_mod
    from jaxserve import LLM, SamplingParams
    from tests.engine_fixtures import tiny_loaded

    calls = []
    real = mgpu_mod.paged_prefill_attention_mgpu

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(mgpu_mod, "paged_prefill_attention_mgpu", counting)
    base = list(range(2, 80))
    prompts = [{"prompt_token_ids": base[:n]} for n in (1, 9, 40)]
    prompts += [{"prompt_token_ids": base + list(range(5, 77))}, {"prompt_token_ids": base + [3]}]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for backend in ("reference", "pallas"):
        # head_dim 64, group 4
        llm = LLM(tiny_loaded(seed=4, dtype=jnp.float16, hidden_size=256, num_attention_heads=4,
                              num_key_value_heads=1, intermediate_size=256),
                  max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, block_size=16,
                  num_kv_blocks=80, attention_backend=backend, compilation_cache_dir=None,
                  show_progress=False)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert llm.get_stats()["compiles_after_warmup"] == 0
    assert calls, "the pallas backend did not call the Mosaic GPU prefill kernel"
    assert outs["pallas"] == outs["reference"]
