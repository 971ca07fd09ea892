"""The Pallas paged decode kernel (interpret mode on CPU) against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import (paged_decode_attention, paged_decode_fused,
                                        paged_decode_fused_reference, paged_decode_reference)
from tests.kernel_cases import decode_step_cache, paged_cache

ON_GPU = jax.default_backend() == "gpu"
TOL = 2e-2 if ON_GPU else 2e-5  # the GPU kernel's fp32 dots may run as TF32


def _case(rng, s, n, k, h, b, lens, dtype=np.float32):
    kc, vc, tables = paged_cache(rng, lens, k, h, b, spare_pages=3)
    q = rng.normal(size=(s, n, h)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(kc), cast(vc), jnp.asarray(tables), jnp.asarray(np.array(lens, np.int32))


@pytest.mark.parametrize("n,k", [(4, 4), (8, 2), (7, 1), (28, 4)])
@pytest.mark.parametrize("b", [16, 32])
def test_decode_kernel_matches_reference(n, k, b):
    rng = np.random.default_rng(n * 100 + k * 10 + b)
    lens = [1, b - 1, b, b + 1, 3 * b + 5, 0]   # crossing page boundaries, one padded (empty) seq
    q, kc, vc, tables, seq_lens = _case(rng, len(lens), n, k, 64, b, lens)
    want = paged_decode_reference(q, kc, vc, tables, seq_lens, scale=0.125)
    for splits, ppb in [(1, 2), (3, 1), (2, 4)]:
        got = paged_decode_attention(q, kc, vc, tables, seq_lens, scale=0.125, splits=splits,
                                     pages_per_block=ppb, interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)
        assert np.all(np.asarray(got)[-1] == 0)


def test_decode_kernel_window_and_softcap():
    rng = np.random.default_rng(3)
    lens = [40, 9, 17]
    q, kc, vc, tables, seq_lens = _case(rng, 3, 8, 2, 64, 16, lens)
    for window, cap in [(10, None), (None, 3.0), (5, 2.0)]:
        want = paged_decode_reference(q, kc, vc, tables, seq_lens, scale=0.2, sliding_window=window,
                                      soft_cap=cap)
        got = paged_decode_attention(q, kc, vc, tables, seq_lens, scale=0.2, sliding_window=window,
                                     soft_cap=cap, splits=2, pages_per_block=2, interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)


def test_reference_agrees_with_engine_reference():
    """The kernel file's reference and jaxserve's ragged reference compute the same function."""
    from jaxserve.attention import AttentionSpec, build_metadata, paged_attention_reference

    rng = np.random.default_rng(5)
    lens = [7, 33, 16]
    q, kc, vc, tables, seq_lens = _case(rng, 3, 8, 2, 64, 16, lens)
    meta, pos = build_metadata([(np.asarray(tables[i]).tolist(), n - 1, 1) for i, n in enumerate(lens)],
                               block_size=16, num_tokens=3, num_seqs=3, max_blocks_per_seq=tables.shape[1])
    ours = paged_attention_reference(q, kc, vc, meta, jnp.asarray(pos), AttentionSpec(scale=0.125))
    theirs = paged_decode_reference(q, kc, vc, tables, seq_lens, scale=0.125)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_engine_pallas_backend_equals_reference():
    """Greedy engine output with attention_backend="pallas" equals "reference" (tiny model;
    interpret mode on CPU, the real kernel on GPU)."""
    from jaxserve import LLM, SamplingParams
    from tests.engine_fixtures import tiny_loaded

    prompts = [{"prompt_token_ids": list(range(2, 2 + n))} for n in (1, 7, 20)]
    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = {}
    for backend in ("reference", "pallas"):
        llm = LLM(tiny_loaded(seed=9), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                  block_size=8, num_kv_blocks=40, attention_backend=backend,
                  compilation_cache_dir=None, show_progress=False)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
        assert llm.get_stats()["compiles_after_warmup"] == 0
    assert outs["pallas"] == outs["reference"]


def test_decode_step_with_fused_sampler_equals_separate_calls(monkeypatch):
    """A decode step's forward and sampler as one executable (the default with the decode kernel)
    give the tokens and logprobs of the two executables called one after the other, for greedy,
    seeded random and top-p + logprobs requests together."""
    from jaxserve import LLM, SamplingParams
    from tests.engine_fixtures import tiny_loaded

    prompts = [{"prompt_token_ids": list(range(2, 2 + n))} for n in (3, 11, 5)]
    params = [SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0.7, top_p=0.8, seed=6, logprobs=2, max_tokens=7,
                             ignore_eos=True)]
    outs, lps, kinds = {}, {}, {}
    for fused in ("1", "0"):
        monkeypatch.setenv("JAXSERVE_FUSED_DECODE_SAMPLER", fused)
        llm = LLM(tiny_loaded(seed=9), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                  block_size=8, num_kv_blocks=40, attention_backend="pallas",
                  compilation_cache_dir=None, show_progress=False)
        res = [llm.generate([p], sp)[0].outputs[0] for p, sp in zip(prompts, params)]
        res += [o.outputs[0] for o in llm.generate(prompts, params)]   # all three in one batch
        outs[fused] = [(o.token_ids, [sorted(d) for d in (o.logprobs or [])]) for o in res]
        lps[fused] = [v.logprob for o in res for d in (o.logprobs or []) for _, v in sorted(d.items())]
        kinds[fused] = {k[0] for k in llm.engine.runner._exec}
        assert llm.get_stats()["compiles_after_warmup"] == 0
    assert outs["1"] == outs["0"]
    assert len(lps["1"]) >= 2 * 7 * 2 and np.allclose(lps["1"], lps["0"], atol=1e-5)
    assert "decode_sample" in kinds["1"] and "decode" not in kinds["1"]
    assert "decode" in kinds["0"] and "decode_sample" not in kinds["0"]


def _fused_case(rng, n, k, h, b, lens, dtype=np.float32):
    kc, vc, tables = decode_step_cache(rng, lens, k, h, b)
    qkv = rng.normal(size=(len(lens), k, n // k + 2, h)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(qkv), cast(kc), cast(vc), jnp.asarray(tables), jnp.asarray(np.array(lens, np.int32))


@pytest.mark.parametrize("n,k,b", [(4, 4, 16), (8, 2, 32), (7, 1, 16), (28, 4, 32), (16, 2, 16)])
def test_fused_decode_kernel_matches_reference(n, k, b):
    """KV write fused into the decode kernel: same output and the same caches (the new key/value
    in slot seq_len - 1, nothing written for padded sequences, NaN elsewhere untouched) as the
    jnp scatter + attention, over GQA 1/4/7/8, lengths at and across page boundaries."""
    rng = np.random.default_rng(n * 1000 + k * 10 + b)
    lens = [1, b - 1, b, b + 1, 3 * b + 5, 0, 2 * b]
    args = _fused_case(rng, n, k, 64, b, lens)
    want_o, want_k, want_v = paged_decode_fused_reference(*args, scale=0.125)
    for splits, ppb in [(1, 2), (3, 1), (2, 4)]:
        got_o, got_k, got_v = paged_decode_fused(*args, scale=0.125, splits=splits,
                                                 pages_per_block=ppb, interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), rtol=TOL, atol=TOL)
        np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))   # NaN == NaN here
        np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
        assert np.all(np.asarray(got_o)[lens.index(0)] == 0)


def test_decode_kernels_tiles_past_the_table_end():
    """Three-page tables walked four pages at a time: the kernels clamp the missing pages to the
    table's last entry and mask them (the tables are not padded), with one split (the kernel's
    own masked row stores into [S, N, H]) and two (partials merged in jnp)."""
    rng = np.random.default_rng(3)
    b = 16
    lens = [2 * b + 3, 5, 0, 3 * b]
    q, kc, vc, tables, seq_lens = _case(rng, len(lens), 28, 4, 64, b, lens)
    assert tables.shape[1] == 3
    want = paged_decode_reference(q, kc, vc, tables, seq_lens, scale=0.125)
    args = _fused_case(rng, 28, 4, 64, b, lens)
    want_o, want_k, _ = paged_decode_fused_reference(*args, scale=0.125)
    for splits in (1, 2):
        got = paged_decode_attention(q, kc, vc, tables, seq_lens, scale=0.125, splits=splits,
                                     pages_per_block=4, interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)
        got_o, got_k, _ = paged_decode_fused(*args, scale=0.125, splits=splits, pages_per_block=4,
                                             interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got_o), np.asarray(want_o), rtol=TOL, atol=TOL)
        np.testing.assert_array_equal(np.asarray(got_k), np.asarray(want_k))


def test_fused_decode_kernel_window_softcap_bf16():
    rng = np.random.default_rng(11)
    lens = [40, 9, 17, 0]
    for dtype, tol in [(np.float32, TOL), (jnp.bfloat16, 3e-2)]:
        args = _fused_case(rng, 8, 2, 64, 16, lens, dtype)
        for window, cap in [(10, None), (None, 3.0), (5, 2.0)]:
            want = paged_decode_fused_reference(*args, scale=0.2, sliding_window=window, soft_cap=cap)
            got = paged_decode_fused(*args, scale=0.2, sliding_window=window, soft_cap=cap, splits=2,
                                     pages_per_block=2, interpret=not ON_GPU)
            np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                                       rtol=tol, atol=tol)
            np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))


def test_fused_reference_equals_scatter_then_decode():
    """The fused reference is the engine's old path: write_kv_reference, then the decode kernel's
    reference."""
    from jaxserve.attention import split_qkv, write_kv_reference

    rng = np.random.default_rng(12)
    lens = [5, 16, 33, 0]
    qkv, kc, vc, tables, seq_lens = _fused_case(rng, 8, 2, 64, 16, lens)
    q, k, v = split_qkv(qkv)
    t = np.maximum(np.array(lens) - 1, 0)
    slots = np.where(np.array(lens) > 0, np.asarray(tables)[np.arange(4), t // 16] * 16 + t % 16, 0)
    k2, v2 = write_kv_reference(kc, vc, k, v, jnp.asarray(slots, jnp.int32))
    want = paged_decode_reference(q, k2, v2, tables, seq_lens, scale=0.125)
    got, k3, _ = paged_decode_fused_reference(qkv, kc, vc, tables, seq_lens, scale=0.125)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    real = np.array(lens) > 0
    np.testing.assert_array_equal(np.asarray(k3)[np.asarray(tables)[real, t[real] // 16], t[real] % 16],
                                  np.asarray(k)[real])


def test_kv_layout_probe_streams_the_same_rows_as_its_reference():
    """experiments/probe_kv_layout.py (a GPU experiment: page gathers by cache layout), interpret mode."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "experiments" / "probe_kv_layout.py"
    spec = importlib.util.spec_from_file_location("probe_kv_layout", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    probe.check_interpret()
