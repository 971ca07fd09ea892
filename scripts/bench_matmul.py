"""Decode-shaped weight matmuls (GPU machine): XLA's GEMM against our skinny-matmul kernel.

For each weight of a model shape (whole, and one GPU's shard under tp=2) and each row count: the
device time of one `x @ w` (CUPTI: every kernel the call launches, the split-K sums included;
each call runs over enough distinct copies of the weight, >= 256 MB, that none is read from L2,
as in a model whose layers each read their own weights, each copy with its own activation), XLA's
default against the best of a sweep of the kernel's launch parameters, as µs, TB/s and % of
the HBM read ceiling measured in the same run. Every configuration's result is checked against the
jnp reference before it is timed. Configurations compile in parallel threads. Ends with the
`MATMUL_TABLE` lines (pallas_kernels/tuning.py) for the shapes where the kernel was >= 3% faster.
For the fused gate/up weights it also times the MLP's activation: XLA's product + SwiGLU fusions
against the kernel's SwiGLU epilogue (at the best configuration, where it has one split).

    python scripts/bench_matmul.py [--model qwen2.5-7b] [--rows 64 32 16] [--only NAME ...] [--quick]
                                   [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import device_time, read_ceiling  # noqa: E402
from jaxserve.models.registry import preset_config  # noqa: E402
from pallas_kernels.skinny_matmul import (skinny_matmul, skinny_matmul_reference,  # noqa: E402
                                          supports)
from pallas_kernels.tuning import matmul_params  # noqa: E402


# the kernel's launch parameters, in MATMUL_TABLE's order
KNOBS = ("block_n", "block_k", "splits", "num_warps", "num_stages")


def weight_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(K, N) of the four projections of a layer as the model stores them (fused q/k/v, o, fused
    gate/up, down), whole and as one GPU's shard under tp=2."""
    c = preset_config(model)
    d, f, n, k, h = c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    whole = {"qkv": (d, (n + 2 * k) * h), "o": (n * h, d), "gate_up": (d, 2 * f), "down": (f, d)}
    halves = {"qkv/2": (d, (n + 2 * k) * h // 2), "o/2": (n * h // 2, d),
              "gate_up/2": (d, f), "down/2": (f // 2, d)}
    return {**whole, **halves}


def grid(m: int, k: int, n: int, quick: bool) -> list[dict]:
    rows = max(16, 1 << (m - 1).bit_length())
    out = []
    for bn, bk, splits, warps, stages in itertools.product(
            (32, 64, 128, 256), (64, 128, 256), (1, 2, 3, 4, 5, 6, 8, 12, 16), (4, 8), (3, 4, 5)):
        if not supports(m, k, n, block_n=bn, block_k=bk, splits=splits):
            continue
        programs = n // bn * splits
        smem = stages * (bk * bn + rows * bk) * 2
        if not 64 <= programs <= 2048 or smem > 200 * 1024 or (warps == 8 and bn < 128):
            continue
        # the fp32 partials (written, then read by the sum) at most ~1/4 of the weight's bytes
        if splits > 1 and splits * rows * 4 * n > k * n * 2 / 4:
            continue
        # quick: 4 warps (8 never led a sweep), 3-4 stages, 64-128-row pieces, and no more
        # programs than ~4 per SM
        if quick and (warps == 8 or stages == 5 or bk == 256 or programs > 528):
            continue
        out.append(dict(zip(KNOBS, (bn, bk, splits, warps, stages))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--only", nargs="*", help="weight names to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="a smaller sweep")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    kind = jax.devices()[0].device_kind
    ceiling, ceiling_dev = read_ceiling()
    print(f"device: {kind}; HBM read ceiling {ceiling:.2f} TB/s back to back, {ceiling_dev:.2f} "
          f"TB/s by device time", flush=True)
    results = []
    for m in args.rows:
        for name, (k, n) in weight_shapes(args.model).items():
            if args.only and name not in args.only:
                continue
            x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
            w = (jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
            mb = k * n * 2 / 1e6
            copies = min(32, math.ceil(256 / mb))
            ws = [w] + [jnp.array(w, copy=True) for _ in range(copies - 1)]
            # a copy of x per weight too: XLA merges dots that share an operand (its weight
            # copies would then be concatenated, and timed)
            xs = [x] + [jnp.array(x, copy=True) for _ in range(copies - 1)]
            ref = skinny_matmul_reference(x, w).astype(jnp.float32)
            tol = 0.01 * float(jnp.max(jnp.abs(ref)))   # a few bf16 roundings of the output
            pct = lambda us: 100 * (mb / us) / ceiling_dev   # MB / µs = TB/s
            per_call = lambda f: device_time(f, *xs, *ws, iterations=10) * 1e6 / copies
            t_xla = per_call(jax.jit(over_copies(lambda a, b: a @ b)))
            configs = grid(m, k, n, args.quick)

            def build(cfg):
                f = jax.jit(over_copies(kernel(cfg)))
                return cfg, f.lower(*xs, *ws).compile()

            rows = []
            with cf.ThreadPoolExecutor(12) as pool:
                for fut in cf.as_completed([pool.submit(build, c) for c in configs]):
                    try:
                        cfg, f = fut.result()
                    except Exception as e:  # keep sweeping: report what failed
                        print(f"  compile failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    err = float(jnp.max(jnp.abs(f(*xs, *ws)[0].astype(jnp.float32) - ref)))
                    if not err <= tol:
                        print(f"  WRONG {cfg}: max abs err {err} (tolerance {tol:.3f})")
                        continue
                    rows.append({**cfg, "us": per_call(f)})
            rows = sorted((r for r in rows if r["us"] == r["us"]), key=lambda r: r["us"])   # (NaN: no CUPTI record)
            chosen = matmul_params(kind, m, k, n)
            t_chosen = None
            if chosen is not None:
                t_chosen = per_call(jax.jit(over_copies(kernel(dict(zip(KNOBS, chosen))))))
            best = rows[0] if rows else None
            print(f"M={m:3d} {name:10s} {mb:6.1f} MB | XLA {t_xla:6.1f} µs ({pct(t_xla):3.0f}%)"
                  + (f" | best {best['us']:6.1f} µs ({pct(best['us']):3.0f}%) "
                     f"bn={best['block_n']} bk={best['block_k']} s={best['splits']} "
                     f"w={best['num_warps']} st={best['num_stages']}" if best else " | no config")
                  + (f" | table {t_chosen:6.1f} µs ({pct(t_chosen):3.0f}%) {chosen}"
                     if t_chosen else ""), flush=True)
            for r in rows[1:4]:
                print(f"      {r['us']:6.1f} µs bn={r['block_n']} bk={r['block_k']} s={r['splits']} "
                      f"w={r['num_warps']} st={r['num_stages']}")
            glu = {}
            cfg = {c: best[c] for c in KNOBS} if best else None
            if name.startswith("gate_up") and cfg and supports(
                    m, k, n, block_n=cfg["block_n"], block_k=cfg["block_k"], splits=cfg["splits"],
                    glu=True):
                # the MLP as the engine runs it: product + SwiGLU, XLA's fusions vs the epilogue
                xla_act = lambda a, b: (lambda g, u: jax.nn.silu(g) * u)(*jnp.split(a @ b, 2, axis=1))
                glu = {"xla_glu_us": per_call(jax.jit(over_copies(xla_act))),
                       "glu_us": per_call(jax.jit(over_copies(kernel(cfg, glu=True))))}
                print(f"      with the SwiGLU: XLA {glu['xla_glu_us']:6.1f} µs, kernel's epilogue "
                      f"{glu['glu_us']:6.1f} µs")
            results.append({"rows": m, "weight": name, "k": k, "n": n, "mb": mb, "xla_us": t_xla,
                            "table_us": t_chosen, "sweep": rows[:8], **glu})
            if args.json:   # after every shape, so a run stopped early keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump({"device": kind, "model": args.model, "ceiling_dev_tbs": ceiling_dev,
                               "results": results}, fh, indent=1)
    # the entries for pallas_kernels/tuning.py's MATMUL_TABLE: shapes where the kernel's best was
    # >= 3% faster than XLA's GEMM
    card = kind.removeprefix("NVIDIA ")   # the table's key: the card as measured
    print("MATMUL_TABLE entries (>= 3% faster than XLA; gate/up with the SwiGLU both ways):")
    for r in results:
        if not r["sweep"]:
            continue
        b = r["sweep"][0]
        # the fused gate/up weight is only ever projected with its SwiGLU (layers.MLP): judged
        # by the epilogue against XLA's product + activation where the best has one split
        xla_us, us = (r["xla_glu_us"], r["glu_us"]) if "glu_us" in r else (r["xla_us"], b["us"])
        if us <= 0.97 * xla_us:
            tile = max(16, 1 << (r["rows"] - 1).bit_length())
            print(f'    ("{card}", {tile}, {r["k"]}, {r["n"]}): ({b["block_n"]}, {b["block_k"]}, '
                  f'{b["splits"]}, {b["num_warps"]}, {b["num_stages"]}),   # {r["weight"]} '
                  f'{xla_us:.1f} -> {us:.1f}')


def over_copies(mm):
    """*xs, *ws -> (mm(x, w) for each pair of copies): one call reads every weight copy once."""
    def f(*args):
        half = len(args) // 2
        return tuple(mm(a, w) for a, w in zip(args[:half], args[half:]))
    return f


def kernel(cfg: dict, glu: bool = False):
    """x, w -> the skinny matmul at the launch parameters `cfg` (KNOBS)."""
    return lambda a, b: skinny_matmul(a, b, **cfg, glu=glu)


if __name__ == "__main__":
    main()
