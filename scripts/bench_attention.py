"""Paged-attention benchmark (GPU machine), all figures from the same run:

decode: measures the HBM read ceiling first, then per shape the µs, achieved TB/s and % of that
ceiling of our Pallas decode kernel, JAX's own `jax.experimental.pallas.ops.gpu.paged_attention`,
and the jnp reference.
prefill (`--prefill`): measures bf16 matmul throughput first (8192^3), then per ragged step the µs,
TFLOP/s and % of that of our ragged prefill kernels (the Triton-lowered one, "ours", and on
Hopper the Mosaic GPU one, "mgpu") and of the engine's jnp blockwise attention;
`--prefill-anchors` adds JAX's own unpaged flash kernels (Triton and Mosaic GPU) on the 2048-token
chunk.
Each attention figure is per call in a chain of calls inside one executable (each output the next
call's query), the way the model's layers run; separately dispatched calls would add a gap of
several µs per call that the engine pays once per step. The "dev" columns are the device time of
one call's kernels as CUPTI records them (`jax.experimental.mosaic.gpu.profiler.measure`: every
kernel the call launches, the wrapper's XLA ops included, without the launch gaps between them),
median of 20 calls; the read ceiling is then measured the same way. The "kernel" column is the
Mosaic GPU prefill kernel's own device time, without its wrapper's small XLA kernels (work items,
int clamps), which depend only on the step's metadata: the engine computes them once per step,
not once per layer; each call's kernels are listed above its row.

    python scripts/bench_attention.py [--quick] [--sweep] [--prefill] [--prefill-only]
                                      [--prefill-anchors] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_decode import bytes_read, paged_decode_attention, paged_decode_reference
from pallas_kernels.paged_prefill import paged_prefill_attention, prefill_flops
from pallas_kernels.paged_prefill_mgpu import available as mgpu_runs
from pallas_kernels.paged_prefill_mgpu import paged_prefill_attention_mgpu
from pallas_kernels.tuning import decode_params, mgpu_prefill_choice, prefill_params

HEADS = {"qwen2.5-7b": (28, 4, 128), "llama-3-8b": (32, 8, 128)}


def timeit(f, *args, iters: int = 20, rounds: int = 5) -> float:
    """Seconds per call on the device: `iters` calls dispatched back to back (JAX dispatch is
    asynchronous, so host launch overhead overlaps the GPU work), one sync; median of `rounds`."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    per_call = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = None
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t) / iters)
    return statistics.median(per_call)


def timeit_chained(f, q, *rest, chain: int = 10, iters: int = 3, rounds: int = 5) -> float:
    """Seconds per attention call as the model runs it: `chain` calls inside one executable, each
    call's output the next call's query (a data dependency, like consecutive layers), so the
    figure holds the kernel and its wrapper but not the gap between separately dispatched
    executables (~5-10 µs each, which the engine pays once per step, not per layer)."""
    def many(q, *rest):
        for _ in range(chain):
            q = f(q, *rest).astype(q.dtype)
        return q
    return timeit(many, q, *rest, iters=iters, rounds=rounds) / chain


def _kernel_runs(f, *args, iterations: int) -> list[dict[str, float]] | None:
    """Per call of `f` (`iterations` calls), the seconds of device time of each kernel name it
    launches, as CUPTI records them (same-named kernels of one call summed); None where CUPTI is
    unavailable (the reason is printed)."""
    try:
        from jax.experimental.mosaic.gpu import profiler
        if not isinstance(f, (jax.stages.Wrapped, jax.stages.Compiled)):
            f = jax.jit(f)   # (an executable compiled ahead of time is taken as it is)
        jax.block_until_ready(f(*args))
        _, runs = profiler.measure(f, aggregate=False, iterations=iterations)(*args)
    except Exception as e:  # keep the other figures: report why this one is missing
        print(f"  device time unavailable: {type(e).__name__}: {str(e)[:160]}")
        return None
    per_run = []
    for run in runs:
        d: dict[str, float] = {}
        for name, t in run:
            d[name] = d.get(name, 0.0) + t / 1e3
        per_run.append(d)
    return per_run


def device_time(f, *args, iterations: int = 20) -> float:
    """Seconds of device time per call of `f`: the sum of the kernels one call launches, median
    over `iterations` calls (NaN where CUPTI is unavailable)."""
    runs = _kernel_runs(f, *args, iterations=iterations)
    return float("nan") if runs is None else statistics.median(sum(d.values()) for d in runs)


