"""Engine tests on a tiny random model: batching = solo, preemption, prefix caching, sampling,
validation, zero recompiles, in-place KV cache."""

import re

import numpy as np
import pytest

from jaxserve import LLM, InvalidRequestError, SamplingParams, SamplingParamsError
from tests.engine_fixtures import tiny_loaded

BLOCK = 4


@pytest.fixture(scope="module")
def llm():
    # 48 usable pages of 4 tokens = 192 tokens for up to 4 running sequences of up to 128 tokens:
    # enough pressure to force preemptions in the mixed workload below.
    return LLM(tiny_loaded(), max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32,
               block_size=BLOCK, num_kv_blocks=48, compilation_cache_dir=None, show_progress=False)


def _workload(seed=0, n=24):
    rng = np.random.default_rng(seed)
    prompts, params = [], []
    for i in range(n):
        length = int(rng.choice([1, 3, 9, 17, 33, 50, 70]))  # several longer than a 32-token chunk
        prompts.append({"prompt_token_ids": rng.integers(2, 128, size=length).tolist()})
        params.append(SamplingParams(temperature=0.0, max_tokens=int(rng.integers(4, 40)),
                                     ignore_eos=True))
    return prompts, params


def _assert_all_free(llm):
    s = llm.get_stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"], s
    assert s["num_requests_running"] == 0 and s["num_requests_waiting"] == 0


def test_batched_equals_solo_with_queueing_and_preemption(llm):
    prompts, params = _workload()
    before = llm.get_stats()
    batched = llm.generate(prompts, params)
    stats = llm.get_stats()
    assert stats["num_preemptions"] > before["num_preemptions"], "workload did not force preemption"
    assert stats["compiles_after_warmup"] == 0
    _assert_all_free(llm)
    for p, sp, out in zip(prompts, params, batched):
        solo = llm.generate([p], sp)[0]
        assert out.outputs[0].token_ids == solo.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == sp.max_tokens
        assert out.outputs[0].finish_reason == "length"
    assert llm.get_stats()["compiles_after_warmup"] == 0
    _assert_all_free(llm)


def test_prefix_cache_hit_gives_identical_output(llm):
    prompt = {"prompt_token_ids": list(range(10, 60))}
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prompt], sp)[0]
    hits = llm.get_stats()["prefix_cache_hits"]
    second = llm.generate([prompt], sp)[0]
    assert llm.get_stats()["prefix_cache_hits"] >= hits + 48  # 12 full pages of the 50-token prompt
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    _assert_all_free(llm)


def test_seeded_sampling_is_batch_independent(llm):
    target = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([target], sp)[0].outputs[0].token_ids
    prompts, params = _workload(seed=3, n=7)
    busy = llm.generate(prompts[:3] + [target] + prompts[3:], params[:3] + [sp] + params[3:])
    assert busy[3].outputs[0].token_ids == alone
    other = llm.generate([target], SamplingParams(temperature=1.0, seed=99, max_tokens=20,
                                                  ignore_eos=True))[0].outputs[0].token_ids
    assert other != alone


def test_n_samples_share_prompt_blocks(llm):
    prompt = {"prompt_token_ids": list(range(3, 43))}   # 10 full pages
    hits = llm.get_stats()["prefix_cache_hits"]
    out = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8,
                                                ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert llm.get_stats()["prefix_cache_hits"] - hits >= 2 * 36   # siblings reuse the leader's pages
    _assert_all_free(llm)


def test_sampling_controls(llm):
    p = {"prompt_token_ids": [9, 10, 11, 12]}
    greedy = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    top1 = llm.generate([p], SamplingParams(temperature=0.7, top_k=1, seed=3, max_tokens=10,
                                            ignore_eos=True))[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids
    biased = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                              logit_bias={77: 100.0}))[0]
    assert biased.outputs[0].token_ids == [77] * 6
    rep = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                           repetition_penalty=50.0, frequency_penalty=2.0,
                                           presence_penalty=2.0))[0].outputs[0].token_ids
    assert len(set(rep)) == len(rep), "penalties should forbid repeats here"
    assert not set(rep) & set(p["prompt_token_ids"])
    stop_tok = greedy.outputs[0].token_ids[3]
    stopped = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10,
                                               stop_token_ids=[stop_tok]))[0].outputs[0]
    k = greedy.outputs[0].token_ids.index(stop_tok)
    assert stopped.token_ids == greedy.outputs[0].token_ids[: k + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_tok
    lp = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                          logprobs=5))[0].outputs[0]
    assert len(lp.logprobs) == 3 and all(len(d) >= 5 for d in lp.logprobs)
    for tok, d in zip(lp.token_ids, lp.logprobs):
        assert d[tok].rank == 1 and d[tok].logprob <= 0
        assert abs(sum(np.exp(x.logprob) for x in d.values())) <= 1.0 + 1e-5
    assert np.isclose(lp.cumulative_logprob, sum(d[t].logprob for t, d in zip(lp.token_ids, lp.logprobs)))


