"""Benchmark metrics with `vllm bench`'s definitions, and their printed report.

Per request: TTFT (request sent -> first token), E2E latency (sent -> last token), ITL (every gap
between streamed chunks) and TPOT = (latency - TTFT) / (output tokens - 1).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclasses.dataclass
class RequestRecord:
    prompt_len: int
    output_len: int = 0               # tokens generated
    ttft: float = 0.0                 # seconds
    latency: float = 0.0              # seconds, end to end
    itl: list[float] = dataclasses.field(default_factory=list)
    success: bool = True
    error: str = ""


def _stats(name: str, values_s: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s, np.float64) * 1e3
    if ms.size == 0:
        ms = np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    res: dict[str, Any] = {
        "duration_s": duration, "completed": len(ok), "failed": len(records) - len(ok),
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
    }
    res.update(_stats("ttft", [r.ttft for r in ok]))
    res.update(_stats("tpot", [(r.latency - r.ttft) / (r.output_len - 1)
                               for r in ok if r.output_len > 1]))
    res.update(_stats("itl", [g for r in ok for g in r.itl]))
    res.update(_stats("e2el", [r.latency for r in ok]))
    errors = sorted({r.error for r in records if not r.success})
    if errors:
        res["errors"] = errors[:5]
    return res


def format_report(title: str, res: dict[str, Any], latency_metrics: bool = True) -> str:
    w = 50
    lines = [f"{' ' + title + ' ':=^{w}}"]

    def row(label: str, key: str, fmt: str = "{:.2f}") -> None:
        if key in res:
            lines.append(f"{label:<40}{fmt.format(res[key]):>10}")

    row("Successful requests:", "completed", "{}")
    row("Failed requests:", "failed", "{}")
    row("Benchmark duration (s):", "duration_s")
    row("Total input tokens:", "total_input_tokens", "{}")
    row("Total generated tokens:", "total_output_tokens", "{}")
    row("Request throughput (req/s):", "request_throughput")
    row("Output token throughput (tok/s):", "output_throughput")
    row("Total token throughput (tok/s):", "total_token_throughput")
    if latency_metrics:
        for name, title2 in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                             ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
            lines.append(f"{title2:-^{w}}")
            row(f"Mean {name.upper()} (ms):", f"mean_{name}_ms")
            row(f"Median {name.upper()} (ms):", f"median_{name}_ms")
            for p in PERCENTILES:
                row(f"P{p} {name.upper()} (ms):", f"p{p}_{name}_ms")
    for e in res.get("errors", []):
        lines.append(f"error: {e}")
    lines.append("=" * w)
    return "\n".join(lines)


def write_json(path: str | None, res: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