def device_kernels(f, *args, iterations: int = 20) -> dict[str, float]:
    """Seconds of device time per call of `f` for each kernel name it launches (median over
    `iterations` calls): separates a Pallas kernel from the small XLA kernels of its wrapper.
    Empty where CUPTI is unavailable."""
    runs = _kernel_runs(f, *args, iterations=iterations) or []
    names = {n for d in runs for n in d}
    return {n: statistics.median(d.get(n, 0.0) for d in runs) for n in names}


def sweep_grid(grid: dict[str, tuple], make, args: tuple) -> list[dict]:
    """Time `make(config)` on `args` (chained) for every combination of the grid's values; rows
    {**config, "config": "k=v ...", "us"} sorted fastest first; a configuration that fails to
    compile is reported and skipped."""
    rows = []
    for values in itertools.product(*grid.values()):
        config = dict(zip(grid, values))
        label = " ".join(f"{k}={v}" for k, v in config.items())
        try:
            t = timeit_chained(make(config), *args, rounds=3)
        except Exception as e:  # keep sweeping: report what failed
            print(f"  sweep {label} failed: {type(e).__name__}")
            continue
        rows.append({**config, "config": label, "us": t * 1e6})
    return sorted(rows, key=lambda r: r["us"])


def read_ceiling() -> tuple[float, float]:
    """HBM read TB/s: best of three XLA reductions over 4 GiB of bf16, timed back to back and by
    CUPTI device time."""
    n = 2 << 30  # 4 GiB of bf16
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    best, best_dev = 0.0, 0.0
    for f in (jax.jit(lambda a: jnp.sum(a)), jax.jit(lambda a: jnp.max(a)),
              jax.jit(lambda a: jnp.sum(a.reshape(-1, 4096), axis=0))):
        best = max(best, n * 2 / timeit(f, x, iters=10, rounds=3) / 1e12)
        best_dev = max(best_dev, n * 2 / device_time(f, x, iterations=10) / 1e12)
    del x
    return best, best_dev


def matmul_ceiling() -> float:
    """bf16 TFLOP/s of an 8192^3 matmul (fp32 accumulation)."""
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * 8192 ** 3 / timeit(f, a, b, iters=10, rounds=3) / 1e12


