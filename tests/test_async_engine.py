"""AsyncEngine: concurrent streams equal offline results; disconnects abort and free blocks."""

import asyncio

import pytest

from jaxserve import InvalidRequestError, SamplingParams, SamplingParamsError
from jaxserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineShuttingDown
from jaxserve.engine.core import EngineConfig, EngineCore
from tests.engine_fixtures import tiny_loaded


@pytest.fixture(scope="module")
def engine():
    core = EngineCore(tiny_loaded(seed=5), EngineConfig(
        max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32, block_size=4,
        num_kv_blocks=64, compilation_cache_dir=None, show_progress=False))
    eng = AsyncEngine(core)
    yield eng
    eng.shutdown()


async def _collect(eng, prompt, params, rid=None):
    last, n_updates = None, 0
    async for out in eng.generate(prompt, params, rid):
        last, n_updates = out, n_updates + 1
    return last, n_updates


def _all_free(eng):
    s = eng.get_stats()
    return s["kv_blocks_free"] == s["kv_blocks_total"]


def test_concurrent_streams_match_solo(engine):
    prompts = [{"prompt_token_ids": [2 + i, 3 + i, 4 + i] * (1 + i % 5)} for i in range(12)]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    async def main():
        together = await asyncio.gather(*[_collect(engine, p, sp) for p in prompts])
        solo = [await _collect(engine, p, sp) for p in prompts]
        return together, solo

    together, solo = asyncio.run(main())
    for (a, n_updates), (b, _) in zip(together, solo):
        assert a.finished and a.outputs[0].token_ids == b.outputs[0].token_ids
        # streamed: one update per token, fewer when several steps land before the consumer runs
        assert 1 <= n_updates <= 10
    assert _all_free(engine) and engine.num_open_streams == 0


def test_slow_consumer_gets_the_newest_cumulative_output(engine):
    # a consumer that falls behind skips to the newest output: nothing lost, fewer updates
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8]}

    async def slow():
        seen = []
        async for out in engine.generate(prompt, sp):
            seen.append(len(out.outputs[0].token_ids))
            await asyncio.sleep(0.05)
        return out, seen

    async def main():
        return await slow(), await _collect(engine, prompt, sp)

    (last, seen), (fast, _) = asyncio.run(main())
    assert last.finished and last.outputs[0].token_ids == fast.outputs[0].token_ids
    assert len(last.outputs[0].token_ids) == 24
    assert seen == sorted(seen) and len(set(seen)) == len(seen)   # cumulative, never repeated
    assert len(seen) < 24
    assert _all_free(engine)


def test_disconnect_aborts_and_frees(engine):
    sp = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)

    async def client(i):
        got = 0
        async for _ in engine.generate({"prompt_token_ids": list(range(2, 20 + i))}, sp):
            got += 1
            if got == 3:
                break  # client goes away mid-stream
        return got

    async def main():
        results = await asyncio.gather(*[client(i) for i in range(6)])
        for _ in range(100):
            if _all_free(engine) and not engine.core.has_unfinished():
                break
            await asyncio.sleep(0.02)
        return results

    assert asyncio.run(main()) == [3] * 6
    assert _all_free(engine) and not engine.core.has_unfinished()
    # and the engine still serves
    last, _ = asyncio.run(_collect(engine, {"prompt_token_ids": [5, 6]},
                                   SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)))
    assert len(last.outputs[0].token_ids) == 3


def test_bad_requests_raise_before_queueing(engine):
    async def main():
        with pytest.raises(SamplingParamsError):
            await _collect(engine, {"prompt_token_ids": [3]}, SamplingParams(temperature=float("inf")))
        with pytest.raises(InvalidRequestError):
            await _collect(engine, {"prompt_token_ids": [3] * 500}, SamplingParams())
        ok, _ = await _collect(engine, {"prompt_token_ids": [3]}, SamplingParams(max_tokens=2))
        return ok

    assert asyncio.run(main()).finished


def test_drain_refuses_new_and_finishes_inflight():
    core = EngineCore(tiny_loaded(seed=6), EngineConfig(
        max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, block_size=4,
        num_kv_blocks=40, compilation_cache_dir=None, show_progress=False))
    eng = AsyncEngine(core)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)

    async def main():
        inflight = asyncio.create_task(_collect(eng, {"prompt_token_ids": [4, 5, 6]}, sp))
        await asyncio.sleep(0.05)
        clean = await eng.drain(timeout=30)
        with pytest.raises(EngineShuttingDown):
            await _collect(eng, {"prompt_token_ids": [4]}, sp)
        return clean, await inflight

    clean, (last, _) = asyncio.run(main())
    assert clean and last.outputs[0].finish_reason == "length"
    eng.shutdown()


def test_dead_engine_fails_streams():
    core = EngineCore(tiny_loaded(seed=7), EngineConfig(
        max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16, block_size=4,
        num_kv_blocks=40, compilation_cache_dir=None, show_progress=False))

    def boom():
        raise RuntimeError("device lost")

    core.step = boom
    eng = AsyncEngine(core)

    async def main():
        with pytest.raises(EngineDeadError):
            await _collect(eng, {"prompt_token_ids": [4, 5]}, SamplingParams(max_tokens=4))

    asyncio.run(main())
    assert eng.is_dead
    eng.shutdown()
