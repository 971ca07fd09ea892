"""Quick engine throughput check on dummy weights of a real shape (GPU machine).

    python scripts/bench_decode.py --model qwen2.5-7b --batches 1 64 --input-len 128 --output-len 128

Measures the HBM read ceiling first (sum over a 4 GiB bf16 array), then for each batch size runs
`batch` requests of random prompts through `LLM.generate` (ignore_eos) and reports the median of
`--repeats` runs: output tok/s, and for batch 1 the ratio to the weights-read roofline.

Several processes (one GPU each; tp across them), e.g. two on one host:
    JAX_LOCAL_DEVICE_IDS=1 python scripts/bench_decode.py --mesh tp=2 --coordinator-address \
        127.0.0.1:12355 --num-processes 2 --process-id 1 &
    JAX_LOCAL_DEVICE_IDS=0 python scripts/bench_decode.py --mesh tp=2 --coordinator-address \
        127.0.0.1:12355 --num-processes 2 --process-id 0
Process 0 times (end-to-end figures only); the others replay its steps.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def read_ceiling_tbs(gib: float = 4.0, iters: int = 10) -> float:
    """Best of sum/max over `gib` GiB of bf16, timed over back-to-back async dispatches."""
    n = int(gib * (1 << 30) // 2)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    best = 0.0
    for f in (jax.jit(lambda a: jnp.sum(a)), jax.jit(lambda a: jnp.max(a))):
        f(x).block_until_ready()
        rounds = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(iters):
                out = f(x)
            out.block_until_ready()
            rounds.append((time.perf_counter() - t) / iters)
        best = max(best, n * 2 / statistics.median(rounds) / 1e12)
    del x
    return best


def step_calls(runner, kind: str, t: int, s: int):
    """The executable calls of one all-padding step of t tokens and s sequences with the greedy
    sampler, in order, each returning what to wait for: the decode step's fused executable where
    the runner has one, else the forward and then the sampler; None if that bucket was not
    compiled."""
    fwd, st = runner._padding_inputs(t, s)
    fused = runner._exec.get(("decode_sample", t, s, "greedy")) if kind == "decode" else None
    if fused is not None:
        def step():
            res, runner.kv, runner.sampler_state = fused(runner.params, runner.kv, fwd,
                                                         runner.sampler_state, st)
            return res
        return [step]
    fn, sample = runner._exec.get((kind, t, s)), runner._exec.get(("sample", "greedy", s))
    if fn is None or sample is None:
        return None
    box = {}

    def forward():
        box["logits"], runner.kv = fn(runner.params, runner.kv, fwd, runner.sampler_state.last_token)
        return box["logits"]

    def sampler():
        res, runner.sampler_state = sample(box["logits"], runner.sampler_state, st)
        return res
    return [forward, sampler]


def padded_steps(runner, kind: str, b: int, n: int, tokens: int | None = None) -> bool:
    """Dispatch `n` all-padding steps (`kind` at `tokens` tokens (default b) and b sequences,
    greedy sampler) back to back and wait for them; False if that bucket was not compiled."""
    if kind == "decode" and tokens is None:   # the bucket a b-sequence decode step runs in
        b = next((s for _, s in runner.decode_buckets if s >= b), b)
    calls = step_calls(runner, kind, b if tokens is None else tokens, b)
    if calls is None:
        return False
    for _ in range(n):
        for call in calls:
            res = call()
    jax.block_until_ready(res)
    return True


class Phases:
    """Host time per phase of the step loop (wrapped methods; nested calls counted in both), and
    the device wait of each fetched step by the executable it ran."""

    def __init__(self, engine):
        self.engine, self.runner = engine, engine.runner
        self.reset()
        for obj, name in [(engine.scheduler, "schedule"), (engine.scheduler, "update_from_output"),
                          (self.runner, "_admit"), (self.runner, "_flush_fills"),
                          (self.runner, "dispatch"), (engine, "_outputs")]:
            self._wrap(obj, name)
        import jaxserve.runner.model_runner as mr
        self._wrap(mr, "build_metadata", "dispatch: build_metadata")
        self._wrap(self.runner, "_step_rows", "dispatch: _step_rows")
        execute, dispatch, fetch = self.runner._executable, self.runner.dispatch, self.runner.fetch

        def executable(key):
            self._last_key = key if key[0] != "sample" else self._last_key
            exe = execute(key)

            def call(*a):   # the executable's host time inside the loop (device busy)
                t = time.perf_counter()
                try:
                    return exe(*a)
                finally:
                    self.calls[f"dispatch: call {key[0]}"].append(time.perf_counter() - t)
            return call

        def dispatch_keyed(out):
            handle = dispatch(out)
            if handle is not None:
                self._key_of[id(handle)] = self._last_key
                self.steps[self._last_key] += 1
            return handle

        def fetch_keyed(handle):
            t = time.perf_counter()
            res = fetch(handle)
            if handle is not None:
                key = self._key_of.pop(id(handle), None)
                self.wait[key] += time.perf_counter() - t
            return res

        self.runner._executable, self.runner.dispatch, self.runner.fetch = (
            executable, dispatch_keyed, fetch_keyed)

    def reset(self):
        self.calls: dict[str, list[float]] = collections.defaultdict(list)   # seconds per call
        self.steps, self.wait = collections.Counter(), collections.defaultdict(float)
        self._key_of, self._last_key = {}, None

    def _wrap(self, obj, name, label=None):
        f, label = getattr(obj, name, None), label or name
        if f is None:   # (an older engine without this phase)
            return

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                self.calls[label].append(time.perf_counter() - t)
        setattr(obj, name, timed)

    def report(self, label: str, wall: float) -> str:
        lines = [f"host phases, {label}: wall {1e3 * wall:.1f} ms over {sum(self.steps.values())} steps"]
        for name, calls in sorted(self.calls.items(), key=lambda kv: -sum(kv[1])):
            t = sum(calls)
            lines.append(f"  {name:<20} {1e3 * t:9.1f} ms  ({len(calls)} calls, "
                         f"{1e3 * t / len(calls):.3f} ms each)")
        for key, n in self.steps.most_common():
            w = self.wait.get(key, 0.0)
            lines.append(f"  step {str(key):<24} x{n:<4} fetch wait {1e3 * w:8.1f} ms "
                         f"({1e3 * w / n:.3f} ms each)")
        return "\n".join(lines)


def host_call_time(runner, kind: str, t: int, s: int, n: int = 10) -> tuple[float, float]:
    """Median host time spent inside one padded step's forward call and its sampler call, each
    made with the device idle (so no queue to wait behind): launch and argument handling. A decode
    step with its sampler fused in is one call: (its time, 0)."""
    calls = step_calls(runner, kind, t, s)
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(n):
        for call, ts in zip(calls, times):
            jax.block_until_ready((runner.kv, runner.sampler_state))
            t0 = time.perf_counter()
            res = call()
            ts.append(time.perf_counter() - t0)
            jax.block_until_ready(res)
    f, *rest = [statistics.median(ts) for ts in times]
    return f, (rest[0] if rest else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--mesh", default=None, help="e.g. tp=2")
    ap.add_argument("--no-step-time", action="store_true")
    ap.add_argument("--compare-async", action="store_true",
                    help="also run with async scheduling off (the synchronous loop), in the same run")
    ap.add_argument("--compilation-cache-dir", default=None,
                    help="persistent compilation cache (default: none, a cold start)")
    ap.add_argument("--profile", action="store_true",
                    help="trace 10 back-to-back decode steps at the largest batch and list the "
                         "kernels of device 0")
    ap.add_argument("--profile-batch", type=int, default=None,
                    help="batch of the --profile trace (default: the largest)")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile one batch-1 generate and list where the host time goes")
    ap.add_argument("--phases", action="store_true",
                    help="time the host phases of the step loop (schedule, admit, dispatch, fetch "
                         "wait by executable) in the last run of each batch, and each used "
                         "executable's padded device time")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ceiling-gib", type=float, default=4.0, help="size of the read-ceiling probe")
    ap.add_argument("--coordinator-address", default=None,
                    help="several processes (jax.distributed): process 0 times, the others follow")
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    args = ap.parse_args()

    from jaxserve import LLM, SamplingParams
    from jaxserve.distributed import initialize, is_leader

    initialize(args.coordinator_address, args.num_processes, args.process_id)
    multi = jax.process_count() > 1
    ceiling = read_ceiling_tbs(args.ceiling_gib)
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16,
              max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_num_batched_tokens,
              attention_backend=args.attention_backend, mesh=args.mesh,
              compilation_cache_dir=args.compilation_cache_dir)
    startup = time.perf_counter() - t0
    if multi and not is_leader():
        steps = llm.follow()
        print(f"process {jax.process_index()}: followed {steps} steps; start-up {startup:.1f}s")
        return
    cfg = llm.loaded.config
    weight_bytes = cfg.num_params() * 2
    rng = np.random.default_rng(0)
    rows = []
    modes = [True, False] if args.compare_async else [True]
    import dataclasses
    phases = Phases(llm.engine) if args.phases and not multi else None
    phase_reports, used = [], set()
    for async_on, b in [(o, b) for o in modes for b in args.batches]:
        llm.engine.config = dataclasses.replace(llm.engine.config, async_scheduling=async_on)
        prompts = [{"prompt_token_ids": rng.integers(0, cfg.vocab_size, args.input_len).tolist()}
                   for _ in range(b)]
        sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        times = []
        for _ in range(args.repeats):
            if phases is not None:
                phases.reset()
            t = time.perf_counter()
            llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        if phases is not None:
            phase_reports.append(phases.report(f"batch {b}, async {async_on}", times[-1]))
            used |= set(phases.steps)
        med = statistics.median(times)
        row = {"batch": b, "async": async_on, "seconds": med, "output_tok_s": b * args.output_len / med}
        if b == 1:
            roofline = ceiling * 1e12 / weight_bytes
            row["roofline_tok_s"] = roofline
            row["pct_of_roofline"] = 100 * row["output_tok_s"] / roofline
        rows.append(row)
    if multi:
        llm.shutdown()   # release the followers; step times and profiles are one-process only
    step_times = {}
    runner = llm.engine.runner
    variants = [] if args.no_step_time or multi else ["forward", "decode"]
    for label in variants:
        for b in args.batches:
            if not padded_steps(runner, label, b, 1):
                continue
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                padded_steps(runner, label, b, 20)   # device time of a padded step, back to back
                times.append((time.perf_counter() - t0) / 20)
            step_times[f"{label} b={b}"] = statistics.median(times)
    call_times = {}
    for key in sorted({k[:3] for k in used if k is not None}):   # every executable --phases saw
        kind, t, s = key
        kind = "decode" if kind == "decode_sample" else kind
        if not (t == s and f"{kind} b={s}" in step_times):
            padded_steps(runner, kind, s, 2, tokens=t)
            t0 = time.perf_counter()
            padded_steps(runner, kind, s, 10, tokens=t)
            step_times[f"{kind} t={t} s={s}"] = (time.perf_counter() - t0) / 10
        call_times[f"{kind} t={t} s={s}"] = host_call_time(runner, kind, t, s)
    for rep in phase_reports:
        print(rep)
    if call_times:
        print("host time inside the executable calls, device idle (forward, sampler): " + ", ".join(
            f"{k}: {1e3 * f:.2f} / {1e3 * m:.2f} ms" for k, (f, m) in call_times.items()))
    if args.host_profile and not multi:
        import cProfile
        import pstats
        prompt = [{"prompt_token_ids": rng.integers(0, cfg.vocab_size, args.input_len).tolist()}]
        sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        llm.generate(prompt, sp, use_tqdm=False)
        prof.disable()
        wall = time.perf_counter() - t
        print(f"host profile: batch 1, {args.output_len} tokens in {wall:.3f}s "
              f"({1e3 * wall / args.output_len:.2f} ms/token)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if args.profile and not multi:
        import os
        import sys
        import tempfile
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from profile_step import gpu_events, summarise
        b = args.profile_batch or max(args.batches)
        trace_dir = tempfile.mkdtemp(prefix="jaxserve-trace-")
        with jax.profiler.trace(trace_dir):
            traced = padded_steps(runner, "decode", b, 10)
        if traced:
            for i in range(len(jax.local_devices()) if args.mesh else 1):
                print(f"profile: decode step b={b}, device {i}")
                summarise(gpu_events(trace_dir, f"/device:GPU:{i}"), 10, 45)
    stats = llm.get_stats()
    print("device step time (back-to-back, no host work): "
          + ", ".join(f"{k}: {1e3 * v:.2f} ms" for k, v in step_times.items()))
    print(f"mesh: {args.mesh or 'single device'} over {jax.process_count()} process(es); ", end="")
    print(f"device: {jax.devices()[0].device_kind}; read ceiling {ceiling:.2f} TB/s; "
          f"model {args.model} ({cfg.num_params() / 1e9:.2f} B params, bf16, dummy); "
          f"start-up (load + compile) {startup:.1f}s; compiles after warm-up "
          f"{stats['compiles_after_warmup']}")
    ws = runner.warmup_seconds
    print(f"warm-up: {ws['executables']} executables; trace+lower {ws['trace_lower']:.1f}s, "
          f"compiles (overlapping it) done {ws['compile_after']:.1f}s later on {ws['compile_threads']} "
          f"threads, first runs "
          f"{ws['first_run']:.1f}s")
    print(f"{'batch':>6} {'async':>8} {'median s':>9} {'out tok/s':>10} {'% roofline':>10}")
    for r in rows:
        pct = f"{r['pct_of_roofline']:.1f}" if "pct_of_roofline" in r else "-"
        print(f"{r['batch']:>6} {str(r['async']):>8} {r['seconds']:>9.3f} {r['output_tok_s']:>10.1f} {pct:>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "ceiling_tbs": ceiling,
                       "startup_s": startup, "warmup": runner.warmup_seconds, "rows": rows,
                       "step_times_s": step_times, "stats": stats}, f, indent=2)


if __name__ == "__main__":
    main()
