"""The paged jnp reference against a dense per-sequence attention written independently."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.attention import (AttentionSpec, ReferenceBackend, build_metadata,
                                paged_attention_blockwise, paged_attention_reference)


def dense_attention(q, k, v, q_pos, scale, window=None):
    # q [n, N, H], k/v [L, K, H]: plain causal softmax attention of one sequence, float64
    n, nh, h = q.shape
    kh = k.shape[1]
    g = nh // kh
    k = np.repeat(k, g, axis=1)
    v = np.repeat(v, g, axis=1)
    s = np.einsum("qnh,lnh->nql", q, k) * scale
    kv_pos = np.arange(k.shape[0])
    mask = kv_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= q_pos[:, None] - kv_pos[None, :] < window
    s = np.where(mask[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nql,lnh->qnh", p, v)


@pytest.mark.parametrize("nh,kh", [(4, 4), (8, 2), (7, 1), (16, 2)])
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_prefill_decode_batch(nh, kh, window):
    rng = np.random.default_rng(nh * 10 + kh)
    page, h, pages = 4, 8, 40
    # (already cached, new this step): a decode, a chunk continuing a prefill, a fresh prefill,
    # one crossing several page boundaries, and an empty padded slot at the end
    seqs = [(9, 1), (6, 7), (0, 5), (3, 14)]
    perm = rng.permutation(np.arange(1, pages))  # shuffled page assignment, page 0 = null
    tables, used = [], 0
    for c, n in seqs:
        need = -(-(c + n) // page)
        tables.append(perm[used : used + need].tolist())
        used += need
    k_cache = np.full((pages, page, kh, h), np.nan, np.float32)  # unused pages are NaN
    v_cache = np.full((pages, page, kh, h), np.nan, np.float32)
    full_k = [rng.normal(size=(c + n, kh, h)).astype(np.float32) for c, n in seqs]
    full_v = [rng.normal(size=(c + n, kh, h)).astype(np.float32) for c, n in seqs]
    for (c, n), t, fk, fv in zip(seqs, tables, full_k, full_v):
        for p in range(c):  # what earlier steps wrote
            k_cache[t[p // page], p % page] = fk[p]
            v_cache[t[p // page], p % page] = fv[p]
    total = sum(n for _, n in seqs)
    num_tokens, num_seqs = 32, 6
    meta, positions = build_metadata([(t, c, n) for t, (c, n) in zip(tables, seqs)],
                                     block_size=page, num_tokens=num_tokens, num_seqs=num_seqs,
                                     max_blocks_per_seq=8)
    q = rng.normal(size=(num_tokens, nh, h)).astype(np.float32)
    k_new = np.zeros((num_tokens, kh, h), np.float32)
    v_new = np.zeros((num_tokens, kh, h), np.float32)
    off = 0
    for (c, n), fk, fv in zip(seqs, full_k, full_v):
        k_new[off : off + n], v_new[off : off + n] = fk[c:], fv[c:]
        off += n
    spec = AttentionSpec(scale=h ** -0.5, sliding_window=window)
    k_cache[0] = 0.0  # the null page holds finite garbage in practice (padding writes)
    v_cache[0] = 0.0
    out, (kc, _) = ReferenceBackend()(jnp.asarray(q), jnp.asarray(k_new), jnp.asarray(v_new),
                                      (jnp.asarray(k_cache), jnp.asarray(v_cache)), meta,
                                      jnp.asarray(positions), spec)
    out = np.asarray(out)
    off = 0
    for (c, n), fk, fv in zip(seqs, full_k, full_v):
        want = dense_attention(q[off : off + n].astype(np.float64), fk, fv,
                               np.arange(c, c + n), h ** -0.5, window)
        np.testing.assert_allclose(out[off : off + n], want, rtol=2e-5, atol=2e-5)
        off += n
    assert np.isfinite(out[:total]).all()
    assert np.all(out[total:] == 0.0)  # padding tokens attend to nothing
    # the new K landed in the right slots
    c, n = seqs[3]
    t = tables[3]
    np.testing.assert_array_equal(np.asarray(kc)[t[(c + n - 1) // page], (c + n - 1) % page],
                                  full_k[3][c + n - 1])


@pytest.mark.parametrize("ppc", [1, 3, 8])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_blockwise_equals_gather_reference(ppc, soft_cap):
    rng = np.random.default_rng(ppc)
    pages, page, kh, nh, h = 30, 4, 2, 8, 16
    k_cache = rng.normal(size=(pages, page, kh, h)).astype(np.float32)
    v_cache = rng.normal(size=(pages, page, kh, h)).astype(np.float32)
    tables = [rng.permutation(np.arange(1, pages))[:n].tolist() for n in (7, 1, 3)]
    seqs = [(t, c, n) for t, (c, n) in zip(tables, [(20, 5), (0, 3), (11, 1)])]
    used = {p for t in tables for p in t} | {0}
    for p in range(pages):
        if p not in used:  # a stray read of an unused page turns the output NaN
            k_cache[p] = np.nan
            v_cache[p] = np.nan
    meta, pos = build_metadata(seqs, block_size=page, num_tokens=16, num_seqs=4, max_blocks_per_seq=9)
    q = rng.normal(size=(16, nh, h)).astype(np.float32)
    spec = AttentionSpec(scale=0.3, sliding_window=None, soft_cap=soft_cap)
    args = (jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache), meta, jnp.asarray(pos), spec)
    want = np.asarray(paged_attention_reference(*args))
    got = np.asarray(paged_attention_blockwise(*args, pages_per_chunk=ppc))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()


def _metadata_one_sequence_at_a_time(seqs, block_size, num_tokens, num_seqs, max_blocks):
    """build_metadata's definition, written as a plain loop over the sequences."""
    slot = np.zeros(num_tokens, np.int32)
    seq_ids = np.full(num_tokens, max(num_seqs - 1, 0), np.int32)
    positions = np.zeros(num_tokens, np.int32)
    tables = np.zeros((num_seqs, max_blocks), np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
    qsl = np.zeros(num_seqs + 1, np.int32)
    t = 0
    for s, (table, computed, new) in enumerate(seqs):
        tables[s, :len(table)] = table
        for j in range(new):
            pos = computed + j
            slot[t] = table[pos // block_size] * block_size + pos % block_size
            positions[t], seq_ids[t] = pos, s
            t += 1
        seq_lens[s] = computed + new
        qsl[s + 1] = t
    qsl[len(seqs) + 1:] = t
    return (slot, seq_ids, tables, seq_lens, qsl), positions


def test_build_metadata_matches_a_per_sequence_loop_on_random_batches():
    rng = np.random.default_rng(0)
    for _ in range(300):
        bs, m, s = int(rng.choice([1, 4, 16])), int(rng.integers(1, 10)), int(rng.integers(1, 8))
        seqs = []
        for _ in range(int(rng.integers(0, s + 1))):
            new = int(rng.integers(1, min(6, m * bs) + 1))
            total = int(rng.integers(new, m * bs + 1))
            pages = min(-(-total // bs) + int(rng.integers(0, 2)), m)   # sometimes a spare page
            seqs.append((rng.choice(np.arange(1, 400), pages, replace=False).tolist(), total - new, new))
        t = sum(n for _, _, n in seqs) + int(rng.integers(0, 4))
        meta, pos = build_metadata(seqs, block_size=bs, num_tokens=t, num_seqs=s, max_blocks_per_seq=m)
        want, want_pos = _metadata_one_sequence_at_a_time(seqs, bs, t, s, m)
        have = (meta.slot_mapping, meta.seq_ids, meta.block_tables, meta.seq_lens, meta.query_start_loc)
        for a, b in zip(have + (pos,), want + (want_pos,)):
            assert a.dtype == b.dtype == np.int32
            np.testing.assert_array_equal(a, b)


def test_build_metadata_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="pages > max"):
        build_metadata([([1, 2, 3], 0, 2)], block_size=4, num_tokens=4, num_seqs=1, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="too few for"):
        build_metadata([([1], 3, 2)], block_size=4, num_tokens=4, num_seqs=1, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="token bucket"):
        build_metadata([([1], 0, 3)], block_size=4, num_tokens=2, num_seqs=1, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="sequence bucket"):
        build_metadata([([1], 0, 1)] * 3, block_size=4, num_tokens=4, num_seqs=2, max_blocks_per_seq=2)
