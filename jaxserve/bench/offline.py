"""`jaxserve bench throughput` and `jaxserve bench latency`: the engine in this process.

throughput: every prompt submitted at once to `LLM.generate` (ignore_eos by default for the random
            dataset, as vLLM), timed from submission to the last output.
latency:    a batch of `--batch-size` prompts, `--num-iters-warmup` untimed then `--num-iters`
            timed runs; reports the mean and percentiles of the batch's end-to-end time. Every
            iteration gets fresh prompts by default: with prefix caching on (the default), a
            batch run again would find its prompts cached and time a decode with almost no
            prefill. The report says which prompts were timed and how many prompt tokens the prefix
            cache served during the timed runs; `--repeat-prompts` times the same batch every time
            (cache hits after the first run), for measuring that case on purpose.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from jaxserve.bench.datasets import BenchRequest, random_requests, sharegpt_requests
from jaxserve.bench.metrics import format_report, write_json


def build_llm(args):
    from jaxserve import LLM
    from jaxserve.arg_utils import engine_kwargs
    return LLM(args.model, dtype=args.dtype, load_format=args.load_format, mesh=args.mesh,
               **engine_kwargs(args))


def _special_ids(llm) -> tuple[int, ...]:
    ids = set(llm.loaded.config.eos_token_ids)
    tok = llm.tokenizer
    if tok is not None and getattr(tok, "all_special_ids", None):
        ids |= set(tok.all_special_ids)
    return tuple(sorted(ids))


def make_requests(args, llm, *, num_prompts: int, input_len: int, output_len: int) -> list[BenchRequest]:
    if getattr(args, "dataset_path", None):
        return sharegpt_requests(args.dataset_path, num_prompts, llm.tokenizer, seed=args.seed,
                                 output_len=getattr(args, "sharegpt_output_len", None))
    return random_requests(num_prompts, input_len, output_len, llm.loaded.config.vocab_size,
                           range_ratio=getattr(args, "random_range_ratio", 0.0), seed=args.seed,
                           special_ids=_special_ids(llm))


def _params(reqs: list[BenchRequest], args):
    from jaxserve import SamplingParams
    return [SamplingParams(max_tokens=r.output_len, ignore_eos=args.ignore_eos,
                           temperature=args.temperature, top_p=1.0, seed=args.seed + i)
            for i, r in enumerate(reqs)]


def _setup(args, num_prompts: int):
    """Build the engine (timed) and the workload: (llm, start-up s, requests, prompts, params)."""
    t0 = time.perf_counter()
    llm = build_llm(args)
    startup = time.perf_counter() - t0
    reqs = make_requests(args, llm, num_prompts=num_prompts, input_len=args.input_len,
                         output_len=args.output_len)
    prompts = [{"prompt_token_ids": r.prompt_ids} for r in reqs]
    return llm, startup, reqs, prompts, _params(reqs, args)


def run_throughput(args) -> dict[str, Any]:
    llm, startup, reqs, prompts, params = _setup(args, args.num_prompts)
    # a short warm-up so one-time host work (first transfers, allocator growth) is not timed
    llm.generate(prompts[: min(4, len(prompts))], params[: min(4, len(prompts))], use_tqdm=False)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    dur = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(r.prompt_len for r in reqs)
    res = {"benchmark": "throughput", "model": _name(args.model), "device": _device(),
           "num_prompts": len(reqs), "completed": sum(o.finished for o in outs), "duration_s": dur, "startup_s": startup,
           "total_input_tokens": n_in, "total_output_tokens": n_out,
           "request_throughput": len(reqs) / dur, "output_throughput": n_out / dur,
           "total_token_throughput": (n_in + n_out) / dur,
           "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}
    print(format_report("Offline Throughput Benchmark Result", res, latency_metrics=False))
    print(f"device {res['device']}; start-up (load + compile) {startup:.1f}s; "
          f"compiles after warm-up {res['compiles_after_warmup']}")
    write_json(args.output_json, res)
    return res


def _latency_batches(args, llm, iterations: int) -> tuple[list[tuple[list, list]], int]:
    """(prompts, params) for each of `iterations` runs, and how many distinct batches they hold:
    one batch repeated with `--repeat-prompts`, else a fresh one per run (the dataset is drawn
    once for all runs, so no two runs share a prompt unless the dataset runs short)."""
    batch = args.batch_size
    repeat = getattr(args, "repeat_prompts", False)
    reqs = make_requests(args, llm, num_prompts=batch * (1 if repeat else iterations),
                         input_len=args.input_len, output_len=args.output_len)
    groups = [reqs[i:i + batch] for i in range(0, len(reqs) - batch + 1, batch)] or [reqs]
    batches = [([{"prompt_token_ids": r.prompt_ids} for r in g], _params(g, args)) for g in groups]
    return [batches[i % len(batches)] for i in range(iterations)], len(batches)


def run_latency(args) -> dict[str, Any]:
    from tqdm import tqdm

    t0 = time.perf_counter()
    llm = build_llm(args)
    startup = time.perf_counter() - t0
    warm, iters = args.num_iters_warmup, args.num_iters
    repeat = getattr(args, "repeat_prompts", False)   # `--repeat-prompts`
    runs, distinct = _latency_batches(args, llm, warm + iters)
    for prompts, params in tqdm(runs[:warm], desc="warm-up iterations", file=sys.stderr):
        llm.generate(prompts, params, use_tqdm=False)
    before = llm.get_stats()
    times = []
    for prompts, params in tqdm(runs[warm:], desc="timed iterations", file=sys.stderr):
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t)
    after = llm.get_stats()
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    queried = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    caching = llm.engine.config.enable_prefix_caching
    if repeat:
        prompts_desc = "the same batch every iteration (--repeat-prompts)"
    elif distinct < warm + iters:
        prompts_desc = (f"fresh each iteration until the dataset ran out: {distinct} distinct "
                        f"batches for {warm + iters} iterations")
    else:
        prompts_desc = "fresh each iteration"
    arr = np.asarray(times)
    res = {"benchmark": "latency", "model": _name(args.model), "device": _device(),
           "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
           "avg_latency_s": float(arr.mean()), "latencies_s": times, "startup_s": startup,
           "percentiles_s": {str(p): float(np.percentile(arr, p)) for p in (10, 25, 50, 75, 90, 99)},
           "repeat_prompts": repeat, "prefix_caching": caching,
           "prefix_cache_hits": hits, "prefix_cache_queries": queried}
    print(f"Avg latency: {res['avg_latency_s']:.4f} seconds")
    for p, v in res["percentiles_s"].items():
        print(f"{p}% percentile latency: {v:.4f} seconds")
    print(f"device {res['device']}; batch {args.batch_size}, {args.input_len} in -> "
          f"{args.output_len} out: {args.batch_size * args.output_len / np.median(arr):.1f} output tok/s "
          f"(median); start-up (load + compile) {startup:.1f}s")
    note = "" if hits == 0 or repeat else " (the timed prefill was partly cached)"
    print(f"prompts: {prompts_desc}; prefix cache: {'on' if caching else 'off'}, {hits} of "
          f"{queried} prompt tokens of the timed iterations served from it{note}")
    write_json(args.output_json, res)
    return res


def _name(model) -> str:
    return model if isinstance(model, str) or model is None else getattr(model, "source", "model")


def _device() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.device_kind} x{jax.device_count()}" if jax.device_count() > 1 else d.device_kind