def test_min_tokens_and_eos(llm):
    # make EOS (id 1) overwhelmingly likely; min_tokens must still hold it back
    p = {"prompt_token_ids": [4, 5, 6]}
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=10, logit_bias={1: 60.0},
                                           min_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 6 and out.token_ids[-1] == 1 and 1 not in out.token_ids[:5]
    assert out.finish_reason == "stop"
    ign = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=7, logit_bias={1: 60.0},
                                           ignore_eos=True))[0].outputs[0]
    assert len(ign.token_ids) == 7 and ign.finish_reason == "length"


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ({"n": 1000}, "n"),
    ({"n": 2, "temperature": 0.0}, "n"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": 50}, "logprobs"),
    ({"logit_bias": {100000: 1.0}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_params_raise_and_engine_keeps_serving(llm, kwargs, field):
    with pytest.raises(SamplingParamsError) as e:
        llm.generate([{"prompt_token_ids": [3, 4]}], SamplingParams(**kwargs))
    assert e.value.field == field and field in str(e.value)
    ok = llm.generate([{"prompt_token_ids": [3, 4]}], SamplingParams(temperature=0.0, max_tokens=2))
    assert len(ok[0].outputs[0].token_ids) >= 1
    _assert_all_free(llm)


@pytest.mark.parametrize("prompt,params,field", [
    ({"prompt_token_ids": []}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": [3, 500]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [-4]}, SamplingParams(), "prompt_token_ids"),
    ({"prompt_token_ids": [5] * 128}, SamplingParams(max_tokens=1), "prompt"),
    ({"prompt_token_ids": list(range(2, 100))}, SamplingParams(max_tokens=40), "max_tokens"),
    ({"prompt_token_ids": "abc"}, SamplingParams(), "prompt_token_ids"),
])
def test_bad_requests_raise_typed_errors(llm, prompt, params, field):
    good = {"prompt_token_ids": [7, 8]}
    with pytest.raises(InvalidRequestError) as e:
        llm.generate([good, prompt], params)  # validated up front: nothing runs
    assert e.value.field == field
    assert re.search(r"\d", str(e.value)) or field in str(e.value)
    _assert_all_free(llm)


def test_abort_returns_blocks(llm):
    eng = llm.engine
    for i in range(3):
        eng.add_request(f"abort-{i}", {"prompt_token_ids": list(range(2, 40))},
                        SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(4):
        eng.step()
    assert llm.get_stats()["kv_blocks_free"] < llm.get_stats()["kv_blocks_total"]
    outs = [eng.abort(f"abort-{i}") for i in range(3)]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outs)
    eng.step()  # the runner releases the slots
    _assert_all_free(llm)
    assert not eng.has_unfinished()


def test_steps_without_snapshots_return_only_finished_requests(llm):
    eng = llm.engine
    prompts, params = _workload(seed=3, n=6)
    want = llm.generate(prompts, params, use_tqdm=False)
    streamed = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(f"snap-{i}", p, sp)
    while eng.has_unfinished():
        for out in eng.step(snapshots=False):
            assert out.finished and out.request_id not in streamed
            streamed[out.request_id] = out
    assert [streamed[f"snap-{i}"].outputs[0].token_ids for i in range(6)] == \
        [w.outputs[0].token_ids for w in want]
    _assert_all_free(llm)


def test_kv_cache_is_donated_not_copied(llm):
    runner = llm.engine.runner
    t, s = runner.buckets[-1]
    compiled = runner.lower(t, s).compile()
    hlo = compiled.as_text()
    p, b, k, h = runner.kv[0][0].shape
    # every cache array is aliased input->output ...
    header = hlo.splitlines()[0]
    assert "input_output_alias" in header
    n_alias = header.count("may-alias") + header.count("must-alias")
    assert n_alias >= 2 * len(runner.kv)  # k and v of every layer
    # ... and no instruction copies a whole cache array
    shape = rf"f32\[{p},{b},{k},{h}\]"
    assert not re.search(shape + r"[^\n]*\bcopy\(", hlo), "a full KV cache copy appears in the HLO"
    # the sampler updates its 4 per-slot state arrays in place, in every mode
    for mode in ("greedy", "random", "full"):
        header = runner.lower_sampler(s, mode).compile().as_text().splitlines()[0]
        assert header.count("may-alias") + header.count("must-alias") >= 4, mode


def test_sampler_mode_is_the_cheapest_that_serves_every_row():
    from jaxserve.sampling.sampler import sampler_mode
    assert sampler_mode([(0.0, 0, 1.0, False)] * 3) == "greedy"
    assert sampler_mode([(0.0, 0, 1.0, False), (0.8, 0, 1.0, False)]) == "random"
    assert sampler_mode([(0.0, 50, 0.5, False)]) == "greedy"   # greedy ignores top-k/top-p
    assert sampler_mode([(0.8, 0, 1.0, False), (1.0, 0, 0.9, False)]) == "full"
    assert sampler_mode([(0.8, 40, 1.0, False)]) == "full"
    assert sampler_mode([(0.0, 0, 1.0, True)]) == "full"       # logprobs need the top-20


def test_sampler_has_no_device_branches(llm):
    # a conditional would make the GPU read its predicate back to the host every step. (The CPU
    # lowering of the threefry PRNG is a loop; on the GPU it is one kernel.)
    runner = llm.engine.runner
    for mode in ("greedy", "random", "full"):
        hlo = runner.lower_sampler(runner.sample_sizes[-1], mode).as_text()
        assert "stablehlo.case" not in hlo and "conditional" not in hlo, mode
    assert "while" not in runner.lower_sampler(runner.sample_sizes[-1], "greedy").as_text()


def test_step_inputs_pack_into_one_array_and_back():
    import jax
    import jax.numpy as jnp
    from jaxserve.attention import build_metadata
    from jaxserve.runner.packing import pack_forward, pack_sampling, unpack_forward, unpack_sampling
    from jaxserve.sampling.sampler import SamplingTensors

    meta, pos = build_metadata([([3, 4], 5, 2), ([7], 0, 3)], block_size=4, num_tokens=8,
                               num_seqs=4, max_blocks_per_seq=3)
    ids = np.arange(10, 18, dtype=np.int32)
    idx = np.array([1, 4, 0, 0], np.int32)
    src = np.array([-1, 2, -1, -1, -1, -1, -1, -1], np.int32)
    got = unpack_forward(jnp.asarray(pack_forward(ids, pos, meta, idx, src)), 8, 4, 3)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves((ids, pos, meta, idx, src))):
        np.testing.assert_array_equal(np.asarray(a), b)
    rows = SamplingTensors.host(4)
    rows["temperature"][:] = [0.0, 0.7, 1.5, -0.0]
    rows["seed"][:] = [0, 1, 2**32 - 1, 123456789]
    rows["valid"][:] = [True, False, True, False]
    rows["top_p"][:] = [1.0, 0.9, 0.5, 1e-3]
    back = unpack_sampling(jnp.asarray(pack_sampling(rows)), 4)
    for name, want in rows.items():
        have = np.asarray(getattr(back, name))
        assert have.dtype == want.dtype, name
        np.testing.assert_array_equal(have, want)


def test_sampled_results_pack_into_one_array_and_back():
    import jax
    import jax.numpy as jnp
    from jaxserve.runner.packing import pack_result, unpack_result

    tokens = np.array([0, 151_935, 7], np.int32)
    lp = np.array([-0.0, -np.inf, -1.25e-7], np.float32)   # bit patterns must survive the trip
    top_ids = np.array([[5, 6], [1, 0], [2**31 - 1, 3]], np.int32)
    top_lp = np.array([[-0.5, -np.inf], [np.nan, -3.0], [-1e30, -2.0]], np.float32)
    packed = jax.jit(pack_result)(*(jnp.asarray(x) for x in (tokens, lp, top_ids, top_lp)))
    assert packed.dtype == jnp.int32 and packed.shape == (3, 6)
    for have, want in zip(unpack_result(np.asarray(packed)), (tokens, lp, top_ids, top_lp)):
        assert have.dtype == want.dtype
        np.testing.assert_array_equal(have.view(np.int32), want.view(np.int32))


def test_slot_fills_set_admitted_rows_like_dense_rows():
    import jax

    from jaxserve.sampling.sampler import FILL_SIZES, SlotFills, fill_slots, init_sampler_state

    r, v = 4, 37
    rng = np.random.default_rng(0)
    fill = jax.jit(fill_slots)
    state = init_sampler_state(r, v)
    # stale rows everywhere (a slot is reused after another request released it)
    state = fill(state, np.full(r, r, np.int32), np.array(
        [[s, t, k, np.float32(-2.5).view(np.int32)] for s in range(r) for t in (3, 30) for k in range(4)],
        np.int32))
    requests = {   # slot -> (prompt, output so far, stop ids, logit bias)
        2: (rng.integers(0, v, FILL_SIZES[-1] + 50).tolist(), [5, 5, 9], [1, 36], {0: 1.5, 36: -7.25}),
        0: ([4, 4, 8], [], [1], None),
        3: ([], [], [], {})}
    fills = SlotFills(r)
    for slot, (prompt, output, stop, bias) in requests.items():
        fills.add(slot, prompt, output, stop, bias)
    calls = fills.take()
    assert [e.shape[0] for _, e in calls] == [FILL_SIZES[-1], FILL_SIZES[0]]   # a long prompt spans calls
    assert sorted(calls[0][0][:3].tolist()) == [0, 2, 3] and (calls[1][0] == r).all()
    assert fills.take() == []
    for clear, entries in calls:
        state = fill(state, clear, entries)
    for slot in range(r):
        want_counts, want_prompt = np.zeros(v, np.int32), np.zeros(v, bool)
        want_stop, want_bias = np.zeros(v, bool), np.zeros(v, np.float32)
        if slot in requests:
            prompt, output, stop, bias = requests[slot]
            np.add.at(want_counts, output, 1)
            want_prompt[prompt] = want_stop[stop] = True
            for t, b in (bias or {}).items():
                want_bias[t] = b
        else:   # untouched: keeps its stale row
            want_counts[[3, 30]], want_prompt[[3, 30]], want_stop[[3, 30]] = 1, True, True
            want_bias[[3, 30]] = -2.5
        np.testing.assert_array_equal(np.asarray(state.out_counts[slot]), want_counts)
        np.testing.assert_array_equal(np.asarray(state.prompt_mask[slot]), want_prompt)
        np.testing.assert_array_equal(np.asarray(state.stop_mask[slot]), want_stop)
        np.testing.assert_array_equal(np.asarray(state.bias[slot]), want_bias)


def test_step_rows_gather_each_slots_sampling_values_and_resolve_placeholders(llm):
    from jaxserve.runner.model_runner import ModelRunner
    from jaxserve.sampling.sampler import SlotFills
    from jaxserve.scheduler.output import NewSequence, ScheduledSequence
    from jaxserve.scheduler.request import PLACEHOLDER

    runner = ModelRunner.__new__(ModelRunner)   # the host-side state only; no model needed
    runner.cfg, runner._slot, runner._free_slots = llm.engine.runner.cfg, {}, [1, 0]
    runner._slot_rows = {k: np.zeros_like(v) for k, v in llm.engine.runner._slot_rows.items()}
    runner._fills = SlotFills(2)
    runner.sampler_state = None
    runner._admit(NewSequence("a", [2, 3], [], SamplingParams(temperature=0.5, top_p=0.8, min_tokens=3),
                              7, (1,)))
    runner._admit(NewSequence("b", [4], [], SamplingParams(temperature=0.0, logprobs=2), 9, (1,)))
    seqs = [ScheduledSequence("b", [5, 6, 7], 1, [3], True, 0),
            ScheduledSequence("a", [PLACEHOLDER], 4, [2], True, 4)]
    ids, src, logits_idx, rows = runner._step_rows(seqs, 8, 4)
    assert ids.tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert src.tolist() == [-1, -1, -1, runner._slot["a"], -1, -1, -1, -1]
    assert logits_idx.tolist() == [2, 3, 0, 0]
    assert rows["slot"][:2].tolist() == [runner._slot["b"], runner._slot["a"]]
    np.testing.assert_allclose(rows["temperature"][:2], [0.0, 0.5])
    np.testing.assert_allclose(rows["top_p"][:2], [1.0, 0.8])
    assert rows["seed"][:2].tolist() == [9, 7] and rows["block_stop"][:3].tolist() == [False, False, False]
    assert rows["num_generated"][:2].tolist() == [0, 4] and rows["valid"][:3].tolist() == [True, True, False]
    assert runner._slot_rows["mode"][runner._slot["b"]] == 2   # logprobs need the full sampler
    seqs[1] = ScheduledSequence("a", [PLACEHOLDER], 1, [2], True, 1)
    assert runner._step_rows(seqs, 8, 4)[3]["block_stop"][1]   # 1 < min_tokens 3
    with pytest.raises(RuntimeError, match="b: a placeholder token before the last one"):
        runner._step_rows([ScheduledSequence("b", [PLACEHOLDER, 5], 1, [3], True, 0)], 8, 4)


def test_engine_start_up_objects_leave_the_cyclic_gc_unless_asked_not_to():
    import gc

    from jaxserve.engine.core import EngineConfig, EngineCore

    def engine(freeze):
        return EngineCore(tiny_loaded(), EngineConfig(
            max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=16,
            compilation_cache_dir=None, show_progress=False, freeze_gc=freeze))

    assert EngineConfig().freeze_gc
    before = gc.get_freeze_count()
    engine(True)
    assert gc.get_freeze_count() > before + 1000   # the engine's start-up objects, frozen
    before = gc.get_freeze_count()
    engine(False)
    assert gc.get_freeze_count() <= before   # (frozen objects freed since then only lower it)
