"""The Pallas paged decode kernel (interpret mode on CPU) against its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_decode import paged_decode_attention, paged_decode_reference
from tests.kernel_cases import paged_cache

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
