"""Hostile-traffic load test against a running jaxserve (or any OpenAI-compatible) server.

    python scripts/hostile_load.py --base-url http://127.0.0.1:8000 --server-pid PID \\
        --baseline-seconds 60 --attack-seconds 180 --normal-concurrency 4 \\
        --disconnect-concurrency 8 --slow-body-connections 200 --slow-header-connections 100 \\
        --bad-concurrency 2 --output-json hostile.json

It answers one question with numbers: while some clients misbehave, do the well-behaved clients
keep their latency, does the server answer nothing with a 5xx, are the resources the attack held
(KV-cache blocks, running and waiting requests) given back, and does the server's memory stay flat?

Phases
    A, baseline: ``--normal-concurrency`` workers, each a closed loop (one request at a time, the
    next as soon as the last one ended), send /v1/chat/completions requests alternating streaming
    and non-streaming, ``max_tokens`` 32, temperature 0, over a handful of short prompts. Each
    request's end-to-end latency, its time to first token (streams: first chunk with content) and
    its status are recorded.

    B, attack: the same normal workers, and at the same time
      * disconnectors (``--disconnect-concurrency``): streaming requests with ``max_tokens`` 256
        and ``ignore_eos``, the connection closed after 1-5 chunks or after a random 0.05-0.5 s;
      * slow-body clients (``--slow-body-connections``): raw TCP connections that send a complete
        POST /v1/chat/completions head with ``Content-Length: 10000``, then one body byte every
        ``--trickle-interval`` seconds; each is re-opened when the server closes it;
      * slow-header clients (``--slow-header-connections``): raw TCP connections sending the
        request line and headers one byte at a time, never finishing; re-opened likewise;
      * bad-input clients (``--bad-concurrency``): hostile bodies in a loop (``top_k`` 2**31,
        ``min_tokens`` 2**63 without ``max_tokens``, temperature 1e308, 256 prompts x n=128 on
        /v1/completions, JSON nested 100,000 deep, a lone surrogate ``"\\ud800"`` sent as the raw
        JSON escape, an unknown model, malformed JSON). Each should get a 4xx.
    The normal workers stop starting requests after ``--attack-seconds``; the attackers keep going
    until the last normal request of the phase has ended, so every attack-phase request ran under
    attack.

    C, recovery: every attacker is stopped (their sockets closed), then /metrics is polled until
    ``jaxserve:kv_cache_usage_perc`` is 0 and ``jaxserve:num_requests_running`` +
    ``jaxserve:num_requests_waiting`` is 0 (at most ``--recovery-timeout`` s), then the normal
    workers run again for ``--recovery-seconds``.

Throughout, /health is probed every 0.5 s on a fresh connection (what a load balancer sees), and
with ``--server-pid`` the server's VmRSS, open file descriptors and CPU time are read from /proc
every second (the server must run on this host). This client's own event-loop lag is measured
too: when it is large, the load generator itself was short of CPU and latencies are inflated by
the client, not the server.

Result: a table on stdout (progress on stderr), everything including every sample in
``--output-json``. The exit status is 1 when a check failed:
  * any 5xx anywhere (normal, attacker or /health responses, and error events inside a 200 stream);
  * KV cache usage or running + waiting requests not back to 0 within ``--recovery-timeout``;
  * the attack-phase median latency of normal requests above ``--max-latency-ratio`` (2) times the
    baseline median (or no successful baseline request to compare with);
  * a normal request that got no HTTP response at all (connection error or client timeout);
  * a bad input answered with anything but a 4xx;
  * the server process gone by the end (with ``--server-pid``).
It is 2 when the server was not healthy at the start. Non-200 answers to normal requests (a 429
when the queue is full, say) are counted and shown, not failed on: admission control is allowed to
refuse.

Reading the numbers: the normal clients are closed loops, so a slower server also gets fewer
normal requests; compare latencies, not counts. When the load generator shares a machine with the
server (the same CPU cores) the attack's client-side work competes with the server too; run it
from another host for figures that go into docs, and quote the event-loop lag with them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import random
import resource
import ssl
import sys
import time
import urllib.parse
from typing import Any

import httpx

PROMPTS = (
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me one tip for sleeping better.",
    "What is 12 times 7?",
    "Describe a cat in one sentence.",
)
PHASES = ("baseline", "attack", "drain", "recovery")   # drain: waiting for the KV cache to empty
REPORT_PHASES = ("baseline", "attack", "recovery")     # phases with normal traffic
HEALTH_INTERVAL_S = 0.5
PROC_INTERVAL_S = 1.0
LAG_INTERVAL_S = 0.1
METRICS_POLL_S = 0.25        # while waiting for the server to go idle
METRICS_INTERVAL_S = 1.0     # throughout
_ERROR_TYPE_STATUS = {"invalid_request_error": 400, "authentication_error": 401,
                      "not_found_error": 404, "rate_limit_error": 429,
                      "internal_server_error": 500, "service_unavailable": 503}


# --- small helpers --------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None,
            "mean": sum(values) / len(values) if values else None}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def bump(d: dict[str, int], key: Any, n: int = 1) -> None:
    k = str(key)
    d[k] = d.get(k, 0) + n


def short(text: str, n: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def stream_error_status(err: Any) -> int:
    """The status an SSE error event stands for: its integer code, else its type; 0 if unknown."""
    if isinstance(err, dict):
        code = err.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599:
            return code
        return _ERROR_TYPE_STATUS.get(str(err.get("type")), 0)
    return 0


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample values by metric name, summed over label sets (one model: one label set)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "{" in line:
                name = line[:line.index("{")]
                value = line[line.rindex("}") + 1:].split()[0]
            else:
                name, value = line.split()[:2]
            out[name] = out.get(name, 0.0) + float(value)
        except (ValueError, IndexError):
            continue
    return out


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
        if target < needed:
            print(f"warning: open-file limit {target} may be too low for {needed} connections",
                  file=sys.stderr)


# --- records --------------------------------------------------------------------------------

@dataclasses.dataclass
class NormalRecord:
    phase: str
    worker: int
    stream: bool
    start: float                        # seconds since the run started
    latency: float | None = None        # end to end (for a failure: until it failed)
    ttft: float | None = None           # streams: first chunk carrying content
    status: int | None = None           # HTTP status; None: no response
    stream_error_status: int | None = None   # an error event inside a 200 stream
    error: str | None = None
    completion_tokens: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def is_5xx(self) -> bool:
        return (self.status or 0) >= 500 or (self.stream_error_status or 0) >= 500


@dataclasses.dataclass
class SlowStats:
    target: int                         # connections to hold open at once
    opened: int = 0
    connect_failures: int = 0
    open_now: int = 0
    max_open: int = 0
    closed_by_server: int = 0
    close_status: dict[str, int] = dataclasses.field(default_factory=dict)   # status line or "none"
    close_seconds: list[float] = dataclasses.field(default_factory=list)
    closed_by_us: int = 0               # still open when the attack stopped
    open_at_stop_seconds: list[float] = dataclasses.field(default_factory=list)
    bytes_sent: int = 0

    def summary(self) -> dict[str, Any]:
        return {"target_open": self.target, "opened": self.opened,
                "connect_failures": self.connect_failures, "max_open_at_once": self.max_open,
                "closed_by_server": self.closed_by_server, "close_status": self.close_status,
                "seconds_to_close": dist(self.close_seconds),
                "still_open_at_stop": self.closed_by_us,
                "age_of_those_at_stop": dist(self.open_at_stop_seconds),
                "bytes_sent": self.bytes_sent}


@dataclasses.dataclass
class DisconnectStats:
    attempts: int = 0
    closed_after_chunks: int = 0
    closed_after_timer: int = 0
    closed_before_response: int = 0    # the timer fired before the response head arrived
    finished_before_close: int = 0
    status: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.closed_after_chunks + self.closed_after_timer

    def summary(self) -> dict[str, Any]:
        return {"attempts": self.attempts, "disconnects_done": self.done,
                "closed_after_chunks": self.closed_after_chunks,
                "closed_after_timer": self.closed_after_timer,
                "of_which_before_response_head": self.closed_before_response,
                "finished_before_close": self.finished_before_close,
                "status": self.status, "errors": self.errors}


@dataclasses.dataclass
class BadKind:
    name: str
    path: str
    body: bytes
    status: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    latency: list[float] = dataclasses.field(default_factory=list)
    example: dict[str, str] = dataclasses.field(default_factory=dict)   # status -> first reply

    def summary(self) -> dict[str, Any]:
        return {"path": self.path, "body_bytes": len(self.body), "status": self.status,
                "errors": self.errors, "latency": dist(self.latency), "example": self.example}


def bad_inputs(model: str) -> list[BadKind]:
    def chat(**extra: Any) -> bytes:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], **extra}
        return json.dumps(body).encode()

    deep = 100_000
    m = json.dumps(model)
    return [
        BadKind("top_k=2**31", "/v1/chat/completions", chat(max_tokens=8, top_k=2 ** 31)),
        BadKind("min_tokens=2**63,no max_tokens", "/v1/chat/completions", chat(min_tokens=2 ** 63)),
        BadKind("temperature=1e308", "/v1/chat/completions", chat(max_tokens=8, temperature=1e308)),
        BadKind("256 prompts x n=128", "/v1/completions",
                json.dumps({"model": model, "prompt": ["Once upon a time"] * 256, "n": 128,
                            "max_tokens": 16}).encode()),
        BadKind("JSON 100000 deep", "/v1/chat/completions",
                b'{"model": ' + m.encode() + b', "messages": ' + b"[" * deep + b"]" * deep + b"}"),
        # the six characters \ud800 reach the server as written: a lone surrogate once decoded
        BadKind("lone surrogate", "/v1/completions",
                b'{"model": ' + m.encode() + b', "prompt": "\\ud800", "max_tokens": 8}'),
        BadKind("unknown model", "/v1/chat/completions",
                chat(model="no-such-model-hostile-load", max_tokens=8)),
        BadKind("malformed JSON", "/v1/chat/completions",
                b'{"model": ' + m.encode() + b', "messages": [{"role": "user", "content": "Hi"}'),
    ]


# --- the run --------------------------------------------------------------------------------

class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.base = args.base_url.rstrip("/")
        u = urllib.parse.urlsplit(self.base)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise SystemExit(f"--base-url must be http(s)://host[:port][/prefix], "
                             f"got {args.base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.tls = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.host_header = u.netloc.rsplit("@", 1)[-1]
        self.auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.model = args.model or ""
        self.t0 = time.perf_counter()
        self.phase = "setup"
        self.phase_bounds: dict[str, list[float]] = {}
        self.normal: list[NormalRecord] = []
        self.health: list[dict[str, Any]] = []
        self.proc: list[dict[str, Any]] = []
        self.lag: list[tuple[str, float]] = []
        self.metrics_samples: list[dict[str, Any]] = []
        self.server_gone_at: float | None = None
        self.disconnect = DisconnectStats()
        self.slow_body = SlowStats(args.slow_body_connections)
        self.slow_header = SlowStats(args.slow_header_connections)
        self.bad: list[BadKind] = []
        self.attack_5xx: list[str] = []   # "what: status" for every 5xx an attacker saw

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def url(self, path: str) -> str:
        return self.base + path

    def set_phase(self, phase: str) -> None:
        if self.phase in self.phase_bounds:
            self.phase_bounds[self.phase][1] = self.now()
        self.phase = phase
        self.phase_bounds[phase] = [self.now(), self.now()]
        print(f"[{self.now():7.1f}s] phase {phase}", file=sys.stderr, flush=True)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        limits = kw.pop("limits", None) or httpx.Limits(max_connections=None,
                                                        max_keepalive_connections=None)
        return httpx.AsyncClient(timeout=httpx.Timeout(self.args.request_timeout), limits=limits,
                                 **kw)


# --- normal clients -------------------------------------------------------------------------

async def normal_request(run: Run, client: httpx.AsyncClient, worker: int, seq: int,
                         stream: bool) -> NormalRecord:
    # each prompt is sent once streaming and once not, in turn, so both kinds see the same mix
    prompt = PROMPTS[(worker + seq // 2) % len(PROMPTS)]
    body: dict[str, Any] = {"model": run.model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 32, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    rec = NormalRecord(phase=run.phase, worker=worker, stream=stream, start=run.now())
    url = run.url("/v1/chat/completions")
    t0 = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", url, json=body, headers=run.auth) as resp:
                rec.status = resp.status_code
                if resp.status_code != 200:
                    rec.error = short((await resp.aread()).decode(errors="replace"))
                else:
                    finished = False
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            finished = True
                            break
                        msg = json.loads(data)
                        if "error" in msg:
                            rec.stream_error_status = stream_error_status(msg["error"])
                            rec.error = "error event in stream: " + short(json.dumps(msg["error"]))
                            continue
                        if msg.get("usage"):
                            rec.completion_tokens = msg["usage"].get("completion_tokens")
                        choices = msg.get("choices") or []
                        delta = (choices[0].get("delta") or {}) if choices else {}
                        if rec.ttft is None and delta.get("content"):
                            rec.ttft = time.perf_counter() - t0
                    if not finished and rec.error is None:
                        rec.error = "the stream ended without [DONE]"
        else:
            resp = await client.post(url, json=body, headers=run.auth)
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = short(resp.text)
            else:
                reply = resp.json()
                if not reply.get("choices"):
                    rec.error = "a 200 reply without choices"
                rec.completion_tokens = (reply.get("usage") or {}).get("completion_tokens")
    except Exception as e:  # noqa: BLE001 - every failure is recorded; the run goes on
        rec.error = short(f"{type(e).__name__}: {e}")
    rec.latency = time.perf_counter() - t0
    return rec


async def normal_worker(run: Run, client: httpx.AsyncClient, worker: int, stop: asyncio.Event
                        ) -> None:
    seq = 0
    while not stop.is_set():
        stream = (seq + worker) % 2 == 0
        rec = await normal_request(run, client, worker, seq, stream)
        run.normal.append(rec)
        seq += 1
        if rec.status is None:
            await asyncio.sleep(0.5)   # no server to talk to: record, but do not spin


async def normal_phase(run: Run, seconds: float) -> None:
    """Normal workers for `seconds`; then no new requests, and wait for those in flight."""
    stop = asyncio.Event()
    async with run.client() as client:   # a fresh pool per phase: no stale keep-alive sockets
        tasks = [asyncio.create_task(normal_worker(run, client, i, stop))
                 for i in range(run.args.normal_concurrency)]
        await asyncio.sleep(seconds)
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=run.args.request_timeout + 10)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- disconnectors --------------------------------------------------------------------------

async def disconnector(run: Run, client: httpx.AsyncClient, idx: int, stop: asyncio.Event) -> None:
    rng = random.Random(run.args.seed * 1000 + idx)
    seq = 0
    while not stop.is_set():
        seq += 1
        st = run.disconnect
        st.attempts += 1
        path = "/v1/chat/completions" if seq % 2 else "/v1/completions"
        text = f"Tell me a long story about {rng.choice(PROMPTS)} Number {rng.randrange(10 ** 6)}."
        body: dict[str, Any] = {"model": run.model, "max_tokens": 256, "ignore_eos": True,
                                "temperature": 0.8, "stream": True}
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        by_chunks = rng.random() < 0.5
        want_chunks = rng.randint(1, 5)
        deadline = rng.uniform(0.05, 0.5)
        got_head = False

        async def go() -> str:
            nonlocal got_head
            async with client.stream("POST", run.url(path), json=body, headers=run.auth) as resp:
                got_head = True
                if resp.status_code != 200:
                    bump(st.status, resp.status_code)
                    if resp.status_code >= 500:
                        run.attack_5xx.append(f"disconnector {path}: {resp.status_code}")
                    await resp.aread()
                    return "status"
                bump(st.status, 200)
                chunks = 0
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    if line[5:].strip() == "[DONE]":
                        return "finished"
                    msg = json.loads(line[5:])
                    if "error" in msg and stream_error_status(msg["error"]) >= 500:
                        run.attack_5xx.append(f"disconnector {path}: error event "
                                              f"{short(json.dumps(msg['error']), 200)}")
                    chunks += 1
                    if by_chunks and chunks >= want_chunks:
                        return "chunks"   # leaving the block closes the unread response's socket
                return "finished"

        try:
            if by_chunks:
                outcome = await asyncio.wait_for(go(), run.args.request_timeout)
            else:
                try:
                    outcome = await asyncio.wait_for(go(), deadline)
                except (asyncio.TimeoutError, TimeoutError):
                    outcome = "timer"
        except Exception as e:  # noqa: BLE001
            bump(st.errors, type(e).__name__)
            outcome = "error"
        if outcome == "chunks":
            st.closed_after_chunks += 1
        elif outcome == "timer":
            st.closed_after_timer += 1
            if not got_head:
                st.closed_before_response += 1
        elif outcome == "finished":
            st.finished_before_close += 1
        if run.args.disconnect_pause > 0:
            await asyncio.sleep(rng.uniform(0, run.args.disconnect_pause))


# --- slow connections -----------------------------------------------------------------------

async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    buf = b""
    try:
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                break
            if len(buf) < 4096:
                buf += chunk
    except (ConnectionError, OSError):
        pass
    return buf


def _status_of(reply: bytes) -> str:
    if reply.startswith(b"HTTP/"):
        parts = reply.split(b" ", 2)
        if len(parts) >= 2 and parts[1].isdigit():
            return parts[1].decode()
    return "none" if not reply else "garbled"


async def slow_connection(run: Run, st: SlowStats, what: str, first: bytes, trickle: bytes,
                          stop: asyncio.Event, stop_waiter: asyncio.Task, idx: int) -> None:
    """Hold one slow connection open, re-opening it whenever the server closes it. `first` is
    sent at once, then `trickle` one byte per interval (cycled)."""
    rng = random.Random(run.args.seed * 7919 + idx)
    await asyncio.sleep(rng.uniform(0, min(2.0, run.args.trickle_interval)))   # spread the opens
    ctx = ssl.create_default_context() if run.tls else None
    while not stop.is_set():
        t_open = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(run.host, run.port, ssl=ctx,
                                        server_hostname=run.host if ctx else None), 10)
        except Exception:  # noqa: BLE001 - refused, timed out: count it, back off, try again
            st.connect_failures += 1
            await asyncio.sleep(0.5)
            continue
        st.opened += 1
        st.open_now += 1
        st.max_open = max(st.max_open, st.open_now)
        watch = asyncio.create_task(_read_until_closed(reader))
        closed_by_server = False
        pos = 0
        try:
            if first:
                writer.write(first)
                st.bytes_sent += len(first)
            while True:
                done, _ = await asyncio.wait({watch, stop_waiter},
                                             timeout=run.args.trickle_interval,
                                             return_when=asyncio.FIRST_COMPLETED)
                if watch in done:
                    closed_by_server = True
                    break
                if stop_waiter in done:
                    break
                try:
                    writer.write(trickle[pos % len(trickle):pos % len(trickle) + 1])
                    await asyncio.wait_for(writer.drain(), run.args.trickle_interval)
                    st.bytes_sent += 1
                    pos += 1
                except (ConnectionError, OSError, asyncio.TimeoutError):
                    closed_by_server = True
                    break
        finally:
            age = time.perf_counter() - t_open
            st.open_now -= 1
            if closed_by_server:
                try:
                    reply = await asyncio.wait_for(asyncio.shield(watch), 1.0)
                except (asyncio.TimeoutError, TimeoutError):
                    reply = b""
                status = _status_of(reply)
                st.closed_by_server += 1
                st.close_seconds.append(age)
                bump(st.close_status, status)
                if status.isdigit() and int(status) >= 500:
                    run.attack_5xx.append(f"{what}: {status}")
            else:
                st.closed_by_us += 1
                st.open_at_stop_seconds.append(age)
            watch.cancel()
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except Exception:  # noqa: BLE001 - already reset by the peer
                pass


def slow_body_request(run: Run) -> tuple[bytes, bytes]:
    auth = "".join(f"{k}: {v}\r\n" for k, v in run.auth.items())
    head = (f"POST {run.prefix}/v1/chat/completions HTTP/1.1\r\nHost: {run.host_header}\r\n"
            f"User-Agent: hostile-load/slow-body\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: 10000\r\n\r\n").encode()
    body = json.dumps({"model": run.model, "messages": [
        {"role": "user", "content": "slow " * 2000}]}).encode()
    return head, body


def slow_header_request(run: Run) -> bytes:
    # never finishes: after these bytes the X-Pad value goes on forever
    return (f"POST {run.prefix}/v1/chat/completions HTTP/1.1\r\nHost: {run.host_header}\r\n"
            f"User-Agent: hostile-load/slow-header\r\nContent-Type: application/json\r\nX-Pad: "
            ).encode() + b"a" * 100_000


# --- bad inputs -----------------------------------------------------------------------------

async def bad_worker(run: Run, client: httpx.AsyncClient, idx: int, stop: asyncio.Event) -> None:
    i = idx
    headers = {"Content-Type": "application/json", **run.auth}
    while not stop.is_set():
        kind = run.bad[i % len(run.bad)]
        i += 1
        t0 = time.perf_counter()
        try:
            resp = await client.post(run.url(kind.path), content=kind.body, headers=headers)
            kind.latency.append(time.perf_counter() - t0)
            bump(kind.status, resp.status_code)
            key = str(resp.status_code)
            if key not in kind.example:
                kind.example[key] = short(resp.text, 240)
            if resp.status_code >= 500:
                run.attack_5xx.append(f"bad input {kind.name!r}: {resp.status_code}")
        except Exception as e:  # noqa: BLE001
            bump(kind.errors, type(e).__name__)
        if run.args.bad_interval > 0:
            await asyncio.sleep(run.args.bad_interval)


# --- samplers -------------------------------------------------------------------------------

async def health_sampler(run: Run, stop: asyncio.Event) -> None:
    # a fresh connection per probe, as a load balancer's health check would open
    async with run.client(limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            sample: dict[str, Any] = {"t": run.now(), "phase": run.phase}
            try:
                r = await client.get(run.url("/health"), timeout=run.args.health_timeout)
                sample["status"] = r.status_code
            except Exception as e:  # noqa: BLE001
                sample["status"] = None
                sample["error"] = type(e).__name__
            sample["latency"] = time.perf_counter() - t0
            run.health.append(sample)
            await asyncio.sleep(max(0.0, HEALTH_INTERVAL_S - sample["latency"]))


def read_proc(pid: int) -> dict[str, Any] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out: dict[str, Any] = {}
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mib"] = int(line.split()[1]) / 1024
        elif line.startswith("Threads:"):
            out["threads"] = int(line.split()[1])
    fields = stat[stat.rindex(")") + 2:].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    try:
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        out["fds"] = None
    return out


async def proc_sampler(run: Run, pid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        s = read_proc(pid)
        if s is None:
            if run.server_gone_at is None:
                run.server_gone_at = run.now()
                print(f"[{run.now():7.1f}s] the server process {pid} is gone", file=sys.stderr)
            return
        s.update(t=run.now(), phase=run.phase)
        run.proc.append(s)
        await asyncio.sleep(PROC_INTERVAL_S)


async def lag_sampler(run: Run, stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(LAG_INTERVAL_S)
        run.lag.append((run.phase, max(0.0, time.perf_counter() - t0 - LAG_INTERVAL_S)))


async def scrape_metrics(run: Run, client: httpx.AsyncClient) -> dict[str, float] | None:
    try:
        r = await client.get(run.url("/metrics"), timeout=10)
        if r.status_code != 200:
            return None
        return parse_prometheus(r.text)
    except Exception:  # noqa: BLE001
        return None


def idle_view(m: dict[str, float] | None) -> dict[str, float | None]:
    m = m or {}
    return {"kv_cache_usage_perc": m.get("jaxserve:kv_cache_usage_perc"),
            "num_requests_running": m.get("jaxserve:num_requests_running"),
            "num_requests_waiting": m.get("jaxserve:num_requests_waiting")}


def is_idle(m: dict[str, float] | None) -> bool:
    v = idle_view(m)
    if any(x is None for x in v.values()):
        return False
    return (v["kv_cache_usage_perc"] == 0
            and v["num_requests_running"] + v["num_requests_waiting"] == 0)


async def metrics_sampler(run: Run, stop: asyncio.Event) -> None:
    async with run.client() as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            m = await scrape_metrics(run, client)
            if m is not None:
                run.metrics_samples.append({"t": run.now(), "phase": run.phase, **idle_view(m)})
            await asyncio.sleep(max(0.0, METRICS_INTERVAL_S - (time.perf_counter() - t0)))


async def wait_idle(run: Run, timeout: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    last = None
    async with run.client() as client:
        while True:
            m = await scrape_metrics(run, client)
            view = idle_view(m)
            run.metrics_samples.append({"t": run.now(), "phase": run.phase, **view})
            if m is not None:
                last = view
            elapsed = time.perf_counter() - t0
            if is_idle(m):
                return {"idle": True, "seconds": elapsed, "last": view}
            if elapsed >= timeout:
                return {"idle": False, "seconds": elapsed, "last": last}
            await asyncio.sleep(METRICS_POLL_S)


# --- the phases -----------------------------------------------------------------------------

async def attack_phase(run: Run, seconds: float) -> float:
    """Phase B. Returns the run time when every attacker had stopped and closed its sockets."""
    args = run.args
    stop = asyncio.Event()
    stop_waiter = asyncio.create_task(stop.wait())
    tasks: list[asyncio.Task] = []         # cancelled at the end, mid-request
    slow_tasks: list[asyncio.Task] = []    # close their own sockets when `stop` is set
    disc_client = run.client()
    bad_client = run.client()
    body_head, body_bytes = slow_body_request(run)
    header_bytes = slow_header_request(run)
    for i in range(args.disconnect_concurrency):
        tasks.append(asyncio.create_task(disconnector(run, disc_client, i, stop)))
    for i in range(args.slow_body_connections):
        slow_tasks.append(asyncio.create_task(slow_connection(
            run, run.slow_body, "slow body", body_head, body_bytes, stop, stop_waiter, i)))
    for i in range(args.slow_header_connections):
        slow_tasks.append(asyncio.create_task(slow_connection(
            run, run.slow_header, "slow header", b"", header_bytes, stop, stop_waiter,
            10 ** 6 + i)))
    for i in range(args.bad_concurrency):
        tasks.append(asyncio.create_task(bad_worker(run, bad_client, i, stop)))
    try:
        await normal_phase(run, seconds)
    finally:
        stop.set()
        # disconnectors and bad-input clients are cancelled mid-request (their connections close);
        # slow connections see the stop event and close their sockets themselves
        for t in tasks:
            t.cancel()
        everything = tasks + slow_tasks
        if everything:
            await asyncio.wait(everything, timeout=30)
        for t in slow_tasks:
            t.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
        stop_waiter.cancel()
        await disc_client.aclose()
        await bad_client.aclose()
    return run.now()


async def check_server(run: Run) -> str | None:
    async with run.client() as client:
        try:
            r = await client.get(run.url("/health"), timeout=10)
        except Exception as e:  # noqa: BLE001
            return f"/health unreachable: {type(e).__name__}: {e}"
        if r.status_code != 200:
            return f"/health answered {r.status_code}: {short(r.text, 200)}"
        try:   # also proves the API key works before any numbers are taken
            r = await client.get(run.url("/v1/models"), headers=run.auth, timeout=10)
        except Exception as e:  # noqa: BLE001
            return f"/v1/models unreachable: {type(e).__name__}: {e}"
        if r.status_code != 200:
            return f"/v1/models answered {r.status_code}: {short(r.text, 200)} (--api-key?)"
        try:
            names = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            names = []
        if not run.model:
            if not names:
                return "could not read a model name from /v1/models; pass --model"
            run.model = names[0]
        elif names and run.model not in names:
            print(f"warning: --model {run.model!r} is not in /v1/models {names}", file=sys.stderr)
    return None


async def run_all(run: Run) -> dict[str, Any]:
    args = run.args
    err = await check_server(run)
    if err:
        return {"fatal": err}
    run.bad = bad_inputs(run.model)
    sampler_stop = asyncio.Event()
    samplers = [asyncio.create_task(health_sampler(run, sampler_stop)),
                asyncio.create_task(lag_sampler(run, sampler_stop)),
                asyncio.create_task(metrics_sampler(run, sampler_stop))]
    if args.server_pid:
        samplers.append(asyncio.create_task(proc_sampler(run, args.server_pid, sampler_stop)))
    async with run.client() as c:
        metrics_start = await scrape_metrics(run, c)
    result: dict[str, Any] = {"metrics_start": metrics_start}
    if not is_idle(metrics_start):
        print(f"warning: the server is not idle at the start ({idle_view(metrics_start)}); "
              "the KV check at the end may be meaningless", file=sys.stderr)
    try:
        run.set_phase("baseline")
        await normal_phase(run, args.baseline_seconds)
        run.set_phase("attack")
        stopped_at = await attack_phase(run, args.attack_seconds)
        result["attack_stopped_at"] = stopped_at
        run.set_phase("drain")
        result["kv_recovery"] = await wait_idle(run, args.recovery_timeout)
        print(f"[{run.now():7.1f}s] idle after the attack: {result['kv_recovery']['idle']} "
              f"({result['kv_recovery']['seconds']:.2f} s)", file=sys.stderr)
        run.set_phase("recovery")
        await normal_phase(run, args.recovery_seconds)
        run.set_phase("done")
    finally:
        sampler_stop.set()
        await asyncio.gather(*samplers, return_exceptions=True)
    async with run.client() as c:
        result["metrics_end"] = await scrape_metrics(run, c)
    return result


# --- the report -----------------------------------------------------------------------------

def phase_summary(run: Run, phase: str) -> dict[str, Any]:
    recs = [r for r in run.normal if r.phase == phase]
    ok = [r for r in recs if r.ok]
    health = [h for h in run.health if h["phase"] == phase]
    proc = [p for p in run.proc if p["phase"] == phase]
    lags = [lag for ph, lag in run.lag if ph == phase]
    bounds = run.phase_bounds.get(phase, [0.0, 0.0])
    out: dict[str, Any] = {
        "seconds": bounds[1] - bounds[0],
        "requests": len(recs), "ok": len(ok),
        "non_200": sum(1 for r in recs if not r.ok),
        "status_5xx": sum(1 for r in recs if r.is_5xx),
        "no_response": sum(1 for r in recs if r.status is None),
        "status": {},
        "errors": {},
        "latency": dist([r.latency for r in ok]),
        "latency_stream": dist([r.latency for r in ok if r.stream]),
        "latency_non_stream": dist([r.latency for r in ok if not r.stream]),
        "ttft": dist([r.ttft for r in ok if r.stream and r.ttft is not None]),
        "health": dist([h["latency"] for h in health]),
        "health_non_200": sum(1 for h in health if h.get("status") != 200),
        "client_loop_lag": dist(lags),
        "engine": {},
    }
    for key in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting"):
        vals = [m[key] for m in run.metrics_samples
                if m["phase"] == phase and m.get(key) is not None]
        out["engine"][key + "_max"] = max(vals) if vals else None
    for r in recs:
        bump(out["status"], r.status if r.status is not None else "none")
        if r.error:
            bump(out["errors"], r.error[:160])
    if proc:
        rss = [p["rss_mib"] for p in proc if "rss_mib" in p]
        fds = [p["fds"] for p in proc if p.get("fds") is not None]
        cpu = (proc[-1]["cpu_s"] - proc[0]["cpu_s"]) / max(1e-9, proc[-1]["t"] - proc[0]["t"]) \
            if len(proc) > 1 else None
        out["server"] = {"rss_mib_start": rss[0] if rss else None,
                         "rss_mib_end": rss[-1] if rss else None,
                         "rss_mib_max": max(rss) if rss else None,
                         "fds_start": fds[0] if fds else None, "fds_end": fds[-1] if fds else None,
                         "fds_max": max(fds) if fds else None,
                         "cpu_cores_used": cpu}
    return out


def build_report(run: Run, result: dict[str, Any]) -> dict[str, Any]:
    args = run.args
    phases = {p: phase_summary(run, p) for p in PHASES if p in run.phase_bounds}
    base = phases.get("baseline", {}).get("latency", {})
    att = phases.get("attack", {}).get("latency", {})
    rec = phases.get("recovery", {}).get("latency", {})
    base_ttft = phases.get("baseline", {}).get("ttft", {})
    att_ttft = phases.get("attack", {}).get("ttft", {})
    ratios = {
        "attack_over_baseline_p50": ratio(att.get("p50"), base.get("p50")),
        "attack_over_baseline_p90": ratio(att.get("p90"), base.get("p90")),
        "attack_over_baseline_ttft_p50": ratio(att_ttft.get("p50"), base_ttft.get("p50")),
        "recovery_over_baseline_p50": ratio(rec.get("p50"), base.get("p50")),
        "recovery_over_baseline_p90": ratio(rec.get("p90"), base.get("p90")),
    }
    normal_5xx = sum(1 for r in run.normal if r.is_5xx)
    health_5xx = sum(1 for h in run.health if (h.get("status") or 0) >= 500)
    no_response = sum(1 for r in run.normal if r.status is None)
    bad_not_4xx = {k.name: {s: n for s, n in k.status.items() if not 400 <= int(s) < 500}
                   for k in run.bad}
    bad_not_4xx = {k: v for k, v in bad_not_4xx.items() if v}
    bad_unanswered = {k.name: k.errors for k in run.bad if k.errors}
    kv = result.get("kv_recovery") or {"idle": False, "seconds": None, "last": None}
    proc = run.proc
    rss = [p["rss_mib"] for p in proc if "rss_mib" in p]
    server = {"rss_mib_start": rss[0] if rss else None, "rss_mib_end": rss[-1] if rss else None,
              "rss_mib_max": max(rss) if rss else None,
              "rss_mib_growth": rss[-1] - rss[0] if rss else None,
              "gone_at": run.server_gone_at} if args.server_pid else None
    total_5xx = normal_5xx + health_5xx + len(run.attack_5xx)
    limit = args.max_latency_ratio
    attacked = ratios["attack_over_baseline_p50"]
    bad_sent = sum(sum(k.status.values()) + sum(k.errors.values()) for k in run.bad)
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"ok": bool(ok), "detail": detail}

    check("no_5xx", total_5xx == 0, f"{normal_5xx} normal, {health_5xx} /health, "
                                    f"{len(run.attack_5xx)} attacker responses were 5xx")
    check("kv_back_to_idle", kv["idle"],
          f"idle {kv['seconds']:.2f} s after the attack stopped" if kv["idle"]
          else f"not idle after {args.recovery_timeout:g} s: {kv['last']}")
    check("attack_median_latency", attacked is not None and attacked <= limit,
          f"attacked/baseline median {attacked:.2f}x (limit {limit:g}x)" if attacked is not None
          else "no successful baseline or attack request to compare")
    check("normal_requests_answered", no_response == 0,
          f"{no_response} normal requests got no HTTP response")
    if bad_not_4xx or bad_unanswered:
        bad_detail = f"not 4xx: {bad_not_4xx}; no response: {bad_unanswered}"
    else:
        bad_detail = f"all {bad_sent} bad inputs got a 4xx" if bad_sent else "no bad inputs sent"
    check("bad_inputs_4xx", not bad_not_4xx and not bad_unanswered, bad_detail)
    if args.server_pid:
        gone = run.server_gone_at
        check("server_alive", gone is None, "the server process ran throughout" if gone is None
              else f"the server process was gone at {gone:.1f} s")
    return {
        "tool": "scripts/hostile_load.py",
        "started_at": result.get("started_at"),
        "base_url": args.base_url, "model": run.model,
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "phases": phases, "ratios": ratios,
        "bad_inputs": {k.name: k.summary() for k in run.bad},
        "disconnects": run.disconnect.summary(),
        "slow_body": run.slow_body.summary(),
        "slow_header": run.slow_header.summary(),
        "attack_5xx": run.attack_5xx[:200],
        "kv_recovery": kv,
        "server": server,
        "metrics_start": result.get("metrics_start"),
        "metrics_end": result.get("metrics_end"),
        "checks": checks,
        "passed": all(c["ok"] for c in checks.values()),
        "samples": {
            "normal": [dataclasses.asdict(r) for r in run.normal],
            "health": run.health, "server_proc": run.proc, "metrics": run.metrics_samples,
        },
    }


def _s(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"Hostile load: {rep['base_url']} (model {rep['model']})", ""]
    hdr = (f"{'phase':<9} {'secs':>5} {'reqs':>5} {'non200':>6} {'5xx':>4} "
           f"{'latency p50/p90/p99 s':>22} {'TTFT p50/p90/p99 s':>21} {'health max/p99 s':>17} "
           f"{'RSS start/end/max MiB':>22} {'fds end/max':>11} {'lag max':>7}")
    lines += [hdr, "-" * len(hdr)]
    for name in REPORT_PHASES:
        p = rep["phases"].get(name)
        if p is None:
            continue
        lat, ttft, h = p["latency"], p["ttft"], p["health"]
        srv = p.get("server") or {}
        rss = "/".join(_s(srv.get(k), 0) for k in ("rss_mib_start", "rss_mib_end", "rss_mib_max"))
        fds = "/".join("-" if srv.get(k) is None else str(srv[k]) for k in ("fds_end", "fds_max"))
        lines.append(
            f"{name:<9} {p['seconds']:>5.0f} {p['requests']:>5} {p['non_200']:>6} "
            f"{p['status_5xx']:>4} "
            f"{'/'.join(_s(lat[k], 2) for k in ('p50', 'p90', 'p99')):>22} "
            f"{'/'.join(_s(ttft[k], 2) for k in ('p50', 'p90', 'p99')):>21} "
            f"{_s(h['max'], 3) + '/' + _s(h['p99'], 3):>17} {rss:>22} {fds:>11} "
            f"{_s(p['client_loop_lag']['max'], 3):>7}")
    r = rep["ratios"]
    lines += ["",
              f"attacked/baseline latency: median {_x(r['attack_over_baseline_p50'])}, "
              f"p90 {_x(r['attack_over_baseline_p90'])}, TTFT median "
              f"{_x(r['attack_over_baseline_ttft_p50'])}   "
              f"recovery/baseline: median {_x(r['recovery_over_baseline_p50'])}, "
              f"p90 {_x(r['recovery_over_baseline_p90'])}"]
    for name in REPORT_PHASES:
        p = rep["phases"].get(name)
        if p and p["non_200"]:
            lines.append(f"non-200 normal requests in {name}: statuses {p['status']}; "
                         f"errors {dict(list(p['errors'].items())[:5])}")
    for name in ("baseline", "attack", "drain", "recovery"):
        e = (rep["phases"].get(name) or {}).get("engine") or {}
        if e:
            lines.append(f"engine in {name} (max of 1 s /metrics samples): KV usage "
                         f"{_s(e.get('kv_cache_usage_perc_max'), 3)}, running "
                         f"{_s(e.get('num_requests_running_max'), 0)}, waiting "
                         f"{_s(e.get('num_requests_waiting_max'), 0)}")
    lines += ["", "bad inputs (status: count):"]
    for kname, k in rep["bad_inputs"].items():
        st = ", ".join(f"{s}: {n}" for s, n in sorted(k["status"].items())) or "-"
        err = f"; no response: {k['errors']}" if k["errors"] else ""
        lines.append(f"  {kname:<32} {st}{err}")
    d = rep["disconnects"]
    lines += ["", f"disconnects: {d['disconnects_done']} done of {d['attempts']} attempts "
                  f"({d['closed_after_chunks']} after 1-5 chunks, {d['closed_after_timer']} on the "
                  f"timer, {d['of_which_before_response_head']} of those before the response "
                  f"head); "
                  f"{d['finished_before_close']} finished first; statuses {d['status']}"
                  + (f"; errors {d['errors']}" if d["errors"] else "")]
    for key, label in (("slow_body", "slow-body"), ("slow_header", "slow-header")):
        s = rep[key]
        lines.append(
            f"{label}: {s['opened']} opened (max {s['max_open_at_once']} open at once, target "
            f"{s['target_open']}), server closed {s['closed_by_server']} (statuses "
            f"{s['close_status'] or '-'}; median {_s(s['seconds_to_close']['p50'], 1)} s, max "
            f"{_s(s['seconds_to_close']['max'], 1)} s after opening), {s['still_open_at_stop']} "
            f"still open at the end, {s['connect_failures']} connect failures")
    if rep["attack_5xx"]:
        lines.append(f"5xx seen by attackers: {rep['attack_5xx'][:10]}")
    kv = rep["kv_recovery"]
    lines += ["", "KV back to idle: " + (f"yes, {kv['seconds']:.2f} s after the attack stopped"
                                         if kv["idle"] else f"NO (last seen {kv['last']})")]
    if rep["server"]:
        s = rep["server"]
        lines.append(f"server RSS: start {_s(s['rss_mib_start'], 1)} MiB, end "
                     f"{_s(s['rss_mib_end'], 1)} MiB, max {_s(s['rss_mib_max'], 1)} MiB "
                     f"(end - start {_s(s['rss_mib_growth'], 1)} MiB)")
    lines += ["", "checks:"]
    for name, c in rep["checks"].items():
        lines.append(f"  {'PASS' if c['ok'] else 'FAIL'}  {name}: {c['detail']}")
    lines.append("result: " + ("PASS" if rep["passed"] else "FAIL"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("JAXSERVE_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $JAXSERVE_API_KEY)")
    p.add_argument("--model", default=None,
                   help="model name to send (default: the first of /v1/models)")
    p.add_argument("--baseline-seconds", type=float, default=60.0)
    p.add_argument("--attack-seconds", type=float, default=180.0)
    p.add_argument("--recovery-seconds", type=float, default=20.0,
                   help="normal traffic after the server is idle again")
    p.add_argument("--recovery-timeout", type=float, default=30.0,
                   help="seconds the KV cache and request queue may take to empty after the attack")
    p.add_argument("--normal-concurrency", type=int, default=4)
    p.add_argument("--disconnect-concurrency", type=int, default=8)
    p.add_argument("--disconnect-pause", type=float, default=0.5,
                   help="each disconnector waits a random 0..this many seconds between requests")
    p.add_argument("--slow-body-connections", type=int, default=200)
    p.add_argument("--slow-header-connections", type=int, default=100)
    p.add_argument("--trickle-interval", type=float, default=1.0,
                   help="seconds between the bytes of a slow connection")
    p.add_argument("--bad-concurrency", type=int, default=2)
    p.add_argument("--bad-interval", type=float, default=0.1,
                   help="each bad-input client waits this long between requests")
    p.add_argument("--max-latency-ratio", type=float, default=2.0,
                   help="fail when the attacked median latency is above this times the baseline")
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="client timeout for one request, seconds")
    p.add_argument("--health-timeout", type=float, default=10.0)
    p.add_argument("--server-pid", type=int, default=None,
                   help="the server's process id on this host: sample its RSS, fds and CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)
    args = p.parse_args(argv)
    if args.normal_concurrency < 1:
        p.error("--normal-concurrency must be at least 1")
    for name in ("disconnect_concurrency", "slow_body_connections", "slow_header_connections",
                 "bad_concurrency"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.trickle_interval <= 0:
        p.error("--trickle-interval must be > 0")
    if args.server_pid is not None and not os.path.exists(f"/proc/{args.server_pid}/status"):
        p.error(f"--server-pid {args.server_pid}: no such process on this host")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clients = args.normal_concurrency + args.disconnect_concurrency + args.bad_concurrency
    raise_fd_limit(args.slow_body_connections + args.slow_header_connections + 2 * clients + 256)
    run = Run(args)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = asyncio.run(run_all(run))
    if "fatal" in result:
        print(f"error: {result['fatal']}", file=sys.stderr)
        return 2
    result["started_at"] = started
    rep = build_report(run, result)
    rep["exit_code"] = 0 if rep["passed"] else 1
    print(format_report(rep))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rep, f, indent=1)
            f.write("\n")
    return rep["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
