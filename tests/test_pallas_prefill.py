"""The ragged paged prefill kernel (interpret mode on CPU) against its jnp reference: mixed
prefill chunks + decodes, shuffled page tables, NaN in unused slots, empty and padded sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.paged_prefill import (paged_prefill_attention, paged_prefill_reference,
                                          prefill_flops, work_items)
from tests.kernel_cases import paged_cache

ON_GPU = jax.default_backend() == "gpu"


def _tol(dtype):
    if dtype == jnp.bfloat16:
        return 3e-2
    return 2e-2 if ON_GPU else 2e-5   # the GPU kernel's fp32 dots may run as TF32


def _case(rng, n, k, h, b, seqs, pad_tokens=3, dtype=jnp.float32):
    """seqs: (cached tokens, new tokens) per sequence. K/V of every token (new ones included) are
    in the cache, as after the engine's write; unused slots hold NaN."""
    lens = [c + x for c, x in seqs]
    kc, vc, tables = paged_cache(rng, lens, k, h, b)
    qsl = np.concatenate([[0], np.cumsum([x for _, x in seqs])]).astype(np.int32)
    t = int(qsl[-1]) + pad_tokens
    q = rng.normal(size=(t, n, h)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)
    return (cast(q), cast(kc), cast(vc), jnp.asarray(tables), jnp.asarray(np.array(lens, np.int32)),
            jnp.asarray(qsl))


MIXED = [(0, 17), (5, 1), (30, 9), (0, 0), (15, 1), (0, 3)]   # prefill, decode, chunk, empty, ...


@pytest.mark.parametrize("n,k", [(4, 4), (8, 2), (7, 1), (8, 1)])
@pytest.mark.parametrize("b", [16, 32])
def test_prefill_kernel_matches_reference(n, k, b):
    rng = np.random.default_rng(n * 100 + k * 10 + b)
    args = _case(rng, n, k, 64, b, MIXED)
    want = paged_prefill_reference(*args, scale=0.125)
    for block_q, ppb in [(None, 2), (4, 1)]:
        got = paged_prefill_attention(*args, scale=0.125, block_q=block_q, pages_per_block=ppb,
                                      interpret=not ON_GPU)
        got = np.asarray(got)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, np.asarray(want), rtol=_tol(jnp.float32), atol=_tol(jnp.float32))
        assert np.all(got[-3:] == 0)   # padding tokens


def test_prefill_kernel_bf16_head_dim_128_page_64():
    rng = np.random.default_rng(11)
    args = _case(rng, 8, 2, 128, 64, [(0, 70), (100, 1), (3, 20)], dtype=jnp.bfloat16)
    want = paged_prefill_reference(*args, scale=128 ** -0.5)
    got = paged_prefill_attention(*args, scale=128 ** -0.5, interpret=not ON_GPU)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=_tol(jnp.bfloat16), atol=_tol(jnp.bfloat16))


def test_prefill_kernel_long_prefix_unmasked_tiles():
    """Chunks after a long cached prefix: each query block first runs the unmasked tiles (keys
    before its first query), then the masked diagonal ones; blocks of one chunk split the two
    differently (the boundary moves with the block's first position)."""
    rng = np.random.default_rng(13)
    args = _case(rng, 8, 2, 64, 16, [(70, 40), (33, 2), (0, 50)])
    want = paged_prefill_reference(*args, scale=0.125)
    for block_q, ppb in [(2, 1), (8, 2)]:
        got = paged_prefill_attention(*args, scale=0.125, block_q=block_q, pages_per_block=ppb,
                                      interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=_tol(jnp.float32),
                                   atol=_tol(jnp.float32))


def test_prefill_kernel_page_128_crossing_pages():
    rng = np.random.default_rng(12)
    args = _case(rng, 4, 2, 64, 128, [(120, 20), (0, 5), (255, 1)])
    want = paged_prefill_reference(*args, scale=0.125)
    got = paged_prefill_attention(*args, scale=0.125, pages_per_block=1, interpret=not ON_GPU)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=_tol(jnp.float32),
                               atol=_tol(jnp.float32))


def test_prefill_kernel_window_and_softcap():
    rng = np.random.default_rng(3)
    args = _case(rng, 8, 2, 64, 16, [(20, 25), (0, 9), (40, 1)])
    for window, cap in [(10, None), (None, 3.0), (7, 2.0)]:
        want = paged_prefill_reference(*args, scale=0.2, sliding_window=window, soft_cap=cap)
        got = paged_prefill_attention(*args, scale=0.2, sliding_window=window, soft_cap=cap,
                                      pages_per_block=1, interpret=not ON_GPU)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=_tol(jnp.float32),
                                   atol=_tol(jnp.float32))


def test_work_items_cover_every_token_once():
    qsl = jnp.asarray([0, 17, 18, 27, 27, 28], jnp.int32)
    work = np.asarray(work_items(qsl, 4, 30))
    covered = [t for s, start, c in work for t in range(start, start + c)]
    assert sorted(covered) == list(range(28))
    assert all(c <= 4 for _, _, c in work)
    for s, start, c in work:
        if c:
            assert qsl[s] <= start and start + c <= qsl[s + 1]


def test_reference_agrees_with_engine_reference():
    """The kernel file's reference and jaxserve's ragged gather reference compute the same thing."""
    from jaxserve.attention import AttentionSpec, build_metadata, paged_attention_reference

    rng = np.random.default_rng(5)
    seqs = [(0, 17), (5, 1), (30, 9)]
    q, kc, vc, tables, lens, qsl = _case(rng, 8, 2, 64, 16, seqs, pad_tokens=0)
    meta, pos = build_metadata([(np.asarray(tables[i]).tolist(), c, x) for i, (c, x) in enumerate(seqs)],
                               block_size=16, num_tokens=q.shape[0], num_seqs=3,
                               max_blocks_per_seq=tables.shape[1])
    ours = paged_attention_reference(q, kc, vc, meta, jnp.asarray(pos), AttentionSpec(scale=0.125))
    theirs = paged_prefill_reference(q, kc, vc, tables, lens, qsl, scale=0.125)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-5)


def test_prefill_flops_counts_causal_pairs():
    # one sequence: 2 cached + 3 new tokens -> the queries see 3, 4, 5 keys
    assert prefill_flops([0, 3], [5], num_heads=2, head_dim=8) == 4 * 12 * 2 * 8