def make_ragged(seqs, n, k, h, page=16, seed=0):
    """seqs: (cached, new) tokens per sequence; the cache holds every token's K/V."""
    rng = np.random.default_rng(seed)
    lens = [c + x for c, x in seqs]
    m = -(-max(lens) // page)
    pages = len(seqs) * m + 1
    kc = jax.random.normal(jax.random.key(seed), (pages, page, k, h), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(seed + 1), (pages, page, k, h), jnp.bfloat16)
    tables = rng.permutation(np.arange(1, pages))[: len(seqs) * m].reshape(len(seqs), m).astype(np.int32)
    qsl = np.concatenate([[0], np.cumsum([x for _, x in seqs])]).astype(np.int32)
    q = jax.random.normal(jax.random.key(seed + 2), (int(qsl[-1]), n, h), jnp.bfloat16)
    return q, kc, vc, tables, np.array(lens, np.int32), qsl


def bench_prefill(kind: str, sweep: bool) -> dict:
    from jaxserve.attention import AttentionSpec, build_metadata, paged_attention_blockwise

    tflops = matmul_ceiling()
    print(f"device: {kind}; bf16 matmul 8192^3: {tflops:.0f} TFLOP/s")
    cases = {"1 x 512 new": [(0, 512)], "1 x 2048 new": [(0, 2048)],
             "4 x 512 new after 1536 cached": [(1536, 512)] * 4}
    rows = []
    print("ours = the Triton-lowered kernel; mgpu = the Mosaic GPU kernel (Hopper); % of the matmul")
    print(f"{'heads':>11} {'step':>30} | {'ours µs':>8} {'TFLOP/s':>8} {'%':>4} | {'jnp µs':>8} {'TFLOP/s':>8} | err"
          f"   | dev: {'ours µs':>8} {'%':>4} | {'mgpu µs':>8} {'%':>4} | err   | dev: {'mgpu µs':>8} {'%':>4}"
          f" | kernel: {'mgpu µs':>8} {'%':>4}")
    for name, (n, k, h) in HEADS.items():
        for label, seqs in cases.items():
            q, kc, vc, tables, lens, qsl = make_ragged(seqs, n, k, h)
            flops = prefill_flops(qsl, lens, n, h)
            # device arrays: numpy inputs would be copied to the GPU on every timed call, a host
            # cost (~0.2 ms) that hid the kernel time of the small steps in earlier figures
            d_tables, d_lens, d_qsl = jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(qsl)
            bq, ppb, warps, stages = prefill_params(kind, n // k, h, 16)
            ours = jax.jit(lambda q, kc, vc, t, l, s: paged_prefill_attention(
                q, kc, vc, t, l, s, scale=h ** -0.5, block_q=bq, pages_per_block=ppb,
                num_warps=warps, num_stages=stages))
            t_ours = timeit_chained(ours, q, kc, vc, d_tables, d_lens, d_qsl)
            d_ours = device_time(ours, q, kc, vc, d_tables, d_lens, d_qsl)
            t_mg = d_mg = k_mg = float("nan")
            mgpu = mgpu_prefill_choice(kind, q.dtype, n, k, h, 16)
            if mgpu is not None:
                bkv, mst, mpp = mgpu
                mg = jax.jit(lambda q, kc, vc, t, l, s: paged_prefill_attention_mgpu(
                    q, kc, vc, t, l, s, scale=h ** -0.5, block_kv=bkv, stages=mst, pingpong=mpp))
                t_mg = timeit_chained(mg, q, kc, vc, d_tables, d_lens, d_qsl)
                d_mg = device_time(mg, q, kc, vc, d_tables, d_lens, d_qsl)
                parts = device_kernels(mg, q, kc, vc, d_tables, d_lens, d_qsl)
                k_mg = sum(t for n_, t in parts.items() if "mosaic" in n_) or float("nan")
                print("  mgpu call's kernels: " + ", ".join(
                    f"{n_[:48]} {t * 1e6:.1f} µs" for n_, t in sorted(parts.items(), key=lambda x: -x[1])))
            meta, pos = build_metadata([(tables[i].tolist(), c, x) for i, (c, x) in enumerate(seqs)],
                                       block_size=16, num_tokens=q.shape[0], num_seqs=len(seqs),
                                       max_blocks_per_seq=tables.shape[1])
            meta, pos = jax.tree.map(jnp.asarray, meta), jnp.asarray(pos)
            spec = AttentionSpec(scale=h ** -0.5)
            ref = jax.jit(lambda q, kc, vc, meta, pos: paged_attention_blockwise(q, kc, vc, meta, pos, spec))
            t_ref = timeit_chained(ref, q, kc, vc, meta, pos, chain=2, iters=2, rounds=3)
            want = ref(q, kc, vc, meta, pos).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(ours(q, kc, vc, d_tables, d_lens, d_qsl).astype(jnp.float32)
                                        - want)))
            err_mg = float("nan")
            if t_mg == t_mg:
                err_mg = float(jnp.max(jnp.abs(mg(q, kc, vc, d_tables, d_lens, d_qsl)
                                               .astype(jnp.float32) - want)))
            tf = lambda t: flops / t / 1e12
            row = {"heads": name, "step": label, "flops": flops, "ours_us": t_ours * 1e6,
                   "ours_tflops": tf(t_ours), "ours_pct": 100 * tf(t_ours) / tflops,
                   "jnp_us": t_ref * 1e6, "jnp_tflops": tf(t_ref), "max_abs_err": err,
                   "ours_dev_us": d_ours * 1e6, "ours_dev_pct": 100 * tf(d_ours) / tflops,
                   "params": {"block_q": bq, "ppb": ppb, "warps": warps, "stages": stages},
                   "mgpu_us": t_mg * 1e6, "mgpu_pct": 100 * tf(t_mg) / tflops,
                   "mgpu_dev_us": d_mg * 1e6, "mgpu_dev_pct": 100 * tf(d_mg) / tflops,
                   "mgpu_max_abs_err": err_mg,
                   # the Mosaic kernel alone, without its wrapper's small XLA kernels (work items,
                   # int clamps), which the engine computes once per step, not once per layer
                   "mgpu_kernel_us": k_mg * 1e6, "mgpu_kernel_pct": 100 * tf(k_mg) / tflops}
            rows.append(row)
            print(f"{name:>11} {label:>30} | {row['ours_us']:>8.1f} {row['ours_tflops']:>8.1f} "
                  f"{row['ours_pct']:>4.0f} | {row['jnp_us']:>8.1f} {row['jnp_tflops']:>8.1f} | {err:.3f} | "
                  f"dev: {row['ours_dev_us']:>8.1f} {row['ours_dev_pct']:>4.0f} | "
                  f"{row['mgpu_us']:>8.1f} {row['mgpu_pct']:>4.0f} | {err_mg:.3f} | "
                  f"dev: {row['mgpu_dev_us']:>8.1f} {row['mgpu_dev_pct']:>4.0f} | "
                  f"kernel: {row['mgpu_kernel_us']:>8.1f} {row['mgpu_kernel_pct']:>4.0f}",
                  flush=True)
    best = []
    if sweep:
        n, k, h = HEADS["qwen2.5-7b"]
        q, kc, vc, tables, lens, qsl = make_ragged([(0, 2048)], n, k, h)
        flops = prefill_flops(qsl, lens, n, h)
        tables, lens, qsl = jnp.asarray(tables), jnp.asarray(lens), jnp.asarray(qsl)
        grid = {"block_q": (8, 16, 32), "ppb": (4, 8), "warps": (4, 8), "stages": (1, 2, 3)}
        best = sweep_grid(grid, lambda c: lambda q, kc, vc, t, l, s: paged_prefill_attention(
            q, kc, vc, t, l, s, scale=h ** -0.5, block_q=c["block_q"], pages_per_block=c["ppb"],
            num_warps=c["warps"], num_stages=c["stages"]), (q, kc, vc, tables, lens, qsl))
        if mgpu_runs():
            grid = {"pingpong": (True, False), "stages_bkv": ((2, 128), (3, 64), (4, 64))}
            best += [dict(r, kernel="mgpu") for r in sweep_grid(
                grid, lambda c: lambda q, kc, vc, t, l, s: paged_prefill_attention_mgpu(
                    q, kc, vc, t, l, s, scale=h ** -0.5, pingpong=c["pingpong"],
                    stages=c["stages_bkv"][0], block_kv=c["stages_bkv"][1]),
                (q, kc, vc, tables, lens, qsl))]
            best.sort(key=lambda r: r["us"])
        for r in best:
            r["tflops"] = flops / r["us"] / 1e6
        print("prefill sweep (qwen heads, 1 x 2048 new), best first:")
        for r in best[:8]:
            print(f"  {r['config']}: {r['us']:.1f} µs {r['tflops']:.1f} TFLOP/s "
                  f"({100 * r['tflops'] / tflops:.0f}%)")
    return {"matmul_tflops": tflops, "rows": rows, "sweep": best}


