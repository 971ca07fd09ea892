"""A fault while admitting or running one request ends that request, never the engine.

Faults are injected through public seams (the runner's `slot_row`/`dispatch`, a request's
detokenizer); the engine must log the request id, return the failed request with finish_reason
"error" (or raise `RequestFailedError` on its stream), free its KV blocks, and keep serving.
"""

import asyncio
import logging

import jax
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.core import EngineConfig, EngineCore
from jaxserve.engine.outputs import InvalidRequestError, RequestFailedError
from jaxserve.sampling.params import SamplingParamsError
from jaxserve.sampling.sampler import slot_row
from tests.engine_fixtures import tiny_loaded


@pytest.fixture(scope="module")
def core():
    return EngineCore(tiny_loaded(seed=11), EngineConfig(
        max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
        num_kv_blocks=64, compilation_cache_dir=None, show_progress=False))


def _run(core, max_steps=200):
    outs = {}
    for _ in range(max_steps):
        for o in core.step():
            if o.finished:
                outs[o.request_id] = o
        if not core.has_unfinished():
            break
    return outs


def _all_free(core):
    s = core.get_stats()
    return s["kv_blocks_free"] == s["kv_blocks_total"]


SP = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.mark.parametrize("field,value", [
    ("top_k", 2**31), ("top_k", 2**63), ("min_tokens", 2**63), ("max_tokens", 2**31),
    ("seed", 2**64), ("temperature", 1e308), ("repetition_penalty", 1e-300),
    ("repetition_penalty", 1e308), ("min_p", 1e308), ("top_p", 1e308), ("n", 10**30),
])
def test_values_beyond_the_device_rows_are_refused_by_validation(field, value):
    p = SamplingParams(**{field: value, "temperature": 1.0} if field != "temperature" else {field: value})
    with pytest.raises(SamplingParamsError) as e:
        p.validate(128)
    assert e.value.field == field


def test_every_valid_extreme_fits_the_device_rows():
    extremes = SamplingParams(n=128, temperature=1e3, top_p=1e-300, top_k=2**31 - 1, min_p=1.0,
                              presence_penalty=-2, frequency_penalty=2, repetition_penalty=1e-2,
                              seed=-2**63, max_tokens=2**31 - 1, min_tokens=2**31 - 1,
                              logit_bias={5: -100.0, 7: 100.0}, stop_token_ids=[3]).validate(128)
    row = slot_row(extremes, extremes.seed, (1,), 128)
    assert row.values["top_k"] == 0            # beyond the vocabulary: off
    assert all(np.isfinite(row.values[k]) for k in ("temperature", "top_p", "repetition"))
    tiny = SamplingParams(temperature=1e-300).validate()
    assert tiny.temperature == 0.01            # raised, as vLLM does, not sent as a float32 zero


def test_a_row_conversion_fault_fails_that_request_alone(core, monkeypatch):
    real = core.runner.slot_row

    def faulty(params, seed, eos):
        if params.max_tokens == 5:   # the marked request
            raise OverflowError("Python int too large to convert to C int")
        return real(params, seed, eos)

    monkeypatch.setattr(core.runner, "slot_row", faulty)
    core.add_request("ok-1", {"prompt_token_ids": [4, 5, 6]}, SP)
    with pytest.raises(InvalidRequestError, match="does not fit"):
        core.add_request("bad", {"prompt_token_ids": [4, 5]},
                         SamplingParams(temperature=0.0, max_tokens=5, n=1))
    core.add_request("ok-2", {"prompt_token_ids": [7, 8]}, SP)
    outs = _run(core)
    assert set(outs) == {"ok-1", "ok-2"}
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 6
               for o in outs.values())
    assert _all_free(core) and core.num_unfinished_requests == 0


