"""Host cost of launching one executable over several GPUs, and what each all-reduce adds to it.

    python experiments/bench_launch.py --chain 228 --psum-every 0 4 2

A chain of `--chain` dependent small matmuls ([64, 512] x [512, 512] bf16 then tanh: XLA cannot
fuse them, so each is its own kernel) runs as one jitted executable: on one GPU, then the same
program per device over a mesh of two GPUs (`shard_map`), with a `psum` over both after every N-th
matmul (0: none). A decode step of a 28-layer model under tp=2 has ~440 kernels and 57 all-reduces
per GPU: `--chain 228 --psum-every 4` has the same number of all-reduces. For each case it prints
the median host time inside the call (device idle before it), call + wait, and the time per call
dispatched back to back (the larger of host and device time). XLA options go in through
`XLA_FLAGS` as usual, e.g. `--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def chain(x, ws, *, length: int, every: int):
    for i in range(length):
        x = jnp.tanh(x @ ws[i % ws.shape[0]])
        if every and (i + 1) % every == 0:
            x = jax.lax.psum(x, "tp") * 0.5
    return x


def times_ms(f, *args, n: int = 30) -> tuple[float, float, float]:
    """(host time inside the call, call + wait, per call back to back), medians in ms."""
    jax.block_until_ready(f(*args))
    host, whole = [], []
    for _ in range(n):
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        out = f(*args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        host.append(t1 - t0)
        whole.append(time.perf_counter() - t0)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        runs.append((time.perf_counter() - t0) / n)
    return tuple(1e3 * statistics.median(v) for v in (host, whole, runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=228, help="dependent matmuls per call")
    ap.add_argument("--psum-every", type=int, nargs="+", default=[0, 4, 2])
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()

    devices = jax.devices()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 512)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 512, 512)) * 0.04, jnp.bfloat16)
    rows = []
    one = jax.jit(lambda x, w: chain(x, w, length=args.chain, every=0))
    rows.append(("1 GPU", "-", *times_ms(one, jax.device_put(x, devices[0]),
                                         jax.device_put(w, devices[0]), n=args.calls)))
    if len(devices) >= 2:
        mesh = Mesh(np.array(devices[:2]), ("tp",))
        split = NamedSharding(mesh, P("tp"))
        x2 = jax.device_put(jnp.concatenate([x, x]), split)
        w2 = jax.device_put(jnp.concatenate([w, w]), split)
        for every in args.psum_every:
            body = lambda x, w, every=every: chain(x, w, length=args.chain, every=every)  # noqa: E731
            f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P("tp")),
                                      out_specs=P("tp"), check_vma=False))
            psums = args.chain // every if every else 0
            rows.append(("2 GPUs", str(psums), *times_ms(f, x2, w2, n=args.calls)))
    print(f"device: {devices[0].device_kind}; chain of {args.chain} matmuls per call")
    print_times(rows, "psums", 6)


def print_times(rows, label: str, width: int) -> None:
    """A table of (mesh, label, host, call+wait, back-to-back) rows from `times_ms`."""
    print(f"{'mesh':>7} {label:>{width}} {'host ms':>8} {'call+wait':>10} {'back-to-back':>13}")
    for mesh_name, what, h, cw, bb in rows:
        print(f"{mesh_name:>7} {what:>{width}} {h:8.3f} {cw:10.3f} {bb:13.3f}")


if __name__ == "__main__":
    main()
