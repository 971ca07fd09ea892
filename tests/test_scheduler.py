"""Scheduler + KV cache manager unit tests: pure Python, no JAX, milliseconds each."""

import subprocess
import sys

import pytest

from jaxserve.kv_cache.block_pool import BlockPool, hash_block_tokens, hash_full_blocks
from jaxserve.kv_cache.manager import KVCacheManager
from jaxserve.sampling.params import SamplingParams
from jaxserve.scheduler.buckets import make_buckets, pick_bucket
from jaxserve.scheduler.request import Request
from jaxserve.scheduler.scheduler import Scheduler, SchedulerConfig


def make(num_blocks=64, block_size=4, max_seqs=8, budget=32, max_len=None, caching=True):
    max_len = max_len or (num_blocks - 1) * block_size
    kv = KVCacheManager(num_blocks, block_size, enable_caching=caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, max_len, block_size), kv)


def req(rid, n_prompt, max_tokens=8, start=0, **kw):
    return Request(rid, list(range(start, start + n_prompt)),
                   SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), eos_token_ids=(999,))


def run_step(s, token=7):
    out = s.schedule()
    s.update_from_output(out, {q.request_id: token for q in out.seqs if q.sample})
    return out


def test_scheduler_imports_no_jax():
    code = ("import sys, jaxserve.scheduler.scheduler, jaxserve.kv_cache.manager, "
            "jaxserve.sampling.params; assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_budget_chunks_long_prompt_and_mixes_decodes():
    s = make(budget=16)
    s.add_request(req("a", 6))
    out = run_step(s)
    assert [len(q.token_ids) for q in out.seqs] == [6] and out.seqs[0].sample
    s.add_request(req("b", 40, start=100))
    out = run_step(s)
    # decode of a (1 token) + a 15-token chunk of b's prompt, within the 16-token budget
    assert [(q.request_id, len(q.token_ids), q.sample) for q in out.seqs] == [("a", 1, True), ("b", 15, False)]
    out = run_step(s)
    assert [(q.request_id, len(q.token_ids)) for q in out.seqs] == [("a", 1), ("b", 15)]
    out = run_step(s)
    assert [(q.request_id, len(q.token_ids), q.sample) for q in out.seqs] == [("a", 1, True), ("b", 10, True)]
    assert out.seqs[1].num_computed_tokens == 30


def test_max_num_seqs_queues_fcfs():
    s = make(max_seqs=2)
    for r in "abc":
        s.add_request(req(r, 3))
    out = run_step(s)
    assert [q.request_id for q in out.seqs] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]


def test_preempts_newest_and_recomputes():
    s = make(num_blocks=7, block_size=4, budget=64)  # 6 usable blocks
    s.add_request(req("old", 8, max_tokens=20))      # 2 blocks
    s.add_request(req("new", 12, max_tokens=20, start=100))  # 3 blocks
    run_step(s)
    assert s.kv.num_free_blocks == 1
    for _ in range(4):  # both grow: old crosses into a 3rd block, then new needs its 4th
        run_step(s)
    assert s.num_preemptions >= 1
    new = s.requests["new"]
    assert new.num_preemptions >= 1 and new in s.waiting
    assert s.requests["old"] in s.running
    generated_before = list(new.output_token_ids)
    assert generated_before  # it had produced tokens before it was preempted
    # when old finishes, new is re-admitted and recomputes prompt + generated tokens in one go
    while "old" in s.requests:
        run_step(s)
    out = s.schedule()
    (seq,) = [q for q in out.seqs if q.request_id == "new"]
    assert seq.num_computed_tokens == 0 and seq.token_ids == new.prompt_token_ids + new.output_token_ids and seq.sample
    assert [n.request_id for n in out.new_seqs] == ["new"]
    assert out.new_seqs[0].output_token_ids == generated_before


def test_cache_smaller_than_max_model_len_is_refused():
    with pytest.raises(ValueError, match="max_model_len"):
        make(num_blocks=5, block_size=4, max_len=32)


def test_preempted_running_request_is_released_to_runner():
    s = make(num_blocks=5, block_size=4, budget=64)   # 4 usable
    s.add_request(req("a", 7, max_tokens=30))
    s.add_request(req("b", 7, max_tokens=30))
    run_step(s)
    released = []
    for _ in range(3):
        released += run_step(s).released_ids
    assert "b" in released


def test_abort_frees_everything():
    s = make(num_blocks=32)
    for r in "abcd":
        s.add_request(req(r, 9, max_tokens=50))
    run_step(s)
    run_step(s)
    assert s.kv.num_free_blocks < s.kv.num_total_blocks
    for r in "abcd":
        s.finish_request(r, "abort")
    assert s.kv.num_free_blocks == s.kv.num_total_blocks
    assert not s.running and not s.waiting and not s.requests
    assert sorted(s.schedule().released_ids) == list("abcd")
    assert s.finish_request("a", "abort") is None  # idempotent


