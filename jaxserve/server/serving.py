"""Serving logic shared by the endpoints: admission, prompt preparation, running n prompts x n
samples through the AsyncEngine as one merged stream, SSE framing, metrics, disconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any, AsyncIterator

from starlette.requests import Request

from jaxserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineShuttingDown
from jaxserve.engine.outputs import InvalidRequestError, RequestOutput
from jaxserve.sampling.params import SamplingParams, SamplingParamsError
from jaxserve.server.errors import APIError
from jaxserve.server.metrics import Metrics


@dataclasses.dataclass
class ServerState:
    model_names: list[str]
    metrics: Metrics
    engine: AsyncEngine | None = None          # None until warm-up is done
    shutting_down: bool = False
    max_queued_requests: int = 1024
    chat_template: str | None = None           # operator override
    trust_request_chat_template: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    inflight: int = 0                          # admitted requests not yet answered in full

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

    def admit(self) -> AsyncEngine:
        """Admission control for generation requests: counted synchronously on the event loop, so
        a burst cannot slip past the limit. Pair every successful call with `release()`."""
        engine = self.ready_engine()
        limit = engine.core.scheduler.config.max_num_seqs + self.max_queued_requests
        if self.inflight >= limit:
            raise APIError(429, f"too many requests in flight ({self.inflight}); retry later",
                           headers={"Retry-After": "1"})
        self.inflight += 1
        return engine

    def release(self) -> None:
        self.inflight = max(0, self.inflight - 1)

    def check_model(self, body: dict) -> str:
        name = body.get("model")
        if name is None:
            return self.served_name
        if not isinstance(name, str):
            raise APIError(400, "'model' must be a string", param="model")
        if name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")
        return name


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def as_api_error(e: Exception) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, (SamplingParamsError, InvalidRequestError)):
        return APIError(400, str(e), param=e.field)
    if isinstance(e, EngineShuttingDown):
        return APIError(503, "the server is shutting down", headers={"Retry-After": "5"})
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine has stopped")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error ({type(e).__name__})")


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
                     params: SamplingParams, prefix: str
                     ) -> AsyncIterator[tuple[Tracked, RequestOutput]]:
    """Run every prompt concurrently; yield (which, cumulative output) as updates arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    base = f"{prefix}-{uuid.uuid4().hex[:16]}"
    tracked = [Tracked(i, f"{base}-{i}", t, ids) for i, (t, ids) in enumerate(prepared)]
    done = object()

    async def pump(tr: Tracked) -> None:
        start = time.monotonic()
        last, seen = None, 0
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
                    state.metrics.e2e.observe(now - start)
                    sched = out.metrics.get("first_scheduled_time")
                    if sched is not None:
                        state.metrics.queue.observe(max(0.0, sched - out.metrics["arrival"]))
                    for o in out.outputs:
                        state.metrics.finished(o.finish_reason)
        except BaseException as e:  # delivered to the consumer, which re-raises
            await queue.put(e)
        finally:
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
    finally:
        for t in tasks:  # consumer gone (disconnect/cancel): abort everything still running
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_to_completion(request: Request, state: ServerState, engine: AsyncEngine,
                            prepared: list[tuple[str | None, list[int]]], params: SamplingParams,
                            prefix: str) -> dict[int, tuple[Tracked, RequestOutput]]:
    """Non-streaming: every prompt's final output, keyed by prompt index. Aborts everything if
    the client disconnects first. Releases the request's admission slot in all cases."""
    async def collect():
        finals = {}
        async for tr, out in run_merged(state, engine, prepared, params, prefix):
            if out.finished:
                finals[tr.prompt_index] = (tr, out)
        return finals

    try:
        return await until_disconnected(request, collect())
    finally:
        state.release()


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


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
