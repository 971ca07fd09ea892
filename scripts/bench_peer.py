"""jaxserve vs HF transformers `generate`, same config, same random weights, same run (GPU machine).

    python scripts/bench_peer.py --model qwen2.5-7b

1. Builds the HF model from the preset's config with random bf16 weights on the GPU (torch, eager
   attention), runs `generate` (greedy, min_new_tokens = max_new_tokens, so exactly N tokens) for
   each workload, and frees it.
2. Measures the HBM read ceiling (JAX, sum over 4 GiB).
3. Hands the same weights to jaxserve (no file in between) and runs the same workloads through
   `LLM.generate` (ignore_eos).
4. Prints output tok/s for both, jaxserve/HF, and jaxserve/roofline for batch 1.
Workloads (batch, input, output): (1, 128, 256) and (128, 512, 256) by default.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

# torch and JAX share the GPU here: JAX must not grab 75% of it before HF runs
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import read_ceiling_tbs  # noqa: E402


def parse_workloads(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        b, i, o = (int(x) for x in item.split("x"))
        out.append((b, i, o))
    return out


def hf_tensors(model) -> list[tuple[str, str, np.ndarray]]:
    """The HF model's weights as (source, name, numpy bf16 array) without a file."""
    import ml_dtypes
    import torch
    out = []
    for name, t in model.state_dict().items():
        a = t.detach().to("cpu")
        if a.dtype == torch.bfloat16:
            arr = a.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arr = a.float().numpy()
        out.append(("hf-memory", name, arr))
    return out


def run_hf(hf_cfg: dict, workloads, repeats: int, seed: int):
    import torch
    import transformers

    cls = getattr(transformers, hf_cfg["architectures"][0])
    cfg = cls.config_class(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype")})
    cfg.architectures = hf_cfg["architectures"]
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = cls._from_config(cfg, dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    rng = np.random.default_rng(seed)
    rows = []
    for b, i, o in workloads:
        ids = torch.tensor(rng.integers(0, cfg.vocab_size, (b, i)), device="cuda")
        kw = dict(max_new_tokens=o, min_new_tokens=o, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=0)
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                t = time.perf_counter()
                out = model.generate(ids, **kw)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        assert out.shape[1] == i + o, out.shape
        rows.append(b * o / statistics.median(times))
        print(f"HF transformers {transformers.__version__} eager: batch {b}, {i} -> {o}: "
              f"{rows[-1]:.1f} output tok/s", flush=True)
    tensors = hf_tensors(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows, tensors


def run_jaxserve(hf_cfg: dict, tensors, workloads, repeats: int, seed: int):
    import jax.numpy as jnp

    from jaxserve import LLM, SamplingParams
    from jaxserve.config import ModelConfig
    from jaxserve.loading import LoadedModel
    from jaxserve.loading.params import model_from_tensors

    cfg = ModelConfig.from_hf_config(hf_cfg)
    model = model_from_tensors(cfg, iter(tensors), dtype=jnp.bfloat16)
    tensors.clear()
    lm = LoadedModel(model, cfg, hf_cfg, None, "hf-random-weights", jnp.bfloat16)
    t0 = time.perf_counter()
    llm = LLM(lm, max_model_len=max(i + o for _, i, o in workloads) + 16,
              max_num_seqs=max(b for b, _, _ in workloads), max_num_batched_tokens=2048)
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    rows = []
    for b, i, o in workloads:
        prompts = [{"prompt_token_ids": rng.integers(0, cfg.vocab_size, i).tolist()} for _ in range(b)]
        sp = SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            times.append(time.perf_counter() - t)
        assert all(len(x.outputs[0].token_ids) == o for x in outs)
        rows.append(b * o / statistics.median(times))
        print(f"jaxserve: batch {b}, {i} -> {o}: {rows[-1]:.1f} output tok/s", flush=True)
    return rows, startup, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-7b", help="a preset name (see jaxserve/models/presets)")
    ap.add_argument("--workloads", default="1x128x256,128x512x256", help="BATCHxINPUTxOUTPUT,...")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax

    from jaxserve.models.registry import preset_hf_config

    workloads = parse_workloads(args.workloads)
    hf_cfg = preset_hf_config(args.model)
    hf_rows, tensors = run_hf(hf_cfg, workloads, args.hf_repeats, args.seed)
    ceiling = read_ceiling_tbs()
    js_rows, startup, cfg = run_jaxserve(hf_cfg, tensors, workloads, args.repeats, args.seed)
    roofline = ceiling * 1e12 / (cfg.num_params() * 2)
    device = jax.devices()[0].device_kind
    print(f"\ndevice {device}; read ceiling {ceiling:.2f} TB/s; {args.model} bf16 random weights "
          f"(same in both); batch-1 roofline {roofline:.1f} tok/s; jaxserve start-up {startup:.1f}s")
    print(f"{'batch':>6} {'in':>5} {'out':>5} {'HF tok/s':>10} {'jaxserve':>10} {'ratio':>7} {'% roofline':>10}")
    rows = []
    for (b, i, o), h, j in zip(workloads, hf_rows, js_rows):
        pct = f"{100 * j / roofline:.1f}" if b == 1 else "-"
        print(f"{b:>6} {i:>5} {o:>5} {h:>10.1f} {j:>10.1f} {j / h:>6.1f}x {pct:>10}")
        rows.append({"batch": b, "input": i, "output": o, "hf_tok_s": h, "jaxserve_tok_s": j})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "ceiling_tbs": ceiling, "roofline_tok_s": roofline,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
