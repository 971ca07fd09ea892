"""Prometheus metrics with vLLM's names under a `jaxserve:` prefix, in the text exposition format.

Engine gauges/counters are read from `EngineCore.get_stats()` at scrape time; latency histograms
are observed by the serving code as outputs stream out.
"""

from __future__ import annotations

import bisect
import threading

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, v: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, v)] += 1
            self.sum += v
            self.count += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            lines.append(f'{self.name}_bucket{{{labels},le="{b}"}} {acc}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.sum}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    def __init__(self, model_name: str):
        self.labels = f'model_name="{model_name}"'
        p = "jaxserve:"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between streamed tokens.",
                             _ITL_BUCKETS)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "End-to-end request latency.",
                             _E2E_BUCKETS)
        self.queue = Histogram(p + "request_queue_time_seconds", "Time waiting before first scheduled.",
                               _TTFT_BUCKETS)
        self.success: dict[str, int] = {}
        self._lock = threading.Lock()

    def finished(self, reason: str | None) -> None:
        with self._lock:
            key = reason or "unknown"
            self.success[key] = self.success.get(key, 0) + 1

    def render(self, stats: dict | None) -> str:
        p, lab = "jaxserve:", self.labels
        lines: list[str] = []

        def one(name: str, kind: str, help_: str, value) -> None:
            lines.extend([f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} {kind}",
                          f"{p}{name}{{{lab}}} {value}"])

        if stats is not None:
            one("num_requests_running", "gauge", "Requests in the running batch.",
                stats["num_requests_running"])
            one("num_requests_waiting", "gauge", "Requests waiting to be scheduled.",
                stats["num_requests_waiting"])
            one("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).",
                stats["kv_cache_usage_perc"])
            one("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                stats["prefix_cache_queries"])
            one("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
                stats["prefix_cache_hits"])
            one("num_preemptions_total", "counter", "Requests preempted for lack of KV blocks.",
                stats["num_preemptions"])
            one("prompt_tokens_total", "counter", "Prompt tokens processed.", stats["prompt_tokens_total"])
            one("generation_tokens_total", "counter", "Tokens generated.",
                stats["generation_tokens_total"])
            one("compiles_after_warmup_total", "counter", "XLA compilations after start-up warm-up.",
                stats["compiles_after_warmup"])
        lines += [f"# HELP {p}request_success_total Finished requests by finish reason.",
                  f"# TYPE {p}request_success_total counter"]
        with self._lock:
            for reason, n in sorted(self.success.items()):
                lines.append(f'{p}request_success_total{{{lab},finished_reason="{reason}"}} {n}')
        for h in (self.ttft, self.itl, self.e2e, self.queue):
            lines += h.render(lab)
        return "\n".join(lines) + "\n"
