"""Draw the figures in docs/performance.md and docs/benchmarks/ from docs/results/*.json.

    python scripts/plot_benchmarks.py        # writes docs/img/*.png (needs matplotlib)
"""

from __future__ import annotations

import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS, IMG = os.path.join(ROOT, "docs", "results"), os.path.join(ROOT, "docs", "img")


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def peer_figure(plt, peer: dict, name: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, row in zip(axes, peer["rows"]):
        ax.bar(["HF transformers", "jaxserve"], [row["hf_tok_s"], row["jaxserve_tok_s"]],
               color=["#999999", "#1f77b4"])
        if row["batch"] == 1:
            ax.axhline(peer["roofline_tok_s"], color="k", ls="--", lw=1)
            ax.set_ylim(0, peer["roofline_tok_s"] * 1.15)
            ax.text(0.5, peer["roofline_tok_s"] * 1.02, "weight-read roofline", ha="center")
        ax.set_title(f"batch {row['batch']}, {row['input']} -> {row['output']} tokens")
        ax.set_ylabel("output tok/s")
    fig.suptitle(f"Qwen2.5-7B shape, same random bf16 weights, same run ({peer['device']})")
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, name), dpi=110)


def attention_figure(plt, att: dict, name: str, prefill: dict | None = None) -> None:
    """Decode: % of the read ceiling, ours vs JAX's kernel (per call in a chain, and by device
    time where recorded); prefill (`prefill`, else the decode run's): % of bf16 matmul, the
    Triton-lowered kernel and, where measured, the Mosaic GPU one."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = [r for r in att["rows"] if r["batch"] > 1]
    labels = [f"{r['heads']}\nB={r['batch']} L={r['len']}" for r in rows]
    x = list(range(len(rows)))
    bars = [("ours_pct", "jaxserve, per call", "#1f77b4"), ("jax_pct", "JAX ops/gpu, per call", "#999999")]
    if "ours_dev_pct" in rows[0]:
        bars = [bars[0], ("ours_dev_pct", "jaxserve, device time", "#0b3d91"), bars[1],
                ("jax_dev_pct", "JAX ops/gpu, device time", "#555555")]
    w = 0.8 / len(bars)
    for j, (key, label, color) in enumerate(bars):
        axes[0].bar([i - 0.4 + w * (j + 0.5) for i in x], [r[key] for r in rows], w, label=label,
                    color=color)
    axes[0].axhline(80, color="k", ls="--", lw=1)
    axes[0].set_xticks(x, labels, fontsize=8)
    ceiling = f"{att['ceiling_tbs']:.2f} TB/s"
    if "ceiling_dev_tbs" in att:
        ceiling += f"; {att['ceiling_dev_tbs']:.2f} by device time"
    axes[0].set_ylabel(f"% of read ceiling ({ceiling})", fontsize=8)
    axes[0].set_title("paged decode attention")
    axes[0].set_ylim(0, 120)
    axes[0].legend(fontsize=7, ncol=2, loc="upper center")
    prefill = prefill or att["prefill"]
    pre = prefill["rows"]
    bars = [("ours_pct", "Triton-lowered, per call", "#1f77b4")]
    if "mgpu_pct" in pre[0]:
        bars += [("ours_dev_pct", "Triton-lowered, device time", "#0b3d91"),
                 ("mgpu_pct", "Mosaic GPU, per call", "#2ca02c"),
                 ("mgpu_dev_pct", "Mosaic GPU, device time", "#145214")]
    w = 0.8 / len(bars)
    for j, (key, label, color) in enumerate(bars):
        axes[1].bar([i - 0.4 + w * (j + 0.5) for i in range(len(pre))], [r[key] for r in pre], w,
                    label=label, color=color)
    axes[1].axhline(50, color="k", ls="--", lw=1)
    axes[1].set_xticks(range(len(pre)), [f"{r['heads']}\n{r['step']}" for r in pre], fontsize=7,
                       rotation=15, ha="right")
    axes[1].set_ylabel(f"% of bf16 matmul ({prefill['matmul_tflops']:.0f} TFLOP/s)")
    if len(bars) > 1:
        axes[1].set_ylim(0, 75)
        axes[1].legend(fontsize=7, ncol=2, loc="upper left")
    axes[1].set_title("ragged paged prefill attention")
    fig.suptitle(f"Pallas kernels, bf16, page 16 ({att['device']}; dashed: targets)")
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, name), dpi=110)


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(IMG, exist_ok=True)

    for card in ("h100", "h200"):
        peer_figure(plt, load(f"peer_{card}_qwen2.5-7b.json"), f"peer_{card}.png")

    attention_figure(plt, load("attention_h200.json"), "attention_h200.png",
                     load("prefill_mgpu_h200.json")["bench_attention"]["prefill"])

    prog = load("engine_progress_h200.json")
    labels = [s["label"] for s in prog["steps"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in ((axes[0], "batch1", "batch 1"), (axes[1], "batch64", "batch 64")):
        ax.bar(range(len(labels)), [s[key] for s in prog["steps"]], color="#1f77b4")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("output tok/s")
        ax.set_title(title)
        if key == "batch1":
            ax.axhline(prog["roofline_batch1_tok_s"], color="k", ls="--", lw=1)
            ax.set_ylim(0, prog["roofline_batch1_tok_s"] * 1.15)
            ax.text(0, prog["roofline_batch1_tok_s"] * 1.02, "roofline", fontsize=8)
    fig.suptitle(f"Engine decode throughput by change ({prog['device']}; {prog['workload'].split(',')[0]})")
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "engine_progress_h200.png"), dpi=110)
    serve = load("serve_h100_qwen2.5-7b.json")
    runs = serve["runs"]
    conc = [1, 4, 16, 64, 256]
    rows = [runs["c1"]] + [runs[f"conc{c}"] for c in conc[1:]]
    # the latest sweep (fewer loads) drawn over the first one
    new = load("serve_h100_qwen2.5-7b_2026-11-27.json")
    nconc = [1] + sorted(int(k[4:]) for k in new["runs"] if k.startswith("conc"))
    nrows = [new["runs"]["c1"]] + [new["runs"][f"conc{c}"] for c in nconc[1:]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    axes[0].plot(conc, [r["output_throughput"] for r in rows], "o-", color="#1f77b4",
                 label=f"{serve['date']} ({serve['commit']})")
    axes[0].plot(nconc, [r["output_throughput"] for r in nrows], "s-", color="#ff7f0e",
                 label=f"{new['date']} ({new['commit']})")
    axes[0].legend(fontsize=8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("concurrent requests")
    axes[0].set_ylabel("output tok/s")
    axes[0].set_title("throughput vs concurrency")
    for key, label in (("median_ttft_ms", "median TTFT"), ("median_itl_ms", "median ITL"),
                       ("p99_itl_ms", "p99 ITL")):
        line, = axes[1].plot(conc, [r[key] for r in rows], "o-", label=f"{label} ({serve['date']})")
        axes[1].plot(nconc, [r[key] for r in nrows], "s--", color=line.get_color(),
                     label=f"{label} ({new['date']})")
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("concurrent requests")
    axes[1].set_ylabel("ms")
    axes[1].set_title("latency vs concurrency")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"jaxserve serve over HTTP, Qwen2.5-7B shape, 256 -> 128 tokens ({serve['device']})")
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "serve_concurrency_h100.png"), dpi=110)

    runs = new["runs"]   # percentiles from the latest sweep
    r1 = runs["rate1"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    pcts = ["p50", "p90", "p99"]
    width = 0.35
    for i, (metric, label) in enumerate((("ttft", "TTFT"), ("itl", "ITL"))):
        ax.bar([j + i * width for j in range(3)], [r1[f"{p}_{metric}_ms"] for p in pcts], width,
               label=label)
    ax.axhline(runs["c1"]["median_itl_ms"], color="k", ls="--", lw=1)
    ax.text(2.3, runs["c1"]["median_itl_ms"] * 1.05, "batch-1 ITL", fontsize=8)
    ax.set_xticks([j + width / 2 for j in range(3)], pcts)
    ax.set_ylabel("ms")
    ax.legend()
    ax.set_title(f"1 req/s Poisson, prompts 128-384, replies 96-288 tokens\n{new['device']}, "
                 f"{new['date']} ({new['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(IMG, "serve_latency_h100.png"), dpi=110)
    print("wrote", ", ".join(sorted(os.listdir(IMG))))


if __name__ == "__main__":
    main()
