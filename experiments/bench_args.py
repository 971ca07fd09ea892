"""Host cost of an executable's argument count: many weight arrays vs the same weights stacked.

    python experiments/bench_args.py [--weights 256]

A chain of `--weights` small matmuls (x = tanh(x @ w_i), [64, 128] x [128, 128] bf16: device time
is small) runs as one executable, its weights passed either as that many separate arrays (as the
engine passes a model's ~260 parameters today) or as one stacked [N, 128, 128] array indexed
statically. Same kernels, different argument count. On one GPU and, per device under
`shard_map`, on two. Prints the median host time inside the call (device idle before it), call +
wait, and the time per call back to back (bench_launch.py's `times_ms`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_launch import print_times, times_ms  # noqa: E402


def chain_separate(x, *ws):
    for w in ws:
        x = jnp.tanh(x @ w)
    return x


def chain_stacked(x, w):
    for i in range(w.shape[0]):
        x = jnp.tanh(x @ w[i])
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", type=int, default=256)
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    n = args.weights
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, 128, 128)) * 0.09, jnp.bfloat16)
    devices = jax.devices()
    rows = []
    d0 = devices[0]
    xs, ws = jax.device_put(x, d0), jax.device_put(w, d0)
    sep = [ws[i] for i in range(n)]
    jax.block_until_ready(sep)
    rows.append(("1 GPU", f"{n} arrays", *times_ms(jax.jit(chain_separate), xs, *sep, n=args.calls)))
    rows.append(("1 GPU", "1 stacked", *times_ms(jax.jit(chain_stacked), xs, ws, n=args.calls)))
    if len(devices) >= 2:
        mesh = Mesh(np.array(devices[:2]), ("tp",))
        split = NamedSharding(mesh, P("tp"))
        x2 = jax.device_put(jnp.concatenate([x, x]), split)
        w2 = jax.device_put(jnp.concatenate([w, w], axis=1), NamedSharding(mesh, P(None, "tp")))
        sep2 = [jax.device_put(jnp.concatenate([w[i], w[i]]), split) for i in range(n)]
        f_sep = jax.jit(jax.shard_map(chain_separate, mesh=mesh, in_specs=(P("tp"),) * (n + 1),
                                      out_specs=P("tp"), check_vma=False))
        f_stk = jax.jit(jax.shard_map(chain_stacked, mesh=mesh, in_specs=(P("tp"), P(None, "tp")),
                                      out_specs=P("tp"), check_vma=False))
        rows.append(("2 GPUs", f"{n} arrays", *times_ms(f_sep, x2, *sep2, n=args.calls)))
        rows.append(("2 GPUs", "1 stacked", *times_ms(f_stk, x2, w2, n=args.calls)))
        rows.append(("1 GPU", f"{n} arrays (again)",
                     *times_ms(jax.jit(chain_separate), xs, *sep, n=args.calls)))
    print(f"device: {d0.device_kind}; {n} matmuls per call")
    print_times(rows, "weights", 18)


if __name__ == "__main__":
    main()
