"""Prometheus metrics with vLLM's names under a `jaxserve:` prefix, in the text exposition format.

Engine gauges/counters are read from `EngineCore.get_stats()` at scrape time; latency histograms
are observed by the serving code as outputs stream out.

`request_errors_total{status, reason}` counts every request refused or cut short: the guard
middleware counts its own refusals (401, 413, 503) and the router's 404/405, `serving.error_reply`
every other error reply (through `CURRENT`, the Metrics the guard sets for the request), and
`run_merged` a stream whose client disconnects before the end (499). The reason is a fixed
function of the status, so the label set stays small whatever clients send.
"""

from __future__ import annotations

import bisect
import contextvars
import threading

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0)


REASONS = {400: "invalid_request", 401: "auth", 403: "auth", 404: "not_found",
           405: "invalid_request", 408: "timeout", 413: "too_large", 422: "invalid_request",
           429: "rate_limited", 499: "client_disconnected", 500: "server_error",
           503: "unavailable", 504: "timeout"}


def error_reason(status: int) -> str:
    return REASONS.get(status, "server_error" if status >= 500 else "invalid_request")


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
        self.errors: dict[int, int] = {}     # by HTTP status
        self._lock = threading.Lock()

    def finished(self, reason: str | None) -> None:
        with self._lock:
            key = reason or "unknown"
            self.success[key] = self.success.get(key, 0) + 1

    def request_error(self, status: int) -> None:
        with self._lock:
            self.errors[status] = self.errors.get(status, 0) + 1

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
        lines += [f"# HELP {p}request_errors_total Requests refused or cut short, by HTTP status "
                  "(499: the client disconnected).", f"# TYPE {p}request_errors_total counter"]
        with self._lock:
            for status, n in sorted(self.errors.items()):
                lines.append(f'{p}request_errors_total{{{lab},status="{status}",'
                             f'reason="{error_reason(status)}"}} {n}')
        for h in (self.ttft, self.itl, self.e2e, self.queue):
            lines += h.render(lab)
        return "\n".join(lines) + "\n"


# NOTE: set by the guard middleware at the start of each HTTP request; the request's task (and the
# tasks it starts) see its server's Metrics, so error paths deep in the serving code count without
# being handed it.
CURRENT: contextvars.ContextVar[Metrics | None] = contextvars.ContextVar("jaxserve_metrics",
                                                                         default=None)


def count_error(status: int) -> None:
    """Count an error reply of the current request (nothing outside a request)."""
    m = CURRENT.get()
    if m is not None:
        m.request_error(status)
