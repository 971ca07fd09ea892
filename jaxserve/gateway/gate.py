"""The gateway: keys, limits, usage and the request log, as one object the server holds.

`GuardMiddleware` calls `authenticate` with the bearer key and puts the entry in the ASGI scope
(`scope["state"]["jaxserve.key"]`); the generation handlers call `admit` once the body is parsed
and the prompt tokenized (so limits see the prompt's token count) and get a `Ticket`, which
counts completion tokens as they are generated and, when the request ends, records its usage,
writes its request-log line and gives back its concurrency slot. A request refused or failed
before admission gets a request-log line through `reject`.

Per-key Prometheus counters (`render_metrics`) are labelled with key names from the keys file
only ("default" for the single --api-key, "anonymous" without keys), so the label set is bounded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from jaxserve.gateway.keys import ANONYMOUS, KeyEntry, KeyRing, KeysFileError, load_keys
from jaxserve.gateway.limits import Limiter, Refusal
from jaxserve.gateway.store import Record, UsageStore

log = logging.getLogger("jaxserve.gateway")

SCOPE_KEY = "jaxserve.key"
MAX_TAG_CHARS = 512


class GatewayError(Exception):
    """A refusal as the server answers it: status, message, code, headers (the server turns it
    into its OpenAI error envelope)."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.param, self.headers = param, headers or {}


def key_of(scope) -> KeyEntry:
    return (scope.get("state") or {}).get(SCOPE_KEY, ANONYMOUS)


def user_and_tag(body: dict) -> tuple[str, str]:
    """The OpenAI `user` field and the `metadata` object's `tag` (or the whole object as JSON),
    each capped at 512 characters."""
    user = body.get("user")
    user = user[:MAX_TAG_CHARS] if isinstance(user, str) else ""
    meta = body.get("metadata")
    tag = ""
    if isinstance(meta, dict) and meta:
        tag = meta["tag"] if isinstance(meta.get("tag"), str) else json.dumps(
            meta, ensure_ascii=False, sort_keys=True)
    return user, tag[:MAX_TAG_CHARS]


class Gateway:
    def __init__(self, *, keys: KeyRing | None = None, keys_path: str | None = None,
                 limiter: Limiter | None = None, store: UsageStore | None = None,
                 log_content: bool = False):
        """`keys`: the accepted keys (None: no key needed, everyone is "anonymous");
        `keys_path`: the file `reload` re-reads."""
        self.keys = keys
        self.keys_path = keys_path
        self.store = store
        self.limiter = limiter or Limiter(spent_since=store.spent_since if store else None)
        self.log_content = log_content
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        self.rejections: dict[tuple[str, str], int] = {}

    @classmethod
    def from_file(cls, path: str, **kw) -> "Gateway":
        return cls(keys=load_keys(path), keys_path=path, **kw)

    @property
    def single_key(self) -> bool:
        """No keys file: the single --api-key (or no key) sees all usage."""
        return self.keys_path is None

    def reload(self) -> bool:
        """Re-read the keys file (SIGHUP). A bad file keeps the old keys and logs why."""
        if self.keys_path is None:
            return False
        try:
            ring = load_keys(self.keys_path)
        except KeysFileError as e:
            log.error("keys file not reloaded, the old keys stay in use: %s", e)
            return False
        self.keys = ring
        log.info("reloaded %d keys from %s", len(ring.entries), self.keys_path)
        return True

    def authenticate(self, supplied: bytes | None) -> KeyEntry | None:
        """The entry of the bearer key; None when keys are required and this one is not known."""
        if self.keys is None:
            return ANONYMOUS
        return self.keys.lookup(supplied or b"")

    # -- admission ---------------------------------------------------------------------------
    def check_model(self, key: KeyEntry, model: str) -> None:
        """A key not allowed a model is told it does not exist (other models are not revealed)."""
        if not key.allows(model):
            self._count(self.rejections, (key.name, "model_not_allowed"))
            shown = model if len(model) <= 200 else model[:200] + "..."
            raise GatewayError(404, f"The model `{shown}` does not exist.", "model_not_found",
                               param="model")

    def admit(self, scope, *, model: str, body: dict, endpoint: str, request_id: str,
              prompt_tokens: int, prompt_text: Any = None) -> "Ticket":
        key = key_of(scope)
        self.check_model(key, model)
        try:
            self.limiter.admit(key, prompt_tokens)
        except Refusal as r:
            self._count(self.rejections, (key.name, r.reason))
            raise GatewayError(429, r.message, r.code,
                               headers={"Retry-After": str(r.retry_after)}) from None
        self._count(self.requests, key.name)
        self._count(self.tokens, (key.name, "prompt"), prompt_tokens)
        return Ticket(self, key, scope, model, body, endpoint, request_id, prompt_tokens,
                      prompt_text)

    def reject(self, scope, *, endpoint: str, request_id: str, status: int, body: Any = None,
               model: str | None = None) -> None:
        """The request-log line of a request that never reached the engine."""
        if self.store is None:
            return
        user, tag = user_and_tag(body) if isinstance(body, dict) else ("", "")
        if model is None and isinstance(body, dict) and isinstance(body.get("model"), str):
            model = body["model"][:200]
        self.store.log({"time": time.time(), "request_id": request_id,
                        "key": key_of(scope).name, "model": model, "endpoint": endpoint,
                        "status": status, "prompt_tokens": 0, "completion_tokens": 0,
                        "cached_tokens": 0, "ttft": None, "latency": 0.0, "finish_reason": None,
                        "client": _client(scope), "user": user, "tag": tag})

    # -- metrics ---------------------------------------------------------------------------------
    def _count(self, table: dict, label, n: int = 1) -> None:
        with self._lock:
            table[label] = table.get(label, 0) + n

    def render_metrics(self) -> str:
        p = "jaxserve:"
        lines = [f"# HELP {p}key_requests_total Requests admitted, by API key name.",
                 f"# TYPE {p}key_requests_total counter"]
        with self._lock:
            for k, n in sorted(self.requests.items()):
                lines.append(f'{p}key_requests_total{{key="{k}"}} {n}')
            lines += [f"# HELP {p}key_tokens_total Tokens counted against each API key.",
                      f"# TYPE {p}key_tokens_total counter"]
            for (k, kind), n in sorted(self.tokens.items()):
                lines.append(f'{p}key_tokens_total{{key="{k}",kind="{kind}"}} {n}')
            lines += [f"# HELP {p}key_rejections_total Requests refused by a key's limits.",
                      f"# TYPE {p}key_rejections_total counter"]
            for (k, reason), n in sorted(self.rejections.items()):
                lines.append(f'{p}key_rejections_total{{key="{k}",reason="{reason}"}} {n}')
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _client(scope) -> str | None:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else None