def test_stop_rules_eos_min_tokens_max_tokens():
    s = make()
    s.add_request(req("eos", 3, max_tokens=10))
    s.add_request(req("min", 3, max_tokens=10, start=50, min_tokens=2))
    s.add_request(req("ign", 3, max_tokens=3, start=90, ignore_eos=True))
    run_step(s, token=999)
    assert s.requests.get("eos") is None
    assert "min" in s.requests and "ign" in s.requests  # min_tokens / ignore_eos keep going
    run_step(s, token=999)
    assert "min" not in s.requests
    run_step(s, token=999)
    assert "ign" not in s.requests


def test_prefix_cache_hit_and_lru_reuse():
    s = make(num_blocks=16, block_size=4, budget=64)
    s.add_request(req("a", 13, max_tokens=1))
    while s.requests:
        run_step(s)
    assert s.kv.num_free_blocks == s.kv.num_total_blocks  # freed but still cached
    s.add_request(req("b", 13, max_tokens=1))   # same prompt
    out = s.schedule()
    (seq,) = out.seqs
    assert seq.num_computed_tokens == 12 and seq.token_ids == [12]  # 3 full blocks hit
    assert s.kv.prefix_cache_hits == 12 and s.kv.prefix_cache_queries == 26


def test_prefix_never_serves_last_token():
    s = make(block_size=4)
    s.add_request(req("a", 8, max_tokens=1))
    while s.requests:
        run_step(s)
    s.add_request(req("b", 8, max_tokens=1))
    out = s.schedule()
    assert out.seqs[0].num_computed_tokens == 4 and len(out.seqs[0].token_ids) == 4


def test_siblings_wait_for_leader_prompt():
    s = make(block_size=4, budget=8)
    p = SamplingParams(n=2, temperature=1.0, max_tokens=4)
    lead = Request("r-0", list(range(12)), p)
    sib = Request("r-1", list(range(12)), p, leader=lead)
    s.add_request(lead)
    s.add_request(sib)
    out = s.schedule()
    assert [q.request_id for q in out.seqs] == ["r-0"]
    s.update_from_output(out, {})
    out = s.schedule()
    s.update_from_output(out, {q.request_id: 1 for q in out.seqs if q.sample})
    out = s.schedule()
    (sib_seq,) = [q for q in out.seqs if q.request_id == "r-1"]
    assert sib_seq.num_computed_tokens == 8   # shares the leader's two full blocks


def test_block_pool_hashes_and_eviction():
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    h = hash_full_blocks([1, 2, 3, 4, 5], 2)
    assert len(h) == 2 and h[1] == hash_block_tokens(h[0], [3, 4]) and len(h[0]) == 32
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"x" * 32)
    pool.free([b, a])
    assert pool.lookup(b"x" * 32) is a
    pool.allocate(2)  # takes b then c (LRU), a stays cached
    assert pool.lookup(b"x" * 32) is a
    pool.allocate(1)  # now a is reused and its cache entry dropped
    assert pool.lookup(b"x" * 32) is None
    with pytest.raises(RuntimeError):
        pool.free([pool.blocks[1], pool.blocks[1], pool.blocks[1]])


def test_buckets():
    b = make_buckets(48, 6)
    assert b == [(1, 1), (2, 2), (4, 4), (8, 6), (16, 6), (32, 6), (48, 6)]
    assert pick_bucket(5, 3, b) == (8, 6) and pick_bucket(48, 6, b) == (48, 6)
    with pytest.raises(ValueError):
        pick_bucket(49, 1, b)
    for t in range(1, 49):
        for n in range(1, min(t, 6) + 1):
            bt, bs = pick_bucket(t, n, b)
            assert bt >= t and bs >= n and (bt, bs) in b
    with pytest.raises(ValueError):
        make_buckets(8, 16)


# -- async scheduling: the next step is scheduled before this one's tokens are back ----------------

def test_async_decode_feeds_a_placeholder_resolved_in_order():
    from jaxserve.scheduler.request import PLACEHOLDER
    s = make()
    r = req("a", 5, max_tokens=8)
    s.add_request(r)
    first = s.schedule()                         # prefill, samples token 1
    second = s.schedule()                        # scheduled before token 1 is known
    (q,) = second.seqs
    assert q.token_ids == [PLACEHOLDER] and q.num_computed_tokens == 5 and q.sample
    assert q.num_generated == 1                  # seeds fold in the same count as a sync loop
    s.update_from_output(first, {"a": 11})
    assert r.token_slice(r.num_tokens - 2, r.num_tokens) == [11, PLACEHOLDER]
    s.update_from_output(second, {"a": 12})
    assert r.output_token_ids == [11, 12] and r.num_placeholders == 0
    assert r.num_computed_tokens == 6            # token 12 is fed by the next step


