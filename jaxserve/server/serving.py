"""Serving logic shared by the endpoints: admission, prompt preparation, running n prompts x n
samples through the AsyncEngine as one merged stream, SSE framing, metrics, disconnects, and how
failures become responses and log lines.

Admission counts sequences (prompts x n), after the body is read and parsed: a client that is
slow to send its body holds no queue slot, and one request cannot queue more work than
`max_request_sequences`. A client mistake is a 4xx envelope and one warning line naming the
request id; only a server fault is a 500, logged with its traceback. Messages never carry
exception type names or paths.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import ClientDisconnect, Request

from jaxserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineShuttingDown
from jaxserve.engine.outputs import InvalidRequestError, RequestFailedError, RequestOutput
from jaxserve.gateway.gate import GatewayError
from jaxserve.sampling.params import SamplingParams, SamplingParamsError
from jaxserve.server.errors import APIError
from jaxserve.server.metrics import Metrics, count_error

log = logging.getLogger("jaxserve.server")

MAX_JSON_DEPTH = 64


@dataclasses.dataclass
class ServerState:
    model_names: list[str]
    metrics: Metrics
    engine: AsyncEngine | None = None          # None until warm-up is done
    shutting_down: bool = False
    max_queued_requests: int = 1024            # sequences waiting beyond the engine's max_num_seqs
    max_request_sequences: int = 256           # prompts x n of one request
    chat_template: str | None = None           # operator override
    trust_request_chat_template: bool = False
    template_sandbox: Any = None               # renders request templates (when trusted)
    default_sampling: dict = dataclasses.field(default_factory=dict)   # --generation-config
    model_aliases: tuple[str, ...] = ()        # also accepted as `model`, never shown
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    inflight: int = 0                          # admitted sequences not yet answered in full

    @property
    def served_name(self) -> str:
        return self.model_names[0]

    def ready_engine(self) -> AsyncEngine:
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
        if self.engine is None:
            raise APIError(503, "the model is still loading", headers={"Retry-After": "5"})
        if self.engine.is_dead:
            raise APIError(503, "the engine has stopped; the server is exiting")
        return self.engine

    def admit(self, sequences: int) -> AsyncEngine:
        """Admission control for a generation request of `sequences` sequences (prompts x n):
        counted synchronously on the event loop, so a burst cannot slip past the limit. Pair every
        successful call with `release(sequences)`."""
        engine = self.ready_engine()
        if sequences > self.max_request_sequences:
            raise APIError(400, f"this request asks for {sequences} sequences (prompts x n); this "
                                f"server takes at most {self.max_request_sequences} per request",
                           param="n")
        limit = engine.core.max_num_seqs + self.max_queued_requests
        if self.inflight and self.inflight + sequences > limit:
            raise APIError(429, f"the server is busy ({self.inflight} sequences in flight, room for "
                                f"{limit}); retry later", headers={"Retry-After": "1"},
                           code="rate_limit_exceeded")
        self.inflight += sequences
        return engine

    def release(self, sequences: int) -> None:
        self.inflight = max(0, self.inflight - sequences)

    def check_model(self, body: dict) -> str:
        name = body.get("model")
        if name is None:
            return self.served_name
        if not isinstance(name, str):
            raise APIError(400, "'model' must be a string", param="model")
        if name in self.model_aliases:
            return self.served_name
        if name not in self.model_names:
            shown = name if len(name) <= 200 else name[:200] + "..."
            raise APIError(404, f"The model `{shown}` does not exist.", param="model",
                           code="model_not_found")
        return name


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels "
                            "deep") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    check_json(body)
    return body


def check_json(body: dict) -> None:
    """Refuse what JSON can carry but no field here can use: nesting deeper than MAX_JSON_DEPTH,
    and strings with lone UTF-16 surrogates ("\\ud800"), which are not Unicode text (tokenizers,
    templates and the JSON encoder of the reply would each fail on them). Iterative: no recursion
    on hostile input."""
    stack: list[tuple[Any, int, str | None]] = [(body, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body is nested more than {MAX_JSON_DEPTH} levels deep",
                           param=field)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                _check_text(key, field or "a key")
            name = field if field is not None else key
            if isinstance(item, str):
                _check_text(item, name)
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1, name))


def _check_text(s: str, field: str) -> None:
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"'{field}' contains a lone UTF-16 surrogate, which is not valid "
                                "Unicode text", param=field) from None


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def as_api_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, GatewayError):   # a key's limit, budget or model list
        return APIError(e.status, e.message, param=e.param, code=e.code, headers=e.headers)
    if isinstance(e, (SamplingParamsError, InvalidRequestError)):
        return APIError(400, str(e), param=e.field)
    if isinstance(e, EngineShuttingDown):
        return APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine has stopped")
    if isinstance(e, ClientDisconnect):
        return APIError(499, "client disconnected")
    if isinstance(e, RequestFailedError):
        return APIError(500, f"the engine failed this request ({e.request_id}); the server log "
                             "has the cause")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, "internal server error")


def error_reply(e: BaseException, rid: str) -> APIError:
    """`e` as an API error, logged: a client mistake as one warning line, a server fault with its
    traceback (under the request id the client can quote)."""
    err = as_api_error(e)
    if err.status >= 500 and not isinstance(e, (APIError, EngineShuttingDown, EngineDeadError)):
        log.error("request %s: %d %s", rid, err.status, err.message,
                  exc_info=None if isinstance(e, RequestFailedError) else e)
        if err.message == "internal server error":
            err = APIError(500, f"internal server error (request {rid})")
    elif err.status not in (499,):
        log.warning("request %s: %d %s", rid, err.status, err.message[:300])
    count_error(err.status)   # jaxserve:request_errors_total
    return err


async def prepare_prompts(engine: AsyncEngine, prompts: list[Any], params: SamplingParams
                          ) -> list[tuple[str | None, list[int]]]:
    """Tokenize and validate every prompt before anything is queued (errors become 400s)."""
    core = engine.core
    out = []
    for p in prompts:
        if isinstance(p, list):
            text, ids = None, list(p)
        else:
            text, ids = await asyncio.to_thread(core.tokenize_prompt, p)
        core.validate(ids, params)
        out.append((text, ids))
    return out


@dataclasses.dataclass
class Tracked:
    """One engine request (one prompt, all its n samples) as seen by a response writer."""
    prompt_index: int
    request_id: str
    prompt_text: str | None
    prompt_ids: list[int]


async def run_merged(state: ServerState, engine: AsyncEngine, prepared: list[tuple[str | None, list[int]]],
                     params: SamplingParams, base: str, count_disconnect: bool = True,
                     ended_by_server=None) -> AsyncIterator[tuple[Tracked, RequestOutput]]:
    """Run every prompt concurrently; yield (which, cumulative output) as updates arrive. The
    engine request of prompt i is `{base}-{i}`. A consumer that goes away first (a stream's client
    disconnected) is counted as a 499 error unless `count_disconnect` is off (the caller replies
    499 itself) or `ended_by_server()` says the caller stopped reading on purpose (a key's budget
    ran out)."""
    queue: asyncio.Queue = asyncio.Queue()
    tracked = [Tracked(i, f"{base}-{i}", t, ids) for i, (t, ids) in enumerate(prepared)]
    done = object()

    async def pump(tr: Tracked) -> None:
        start = time.monotonic()
        last, seen, ended, failure = None, 0, False, None
        try:
            async for out in engine.generate({"prompt_token_ids": tr.prompt_ids, "prompt": tr.prompt_text},
                                             params, tr.request_id):
                now = time.monotonic()
                # per token (an update may carry several): the longest sample's count
                ntok = max((len(o.token_ids) for o in out.outputs), default=0)
                if last is None and ntok:
                    state.metrics.ttft.observe(now - start)
                    last, seen = now, 1
                if last is not None and ntok > seen:
                    gap = (now - last) / (ntok - seen)
                    for _ in range(ntok - seen):
                        state.metrics.itl.observe(gap)
                    last, seen = now, ntok
                await queue.put((tr, out))
                if out.finished:
                    ended = True
                    state.metrics.e2e.observe(now - start)
                    sched = out.metrics.get("first_scheduled_time")
                    if sched is not None:
                        state.metrics.queue.observe(max(0.0, sched - out.metrics["arrival"]))
                    for o in out.outputs:
                        state.metrics.finished(o.finish_reason)
        except BaseException as e:  # delivered to the consumer, which re-raises
            failure = e
            await queue.put(e)
        finally:
            if not ended:   # aborted (client gone) or failed: counted as vLLM does
                reason = "error" if isinstance(failure, RequestFailedError) else "abort"
                for _ in range(params.n):
                    state.metrics.finished(reason)
            await queue.put(done)

    tasks = [asyncio.create_task(pump(t)) for t in tracked]
    remaining = len(tasks)
    try:
        while remaining:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            # outputs are cumulative: when the consumer (an SSE writer) fell behind, only the
            # newest output of each prompt is needed, so a slow client gets fewer, larger chunks
            latest: dict[int, tuple[Tracked, RequestOutput]] = {}
            for item in batch:
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    latest[item[0].prompt_index] = item
            for item in latest.values():
                yield item
    except (GeneratorExit, asyncio.CancelledError):
        if count_disconnect and not (ended_by_server is not None and ended_by_server()):
            state.metrics.request_error(499)
        raise
    finally:
        for t in tasks:  # consumer gone (disconnect/cancel): abort everything still running
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_to_completion(request: Request, state: ServerState, engine: AsyncEngine,
                            prepared: list[tuple[str | None, list[int]]], params: SamplingParams,
                            base: str) -> dict[int, tuple[Tracked, RequestOutput]]:
    """Non-streaming: every prompt's final output, keyed by prompt index. Aborts everything if
    the client disconnects first. Releases the request's admission in all cases."""
    async def collect():
        finals = {}
        async for tr, out in run_merged(state, engine, prepared, params, base,
                                        count_disconnect=False):   # error_reply counts the 499
            if out.finished:
                finals[tr.prompt_index] = (tr, out)
        return finals

    try:
        return await until_disconnected(request, collect())
    finally:
        state.release(len(prepared) * params.n)


async def until_disconnected(request: Request, coro):
    """Await `coro`, but cancel it (aborting its requests) if the client disconnects first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def end_unfinished(reasons: dict[int, str | None]) -> list[int]:
    """A key's budget ran out mid-stream: every sample without a finish reason ends with "length"
    (as max_tokens would end it); returns their indices, for the caller's closing chunks."""
    ended = [i for i, r in reasons.items() if r is None]
    for i in ended:
        reasons[i] = "length"
    return ended


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