class Ticket:
    """One admitted request: counts its completion tokens and, at `finish`, its usage."""

    def __init__(self, gate: Gateway, key: KeyEntry, scope, model: str, body: dict, endpoint: str,
                 request_id: str, prompt_tokens: int, prompt_text: Any):
        self.gate, self.key, self.scope, self.model = gate, key, scope, model
        self.body, self.endpoint, self.request_id = body, endpoint, request_id
        self.prompt_tokens, self.prompt_text = prompt_tokens, prompt_text
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.start = time.monotonic()
        self.ttft: float | None = None
        self.done = False

    def __del__(self):
        # NOTE: a safety net: a stream whose body never started (its client left before the
        # first byte) never runs its `finally`; its key must not keep the concurrency slot
        if not self.done:
            self.done = True
            self.gate.limiter.release(self.key)

    def add_completion(self, n: int) -> bool:
        """`n` more generated tokens; False once the key's token budget is spent."""
        if n > 0 and self.ttft is None:
            self.ttft = time.monotonic() - self.start
        self.completion_tokens += max(0, n)
        if n > 0:
            self.gate._count(self.gate.tokens, (self.key.name, "completion"), n)
        return self.gate.limiter.add_tokens(self.key, n)

    def engine_output(self, out) -> None:
        """What the engine's final output tells: cached prompt tokens and its own TTFT."""
        m = getattr(out, "metrics", None) or {}
        self.cached_tokens += int(m.get("num_cached_tokens", 0))
        if self.ttft is None and "first_token_time" in m and "arrival" in m:
            self.ttft = max(0.0, m["first_token_time"] - m["arrival"])

    def finish(self, status: int, finish_reasons: list[str | None] | None = None,
               completion_text: Any = None) -> None:
        if self.done:
            return
        self.done = True
        g = self.gate
        g.limiter.release(self.key)
        if g.store is None:
            return
        user, tag = user_and_tag(self.body)
        now = time.time()
        g.store.record(Record(self.key.name, self.model, now, self.prompt_tokens,
                              self.cached_tokens, self.completion_tokens, status >= 400,
                              user, tag))
        reasons = [r for r in (finish_reasons or []) if r is not None]
        entry = {"time": now, "request_id": self.request_id, "key": self.key.name,
                 "model": self.model, "endpoint": self.endpoint, "status": status,
                 "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                 "cached_tokens": self.cached_tokens,
                 "ttft": None if self.ttft is None else round(self.ttft, 6),
                 "latency": round(time.monotonic() - self.start, 6),
                 "finish_reason": (reasons[0] if len(set(reasons)) == 1 else reasons) if reasons
                 else None,
                 "client": _client(self.scope), "user": user, "tag": tag}
        if g.log_content:
            entry["prompt"] = self.prompt_text
            entry["completion"] = completion_text
        g.store.log(entry)