def test_async_stop_drops_the_extra_token_and_frees_blocks():
    s = make()
    s.add_request(req("a", 5, max_tokens=8))
    first = s.schedule()
    second = s.schedule()
    s.update_from_output(first, {"a": 999})      # EOS: finished while `second` is in flight
    assert "a" not in s.requests and s.kv.num_free_blocks == s.kv.num_total_blocks
    assert s.update_from_output(second, {"a": 5}) == []   # its token is dropped
    assert not s.has_work() or s.schedule().seqs == []


def test_async_never_schedules_past_max_tokens():
    s = make()
    s.add_request(req("a", 5, max_tokens=2))
    outs = [s.schedule() for _ in range(4)]
    assert [len(o.seqs) for o in outs] == [1, 1, 0, 0]   # the 2nd token is in flight: stop there
    s.update_from_output(outs[0], {"a": 1})
    s.update_from_output(outs[1], {"a": 2})
    assert "a" not in s.requests and s.kv.num_free_blocks == s.kv.num_total_blocks


def test_placeholder_blocks_are_not_hashed_until_known():
    s = make(block_size=4)
    s.add_request(req("a", 3, max_tokens=8))     # token 4 (a placeholder) completes block 0
    first = s.schedule()
    s.schedule()                                 # feeds the placeholder at position 3
    assert s.kv._num_cached.get("a", 0) == 0     # block 0 holds an unknown token: not cached
    s.update_from_output(first, {"a": 42})
    s.schedule()
    assert s.kv._num_cached["a"] == 1            # hashed once known
    assert s.kv._hashes["a"][0] == hash_full_blocks([0, 1, 2, 42], 4)[0]


def test_preempted_request_waits_for_its_token_in_flight():
    s = make(num_blocks=5, block_size=4, budget=64)   # 4 usable blocks
    s.add_request(req("a", 8, max_tokens=30))
    s.add_request(req("b", 8, max_tokens=30))
    first = s.schedule()                         # both prefill (2 blocks each), both sample
    second = s.schedule()                        # decodes need a 3rd block each: b is preempted
    assert [q.request_id for q in second.seqs] == ["a"] and s.requests["b"].num_placeholders == 1
    third = s.schedule()                         # b may not be readmitted: its token is unknown
    assert "b" not in [q.request_id for q in third.seqs]
    s.update_from_output(first, {"a": 1, "b": 2})
    assert s.requests["b"].output_token_ids == [2] and s.requests["b"].num_placeholders == 0


def test_token_views_read_the_same_tokens_without_copying_the_context():
    import random
    from jaxserve.scheduler.request import PLACEHOLDER, KnownTokens

    rnd = random.Random(0)
    for _ in range(200):
        r = req("v", rnd.randint(1, 40))
        r.output_token_ids.extend(rnd.randrange(1000) for _ in range(rnd.randint(0, 20)))
        r.num_placeholders = rnd.randint(0, 2)
        known = r.prompt_token_ids + r.output_token_ids          # what the views stand for
        full = known + [PLACEHOLDER] * r.num_placeholders
        view = r.known_tokens
        assert isinstance(view, KnownTokens) and len(view) == len(known) and list(view) == known
        for _ in range(20):
            a, b = sorted(rnd.randint(0, len(full)) for _ in range(2))
            assert r.token_slice(a, b) == full[a:b]
            assert view[a:b] == known[a:b] and view[-1] == known[-1]
            assert view[min(a, len(known) - 1)] == known[min(a, len(known) - 1)]
        assert view[::2] == known[::2]
        with pytest.raises(IndexError):
            view[len(known)]
    assert PLACEHOLDER not in r.known_tokens


def test_block_ids_follow_allocation_preemption_and_free():
    s = make(num_blocks=12, block_size=4, max_seqs=4, budget=64)
    a, b = req("a", 9, max_tokens=20), req("b", 9, max_tokens=20, start=100)
    s.add_request(a)
    s.add_request(b)
    handed = []   # every step's tables as handed over, and what they were then
    for _ in range(24):
        out = s.schedule()
        for q in out.seqs:
            want = [blk.block_id for blk in s.kv._blocks[q.request_id]]
            assert q.block_table.tolist() == want
            handed.append((q.block_table, want))
        s.update_from_output(out, {q.request_id: 7 for q in out.seqs if q.sample})
    assert s.num_preemptions > 0   # 11 usable blocks cannot hold both at full length
    # tables handed over without a copy never change afterwards (growth, preemption, re-admission)
    assert all(table.tolist() == want for table, want in handed)
    s.finish_request("a", "abort")
    assert s.kv.block_ids("a").tolist() == []
