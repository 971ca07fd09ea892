"""Where does a decode step's time go? (GPU machine)

    python scripts/profile_step.py --model qwen2.5-7b --batches 1 64 --context 512

Builds the engine's model runner on dummy weights of a real shape, feeds decode steps whose
sequences already hold `--context` tokens, and reports for each batch size:
  * the device step time of variants dispatched back to back (median of rounds): the engine's
    decode step with each sampler mode, the forward + logits alone, and the weight matmuls alone;
  * a profile of the full step (jax.profiler): GPU busy time per step, idle gaps, and the kernels
    that take the most time, grouped by name.
The weight-read floor (parameter bytes / measured read ceiling) is printed beside them.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import read_ceiling_tbs  # noqa: E402


def timed(fn, rounds: int = 5, iters: int = 20) -> float:
    """Median seconds per call of fn(), calls dispatched back to back."""
    out = fn()
    jax.block_until_ready(out)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def gpu_events(trace_dir: str, device: str = "/device:GPU"):
    """(name, start_ns, duration_ns) of every GPU kernel/memcpy in the newest trace under trace_dir,
    on every GPU plane, or on one ("/device:GPU:0")."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        return []
    pd = jax.profiler.ProfileData.from_file(paths[-1])
    events = []
    for plane in pd.planes:
        name = plane.name.split(" ")[0]
        if not (name == device or name.startswith(device + ":")):
            continue
        for line in plane.lines:
            # Stream lines hold the kernels; skip XLA's op/module summary lines.
            if "stream" not in line.name.lower():
                continue
            for ev in line.events:
                events.append((ev.name, ev.start_ns, ev.duration_ns))
    return events


def summarise(events, steps: int, top: int):
    if not events:
        print("  (no GPU events in the trace)")
        return
    events.sort(key=lambda e: e[1])
    busy = sum(d for _, _, d in events)
    span = events[-1][1] + events[-1][2] - events[0][1]
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for name, _, d in events:
        by_name[name].append(d)
    print(f"  GPU busy {busy / steps / 1e3:.1f} us/step over {len(events) / steps:.0f} kernels/step;"
          f" span {span / steps / 1e3:.1f} us/step (idle {100 * (1 - busy / span):.1f}%)")
    rows = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    for name, ds in rows:
        print(f"  {sum(ds) / steps / 1e3:9.1f} us/step {len(ds) / steps:6.0f}x  "
              f"{100 * sum(ds) / busy:5.1f}%  {name[:110]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace-dir", default=None)
    args = ap.parse_args()

    from flax import nnx

    from jaxserve.attention import build_metadata
    from jaxserve.loading import load_model
    from jaxserve.runner.model_runner import ModelRunner
    from jaxserve.runner.packing import pack_forward, pack_sampling
    from jaxserve.sampling.sampler import SamplingTensors

    ceiling = read_ceiling_tbs(4.0 if jax.default_backend() == "gpu" else 0.25)
    lm = load_model(args.model, load_format="dummy", dtype="bfloat16", load_tokenizer=False)
    cfg = lm.config
    bmax = max(args.batches)
    pages_per_seq = -(-(args.context + 8) // args.block_size)
    runner = ModelRunner(lm.model, block_size=args.block_size, num_blocks=bmax * pages_per_seq + 1,
                         max_num_seqs=bmax, max_num_batched_tokens=bmax,
                         max_model_len=args.context + 8, attention_backend=args.attention_backend)
    weight_bytes = cfg.num_params() * 2
    floor = weight_bytes / (ceiling * 1e12)
    print(f"device {jax.devices()[0].device_kind}; read ceiling {ceiling:.2f} TB/s; "
          f"{args.model}: {weight_bytes / 1e9:.2f} GB of weights -> floor {floor * 1e3:.2f} ms/step")

    params = runner.params
    fwd = runner._step_decode or runner._step

    @jax.jit
    def weights_only(params, x):
        """The decode GEMVs alone: every layer's projections on a [B, D] activation."""
        model = nnx.merge(runner.graphdef, jax.tree.unflatten(runner.param_tree, params))
        for layer in model.layers:
            a = layer.attn
            qkv = jnp.einsum("TD,DKCH->TKCH", x, a.wqkv[...])
            g = qkv.shape[2] - 2
            q = qkv[:, :, :g].reshape(qkv.shape[0], -1, qkv.shape[-1])
            o = jnp.einsum("TNH,NHD->TD", q, a.wo[...]) + qkv[:, :, g:].sum().astype(x.dtype)
            m = layer.mlp
            gu = jnp.einsum("TD,DCF->TCF", o, m.w_gate_up[...])
            x = jnp.einsum("TF,FD->TD", gu[:, 0] * gu[:, 1], m.w_down[...])
        return model.compute_logits(x)

    rng = np.random.default_rng(0)
    for b in args.batches:
        pages = rng.permutation(np.arange(1, bmax * pages_per_seq + 1))
        seqs = [(pages[i * pages_per_seq:(i + 1) * pages_per_seq].tolist(), args.context, 1)
                for i in range(b)]
        t, s = b, b
        meta, pos = build_metadata(seqs, block_size=args.block_size, num_tokens=t, num_seqs=s,
                                   max_blocks_per_seq=runner.max_blocks_per_seq)
        ids = rng.integers(0, cfg.vocab_size, t).astype(np.int32)
        rows = SamplingTensors.host(s)
        rows["valid"][:] = True
        rows["slot"][:] = np.arange(s)
        fwd_in = jax.device_put(pack_forward(ids, pos, meta, np.arange(s, dtype=np.int32),
                                             np.full(t, -1, np.int32)))
        st = jax.device_put(pack_sampling(rows))

        def full_step(mode="greedy"):
            logits, runner.kv = fwd(params, runner.kv, fwd_in, runner.sampler_state.last_token,
                                    t=t, s=s)
            out, runner.sampler_state = runner._sample[mode](logits, runner.sampler_state, st)
            return out

        def forward():
            logits, runner.kv = fwd(params, runner.kv, fwd_in, runner.sampler_state.last_token,
                                    t=t, s=s)
            return logits

        x = jax.random.normal(jax.random.key(1), (b, cfg.hidden_size), jnp.bfloat16)
        gemv = functools.partial(weights_only, params, x)
        print(f"\n== batch {b}, context {args.context}")
        for label, fn in (("step, greedy sampler", full_step),
                          ("step, random sampler", functools.partial(full_step, "random")),
                          ("step, full sampler", functools.partial(full_step, "full")),
                          ("forward + logits", forward),
                          ("weight matmuls only", gemv)):
            sec = timed(fn)
            print(f"  {label:22s} {sec * 1e3:7.2f} ms  ({100 * floor / sec:5.1f}% of the weight floor)")
        trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="jaxserve-trace-")
        steps = 10
        jax.block_until_ready(full_step())
        with jax.profiler.trace(os.path.join(trace_dir, f"b{b}")):
            for _ in range(steps):
                out = full_step()
            jax.block_until_ready(out)
        summarise(gpu_events(os.path.join(trace_dir, f"b{b}")), steps, args.top)


if __name__ == "__main__":
    main()
