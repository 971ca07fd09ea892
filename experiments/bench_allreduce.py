"""The peer-memory all-reduce against XLA's psum: same results, and what a chain of them costs.

    python experiments/bench_allreduce.py [--rows 64] [--width 3584] [--chain 57]

Needs two or more GPUs in this process. First checks that `pallas_kernels.peer_all_reduce` gives
exactly XLA's psum (bit for bit) over several shapes and dtypes, and over many calls in a row of
mixed sizes (the epochs and slots of its comm buffers); then times one executable holding
`--chain` (matmul [rows, width] x [width, width], all-reduce) pairs, as a tp=2 decode step of a
28-layer model holds 57 all-reduces: XLA psum (NCCL), XLA psum with its one-shot kernel, the peer
all-reduce, and no all-reduce at all. Prints the median host time inside the call (device idle
before it), call + wait, and the time per call dispatched back to back.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_launch import times_ms  # noqa: E402
from jaxserve.collectives import PeerBuffers, TensorParallel  # noqa: E402

ONE_SHOT = {"xla_gpu_unsupported_use_all_reduce_one_shot_kernel": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--width", type=int, default=3584)
    ap.add_argument("--chain", type=int, default=57)
    ap.add_argument("--ranks", type=int, default=2)
    args = ap.parse_args()
    n = args.ranks
    devices = jax.devices()[:n]
    if len(devices) < n or devices[0].platform != "gpu":
        sys.exit(f"needs {n} GPUs in this process")
    mesh = Mesh(np.array(devices).reshape(1, n), ("dp", "tp"))
    split = NamedSharding(mesh, P("tp"))
    t0 = time.perf_counter()
    comm = PeerBuffers(mesh, capacity_bytes=512 * 8192 * 4)
    print(f"device: {devices[0].device_kind} x {n}; comm buffers {comm.nbytes / 2**20:.1f} MiB "
          f"each, set up in {time.perf_counter() - t0:.2f}s")
    peer, xla = comm.tp, TensorParallel("tp", n)
    rng = np.random.default_rng(0)

    def per_rank(fn, tp):
        body = lambda x, table: fn(x, TensorParallel(tp.axis, tp.size, table, tp.capacity_bytes)  # noqa: E731
                                   if tp.table is not None else tp)
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P("tp")),
                                     out_specs=P("tp"), check_vma=False))

    # -- exactness ----------------------------------------------------------------------------
    bad = 0
    cases = [((2, 3584), jnp.bfloat16), ((64, 3584), jnp.bfloat16), ((512, 3584), jnp.bfloat16),
             ((1000, 3), jnp.float32), ((7, 4096), jnp.float16), ((1, 5), jnp.bfloat16)]
    fns = {}
    for shape, dtype in cases:
        x = jax.device_put(jnp.asarray(rng.standard_normal((n * shape[0], *shape[1:])), dtype), split)
        fns[shape] = (x, per_rank(lambda x, tp: tp.psum(x), peer),
                      per_rank(lambda x, tp: tp.psum(x), xla))
    for it in range(50):      # mixed sizes back to back: epochs and slots of every program index
        for shape, (x, f_peer, f_xla) in fns.items():
            got, want = np.asarray(f_peer(x, comm.table)), np.asarray(f_xla(x, comm.table))
            if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
                bad += 1
                if bad < 5:
                    print(f"MISMATCH {shape} call {it}: max |diff| "
                          f"{np.abs(got.astype(np.float32) - want.astype(np.float32)).max()}")
    chain_ok = per_rank(lambda x, tp: [x := tp.psum(x) * 0.5 for _ in range(9)][-1], peer)
    chain_ref = per_rank(lambda x, tp: [x := tp.psum(x) * 0.5 for _ in range(9)][-1], xla)
    x = fns[(64, 3584)][0]
    for _ in range(20):
        if not np.array_equal(np.asarray(chain_ok(x, comm.table)), np.asarray(chain_ref(x, comm.table))):
            bad += 1
    print(f"exactness: {'OK' if bad == 0 else f'{bad} MISMATCHES'} "
          f"({len(cases)} shapes x 50 rounds + 20 chains of 9)")

    # -- a step's worth of all-reduces --------------------------------------------------------
    r, d = args.rows, args.width
    x = jax.device_put(jnp.asarray(rng.standard_normal((n * r, d)), jnp.bfloat16), split)
    w = jax.device_put(jnp.asarray(rng.standard_normal((n * d, d)) * d ** -0.5, jnp.bfloat16), split)

    def step(reduce):
        def body(x, w, table):
            tp = TensorParallel("tp", n, table, comm.tp.capacity_bytes) if reduce == "peer" else xla
            for _ in range(args.chain):
                y = x @ w
                x = (tp.psum(y) if reduce != "none" else y + y) * 0.5
            return x
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P("tp"), P("tp")),
                                     out_specs=P("tp"), check_vma=False))

    rows = []
    for name, reduce, options in [("none", "none", None), ("XLA psum (NCCL)", "xla", None),
                                  ("XLA psum one-shot", "xla", ONE_SHOT), ("peer", "peer", None),
                                  ("none (again)", "none", None), ("peer (again)", "peer", None)]:
        exe = step(reduce).lower(x, w, comm.table).compile(options)
        rows.append((name, *times_ms(exe, x, w, comm.table)))
    print(f"chain of {args.chain} x (matmul [{r}, {d}] x [{d}, {d}], all-reduce) per call")
    print(f"{'all-reduce':>20} {'host ms':>8} {'call+wait':>10} {'back-to-back':>13} {'per AR us':>10}")
    base = min(b for name, _, _, b in rows if name.startswith("none"))
    for name, h, cw, bb in rows:
        print(f"{name:>20} {h:8.3f} {cw:10.3f} {bb:13.3f} {1e3 * (bb - base) / args.chain:10.1f}")


if __name__ == "__main__":
    main()
