"""What a busy Python thread does to a thread that calls executables (the GIL hand-off).

    python experiments/bench_gil.py [--switch-interval 0.005 0.001 0.0002]

An executable call releases the GIL while XLA works; a second thread running Python then holds it
until its switch interval runs out, so each call of the first thread can wait that long. The
serving path has this shape (the engine thread calls the step executables, the asyncio loop on
another thread streams the outputs). Prints the time of N calls alone and beside a busy thread.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import jax
import jax.numpy as jnp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--switch-interval", type=float, nargs="+", default=[0.005, 0.001, 0.0002])
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    xs = [jnp.ones((4,), jnp.float32) + i for i in range(300)]   # host work in the call: arguments
    exe = jax.jit(lambda *a: sum(v * 1.0001 for v in a)).lower(*xs).compile()
    jax.block_until_ready(exe(*xs))

    def calls() -> float:
        t0 = time.perf_counter()
        for _ in range(args.calls):
            out = exe(*xs)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    def busy(stop: threading.Event) -> None:
        while not stop.is_set():
            sum(range(200))

    print(f"{'switch interval s':>18} {'alone ms':>9} {'beside a busy thread ms':>24}")
    for interval in args.switch_interval:
        sys.setswitchinterval(interval)
        alone = calls()
        stop = threading.Event()
        th = threading.Thread(target=busy, args=(stop,))
        th.start()
        beside = calls()
        stop.set()
        th.join()
        print(f"{interval:18.4f} {1e3 * alone:9.0f} {1e3 * beside:24.0f}")


if __name__ == "__main__":
    main()