def test_a_step_fault_fails_the_requests_in_flight_and_the_engine_carries_on(core, monkeypatch,
                                                                              caplog):
    solo = _generate(core, "solo", [9, 10, 11])
    real = core.runner.dispatch
    calls = {"n": 0}

    def faulty(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected host fault")
        return real(out)

    monkeypatch.setattr(core.runner, "dispatch", faulty)
    core.add_request("a", {"prompt_token_ids": [4, 5, 6]}, SP)
    core.add_request("b", {"prompt_token_ids": [7, 8]}, SP)
    with caplog.at_level(logging.ERROR, logger="jaxserve.engine"):
        outs = _run(core)
    assert {o.outputs[0].finish_reason for o in outs.values()} == {"error"}
    assert all(o.error for o in outs.values())
    assert any("injected host fault" in r.getMessage() and "a" in r.getMessage()
               for r in caplog.records)
    assert _all_free(core)
    monkeypatch.setattr(core.runner, "dispatch", real)
    # the engine serves on, with the same tokens as before the fault
    assert _generate(core, "after", [9, 10, 11]) == solo
    assert _all_free(core)


def test_lost_device_state_is_fatal(monkeypatch):
    core = EngineCore(tiny_loaded(seed=12), EngineConfig(
        max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16, block_size=4,
        num_kv_blocks=24, compilation_cache_dir=None, show_progress=False))

    def lost(out):
        for leaf in jax.tree.leaves(core.runner.kv):
            leaf.delete()
        raise RuntimeError("donated buffers consumed by a failed call")

    monkeypatch.setattr(core.runner, "dispatch", lost)
    core.add_request("x", {"prompt_token_ids": [4, 5]}, SP)
    with pytest.raises(RuntimeError, match="donated"):
        _run(core)


def test_an_output_fault_fails_one_request_on_its_stream(smollm, monkeypatch, caplog):
    from jaxserve.engine import core as core_module
    from tests.server_fixtures import tiny_chat_model

    real = core_module.IncrementalDetokenizer

    class Poisoned(real):   # detokenizing fails for the prompt that starts with token 7
        def add(self, tok):
            if self.tokens[0] == 7:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
            return super().add(tok)

    monkeypatch.setattr(core_module, "IncrementalDetokenizer", Poisoned)
    core = EngineCore(tiny_chat_model(smollm.tokenizer), EngineConfig(
        max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
        num_kv_blocks=64, compilation_cache_dir=None, show_progress=False))
    eng = AsyncEngine(core)

    async def collect(rid, ids):
        last = None
        async for out in eng.generate({"prompt_token_ids": ids}, SP, rid):
            last = out
        return last

    async def main():
        return await asyncio.gather(collect("fine", [4, 5, 6]), collect("poisoned", [7, 8]),
                                    collect("fine-2", [9]), return_exceptions=True)

    try:
        with caplog.at_level(logging.ERROR, logger="jaxserve.engine"):
            fine, poisoned, fine2 = asyncio.run(main())
        assert isinstance(poisoned, RequestFailedError) and poisoned.request_id == "poisoned"
        assert fine.outputs[0].finish_reason == "length" and fine2.outputs[0].finish_reason == "length"
        assert any("poisoned" in r.getMessage() for r in caplog.records)
        assert not eng.is_dead and core.num_unfinished_requests == 0 and _all_free(core)
    finally:
        eng.shutdown()


def _generate(core, rid, ids):
    core.add_request(rid, {"prompt_token_ids": ids}, SP)
    return _run(core)[rid].outputs[0].token_ids


def test_a_fault_in_every_step_stops_the_engine(monkeypatch):
    from jaxserve.engine.core import MAX_CONSECUTIVE_STEP_FAULTS
    core = EngineCore(tiny_loaded(seed=14), EngineConfig(
        max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16, block_size=4,
        num_kv_blocks=24, compilation_cache_dir=None, show_progress=False))

    def broken(out):
        raise RuntimeError("always")

    monkeypatch.setattr(core.runner, "dispatch", broken)
    failed = 0
    with pytest.raises(RuntimeError, match="always"):
        for i in range(10):   # each step fails the request it ran, until the limit
            core.add_request(f"r{i}", {"prompt_token_ids": [4, 5]}, SP)
            failed += sum(o.outputs[0].finish_reason == "error" for o in core.step())
    assert failed == MAX_CONSECUTIVE_STEP_FAULTS - 1
