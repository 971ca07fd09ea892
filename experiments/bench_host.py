"""Host time per engine step outside the device (CPU only, no model): scheduling, attention
metadata, and applying the sampled tokens, for `--batches` running sequences in steady decode.

    python experiments/bench_host.py --batches 64 256 --contexts 128 2048

Each (batch, context) case admits `batch` requests with `context`-token prompts, runs their
prefill through the scheduler, then times `--steps` decode steps with async scheduling's order
(schedule step N+1, build its metadata, then apply step N's tokens) and prints the median
milliseconds of each phase. The device runs a 7-8B model's decode step in ~4-5 ms on one H100/H200,
so these phases must stay well below that.

    python experiments/bench_host.py --engine --batches 64 256 --output-len 512

times instead, on a tiny random model whose step executables are replaced by their first outputs
(host work only), the runner's dispatch (metadata, input rows, packing) and the engine's output
building per step (`EngineCore._outputs`), with cumulative snapshots of every running request (as
a streaming server needs) and without them (as `LLM.generate` runs), and the full garbage
collections that ran meanwhile (the engine's block pool sized like a GPU's, `--pages`).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from jaxserve.attention.metadata import build_metadata
from jaxserve.kv_cache.manager import KVCacheManager
from jaxserve.sampling.params import SamplingParams
from jaxserve.scheduler.request import Request
from jaxserve.scheduler.scheduler import Scheduler, SchedulerConfig


def run(batch: int, context: int, steps: int, block_size: int = 16) -> tuple[float, float, float]:
    # the requests prefilled first decode while the others prefill: none may finish before the
    # timed steps, or fewer than `batch` sequences would be timed
    prefill_steps = -(-batch * context // 2048) + 1
    max_len = context + prefill_steps + steps + 64
    pages = batch * (-(-max_len // block_size)) + 1
    kv = KVCacheManager(pages, block_size)
    sched = Scheduler(SchedulerConfig(batch, 2048, max_len, block_size), kv)
    for i in range(batch):
        sched.add_request(Request(f"r{i}", list(range(i, i + context)), SamplingParams(
            max_tokens=prefill_steps + steps + 8, temperature=0.0, ignore_eos=True)))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in sched.requests.values()):
        out = sched.schedule()
        sched.update_from_output(out, {q.request_id: 5 for q in out.seqs if q.sample})
    t_sched, t_meta, t_update = [], [], []
    prev = sched.schedule()
    assert len(prev.seqs) == batch, (len(prev.seqs), batch)
    for _ in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        build_metadata([(q.block_table, q.num_computed_tokens, len(q.token_ids)) for q in out.seqs],
                       block_size=block_size, num_tokens=batch, num_seqs=batch,
                       max_blocks_per_seq=-(-max_len // block_size))
        t2 = time.perf_counter()
        sched.update_from_output(prev, {q.request_id: 5 for q in prev.seqs if q.sample})
        t3 = time.perf_counter()
        prev = out
        t_sched.append(t1 - t0)
        t_meta.append(t2 - t1)
        t_update.append(t3 - t2)
    return tuple(1e3 * statistics.median(x) for x in (t_sched, t_meta, t_update))


def engine_host(batch: int, output_len: int, pages: int = 200_000,
                input_len: int = 16) -> dict[str, float]:
    """Median ms per step of the runner's dispatch (its executables replaced by their first
    outputs, so only host work is timed) and of EngineCore._outputs, with and without snapshots."""
    import os
    import sys

    import jax.numpy as jnp
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "scripts"))
    from bench_decode import Phases

    from jaxserve import LLM
    from jaxserve.config import ModelConfig
    from jaxserve.loading import LoadedModel
    from jaxserve.models.registry import create_model

    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "num_key_value_heads": 1, "max_position_embeddings": input_len + output_len + 16,
          "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "eos_token_id": 1, "bos_token_id": 0}
    cfg = ModelConfig.from_hf_config(hf)
    lm = LoadedModel(create_model(cfg, dtype=jnp.float32, seed=0), cfg, hf, None, "tiny", jnp.float32)
    llm = LLM(lm, max_num_seqs=batch, max_num_batched_tokens=max(batch * input_len, batch),
              max_model_len=input_len + output_len + 8, num_kv_blocks=pages, show_progress=False)
    core, runner = llm.engine, llm.engine.runner
    first: dict[tuple, object] = {}
    executable = runner._executable

    def replayed(key):
        def call(*args):   # (first output, the state handed in): later calls donate nothing
            if key not in first:
                res = executable(key)(*args)
                first[key] = res[0]
                return res
            return first[key], args[1]
        return call
    runner._executable = replayed
    phases = Phases(core)   # times dispatch and _outputs per call (bench_decode --phases)
    pauses: list[float] = []
    started: list[float] = []

    def on_gc(phase, info):   # full (generation-2) collections while the steps run
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses.append(time.perf_counter() - started.pop())
    gc.callbacks.append(on_gc)
    out = {}
    for snapshots in (True, False):
        phases.reset()
        for i in range(batch):
            core.add_request(f"{snapshots}-{i}", {"prompt_token_ids": list(range(2, 2 + input_len))},
                             SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0))
        while core.has_unfinished():
            core.step(snapshots)
        out[f"outputs {'snapshots' if snapshots else 'finished only'}"] = 1e3 * statistics.median(
            phases.calls["_outputs"])
        out.setdefault("dispatch", 1e3 * statistics.median(phases.calls["dispatch"]))
    gc.callbacks.remove(on_gc)
    out["full gc pauses"] = len(pauses)
    out["longest full gc ms"] = 1e3 * max(pauses, default=0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--engine", action="store_true", help="time the engine's output building instead")
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--pages", type=int, default=200_000,
                    help="KV pages of the engine (--engine): a GPU-sized block pool")
    args = ap.parse_args()
    if args.engine:
        print(f"{'batch':>6} {'output':>7} {'dispatch ms':>12} {'outputs ms (snapshots)':>23} "
              f"{'outputs ms (finished only)':>27} {'full GCs':>9} {'longest ms':>11}")
        for b in args.batches:
            r = engine_host(b, args.output_len, args.pages)
            print(f"{b:>6} {args.output_len:>7} {r['dispatch']:>12.3f} {r['outputs snapshots']:>23.3f} "
                  f"{r['outputs finished only']:>27.3f} {r['full gc pauses']:>9} "
                  f"{r['longest full gc ms']:>11.1f}")
        return
    print(f"{'batch':>6} {'context':>8} {'schedule ms':>12} {'metadata ms':>12} {'update ms':>10}")
    for b in args.batches:
        for c in args.contexts:
            s, m, u = run(b, c, args.steps)
            print(f"{b:>6} {c:>8} {s:>12.3f} {m:>12.3f} {u:>10.3f}")


if __name__ == "__main__":
    main()