def bench_prefill_anchors(tflops: float) -> list[dict]:
    """JAX's own flash-attention kernels on one 2048-token causal chunk with Qwen2.5-7B heads and
    contiguous (unpaged) K/V, per call chained: `ops.gpu.attention` (Triton lowering; kv heads
    repeated to the query heads) and `ops.gpu.attention_mgpu` (Mosaic GPU: TMA, wgmma,
    warp-specialised; fp16, as its shared-memory scratch is fp16-only). A few tilings each, best
    first; what a non-paged kernel reaches on the shape of our prefill target."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    n, k, h = HEADS["qwen2.5-7b"]
    length = 2048
    q, *_, lens, qsl = make_ragged([(0, length)], n, k, h)
    flops = prefill_flops(qsl, lens, n, h)
    q = q[None]                                                        # [1, T, N, H]
    kk = jax.random.normal(jax.random.key(5), (1, length, k, h), jnp.bfloat16)
    vv = jax.random.normal(jax.random.key(6), (1, length, k, h), jnp.bfloat16)
    ke, ve = jnp.repeat(kk, n // k, axis=2), jnp.repeat(vv, n // k, axis=2)
    rows = []

    def run(label, fn, *args):
        try:
            t = timeit_chained(fn, *args)
        except Exception as e:  # keep going: report what failed
            print(f"  {label} failed: {type(e).__name__}: {str(e)[:120]}")
            return
        rows.append({"kernel": label, "us": t * 1e6, "tflops": flops / t / 1e12,
                     "pct": 100 * flops / t / 1e12 / tflops})

    for bq, bk, warps, stages in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)):
        sizes = triton_attention.BlockSizes(block_q=bq, block_k=bk)
        run(f"ops.gpu.attention (Triton) block_q={bq} block_k={bk} warps={warps} stages={stages}",
            lambda q, ke, ve, sizes=sizes, warps=warps, stages=stages: triton_attention.mha(
                q, ke, ve, None, sm_scale=h ** -0.5, causal=True, block_sizes=sizes,
                num_warps=warps, num_stages=stages), q, ke, ve)
    q16, k16, v16 = (x.astype(jnp.float16) for x in (q, kk, vv))
    for bkv, steps in ((64, 2), (128, 2)):
        config = attention_mgpu.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=steps,
                                             causal=True)
        run(f"ops.gpu.attention_mgpu (Mosaic GPU, fp16) block_q=64 block_kv={bkv} steps={steps}",
            lambda q, kk, vv, config=config: attention_mgpu.attention(q, kk, vv, config),
            q16, k16, v16)
    rows.sort(key=lambda r: r["us"])
    print("JAX's flash kernels, contiguous K/V, qwen heads, 1 x 2048 causal, best first:")
    for r in rows:
        print(f"  {r['kernel']}: {r['us']:.1f} µs {r['tflops']:.1f} TFLOP/s ({r['pct']:.0f}%)")
    return rows


def make_case(batch, length, n, k, h, page=16, seed=0):
    rng = np.random.default_rng(seed)
    m = length // page
    pages = batch * m + 1
    kc = jax.random.normal(jax.random.key(seed), (pages, page, k, h), jnp.bfloat16)
    vc = jax.random.normal(jax.random.key(seed + 1), (pages, page, k, h), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(np.arange(1, pages))[: batch * m].reshape(batch, m), jnp.int32)
    lens = jnp.full((batch,), length, jnp.int32)
    q = jax.random.normal(jax.random.key(seed + 2), (batch, n, h), jnp.bfloat16)
    return q, kc, vc, tables, lens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--sweep", action="store_true", help="tune splits/pages_per_block/warps on B=64 L=2048")
    ap.add_argument("--prefill", action="store_true", help="also the ragged prefill kernel")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--prefill-anchors", action="store_true",
                    help="with --prefill: also JAX's own (unpaged) flash kernels on the 2048-token chunk")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa

    kind = jax.devices()[0].device_kind
    prefill = None
    if args.prefill or args.prefill_only:
        prefill = bench_prefill(kind, args.sweep)
        if args.prefill_anchors:
            prefill["anchors"] = bench_prefill_anchors(prefill["matmul_tflops"])
    if args.prefill_only:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": kind, "prefill": prefill}, f, indent=1)
        return
    ceiling, ceiling_dev = read_ceiling()
    print(f"device: {kind}; HBM read ceiling (best of sum/max over 4 GiB bf16): {ceiling:.2f} TB/s "
          f"back to back, {ceiling_dev:.2f} TB/s by device time")
    rows = []
    batches = [1, 64] if args.quick else [1, 8, 64, 256]
    lengths = [2048] if args.quick else [512, 2048, 8192]
    print(f"{'heads':>11} {'B':>4} {'L':>5} | {'ours µs':>8} {'TB/s':>5} {'%':>4} | {'jax µs':>8} {'TB/s':>5} "
          f"{'%':>4} | {'jnp µs':>8} {'TB/s':>5} | ours/jax | dev: {'ours µs':>8} {'%':>4} {'jax µs':>8} {'%':>4}")
    for name, (n, k, h) in HEADS.items():
        for b in batches:
            for length in lengths:
                q, kc, vc, tables, lens = make_case(b, length, n, k, h)
                nbytes = bytes_read([length] * b, k, h, 2)
                splits, ppb, warps, stages = decode_params(kind, b, n, k, h, 16, tables.shape[1])
                ours = jax.jit(lambda q, kc, vc, t, l: paged_decode_attention(
                    q, kc, vc, t, l, scale=h ** -0.5, splits=splits, pages_per_block=ppb,
                    num_warps=warps, num_stages=stages))
                t_ours = timeit_chained(ours, q, kc, vc, tables, lens)
                ref = paged_decode_reference(q, kc, vc, tables, lens, scale=h ** -0.5)
                got = ours(q, kc, vc, tables, lens)
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
                kc_h, vc_h = jnp.transpose(kc, (2, 0, 1, 3)), jnp.transpose(vc, (2, 0, 1, 3))
                ksplit = min(16, tables.shape[1])
                jfn = jax.jit(lambda q, kc, vc, t, l: jax_pa.paged_attention(
                    q, kc, vc, t, l, k_splits=ksplit, pages_per_compute_block=min(8, tables.shape[1] // ksplit)))
                try:
                    t_jax = timeit_chained(jfn, q, kc_h, vc_h, tables, lens)
                except Exception as e:  # keep going: report what failed
                    print(f"  jax paged_attention failed: {type(e).__name__}: {str(e)[:120]}")
                    t_jax = float("nan")
                d_ours = device_time(ours, q, kc, vc, tables, lens)
                d_jax = device_time(jfn, q, kc_h, vc_h, tables, lens) if t_jax == t_jax else float("nan")
                t_ref = float("nan")
                if b * length <= 64 * 2048:
                    rfn = jax.jit(lambda q, kc, vc, t, l: paged_decode_reference(q, kc, vc, t, l, scale=h ** -0.5))
                    t_ref = timeit_chained(rfn, q, kc, vc, tables, lens, chain=2, iters=2, rounds=3)
                tbs = lambda t: nbytes / t / 1e12
                row = {"heads": name, "batch": b, "len": length, "bytes": nbytes, "max_abs_err": err,
                       "ours_us": t_ours * 1e6, "ours_tbs": tbs(t_ours), "ours_pct": 100 * tbs(t_ours) / ceiling,
                       "jax_us": t_jax * 1e6, "jax_tbs": tbs(t_jax), "jax_pct": 100 * tbs(t_jax) / ceiling,
                       "ref_us": t_ref * 1e6, "ref_tbs": tbs(t_ref),
                       "ours_dev_us": d_ours * 1e6, "ours_dev_pct": 100 * tbs(d_ours) / ceiling_dev,
                       "jax_dev_us": d_jax * 1e6, "jax_dev_pct": 100 * tbs(d_jax) / ceiling_dev,
                       "params": {"splits": splits, "ppb": ppb, "warps": warps, "stages": stages}}
                rows.append(row)
                print(f"{name:>11} {b:>4} {length:>5} | {row['ours_us']:>8.1f} {row['ours_tbs']:>5.2f} "
                      f"{row['ours_pct']:>4.0f} | {row['jax_us']:>8.1f} {row['jax_tbs']:>5.2f} {row['jax_pct']:>4.0f} | "
                      f"{row['ref_us']:>8.1f} {row['ref_tbs']:>5.2f} | {t_jax / t_ours:>5.2f}x  err {err:.3f} | "
                      f"dev: {row['ours_dev_us']:>8.1f} {row['ours_dev_pct']:>4.0f} {row['jax_dev_us']:>8.1f} "
                      f"{row['jax_dev_pct']:>4.0f}",
                      flush=True)
                del kc, vc, kc_h, vc_h
    sweep = []
    if args.sweep:
        n, k, h = HEADS["qwen2.5-7b"]
        q, kc, vc, tables, lens = make_case(64, 2048, n, k, h)
        nbytes = bytes_read([2048] * 64, k, h, 2)
        grid = {"splits": (1, 2), "ppb": (4, 8, 16), "warps": (2, 4, 8), "stages": (2, 3, 4)}
        sweep = sweep_grid(grid, lambda c: lambda q, kc, vc, t, l: paged_decode_attention(
            q, kc, vc, t, l, scale=h ** -0.5, splits=c["splits"], pages_per_block=c["ppb"],
            num_warps=c["warps"], num_stages=c["stages"]), (q, kc, vc, tables, lens))
        for r in sweep:
            r["tbs"] = nbytes / r["us"] / 1e6
        print("sweep (qwen heads, B=64, L=2048), best first:")
        for r in sweep[:8]:
            print(f"  {r['config']}: {r['us']:.1f} µs {r['tbs']:.2f} TB/s ({100 * r['tbs'] / ceiling:.0f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": kind, "ceiling_tbs": ceiling, "ceiling_dev_tbs": ceiling_dev,
                       "rows": rows, "sweep": sweep,
                       "prefill": prefill}, f, indent=1)


if __name__ == "__main__":
    main()
