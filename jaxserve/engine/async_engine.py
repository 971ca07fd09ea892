"""AsyncEngine: the EngineCore's step loop on a background thread, with asyncio streams.

The engine thread owns the EngineCore (nothing else touches it). Callers on an asyncio loop hand it
commands through a thread-safe inbox and receive `RequestOutput`s on a per-request asyncio queue
(`loop.call_soon_threadsafe`). Validation happens on the caller's side before anything is queued,
so a bad request raises at once and never reaches the engine.

    engine = AsyncEngine(EngineCore(load_model(...)))
    async for out in engine.generate(prompt, SamplingParams(...)):
        ...                        # cumulative outputs; the last one has finished=True

Leaving the `async for` early (client gone, task cancelled) aborts the request and frees its KV
blocks. If the step loop dies, every open stream gets `EngineDeadError` and `is_dead` turns True.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator

from jaxserve.engine.core import EngineCore
from jaxserve.engine.outputs import RequestFailedError, RequestOutput
from jaxserve.sampling.params import SamplingParams

log = logging.getLogger("jaxserve.engine")


class EngineDeadError(RuntimeError):
    """The engine's step loop stopped with an error; no request can be served."""


class EngineShuttingDown(RuntimeError):
    """New requests are refused because the engine is draining."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncEngine:
    def __init__(self, core: EngineCore, *, start: bool = True):
        self.core = core
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._accepting = True
        self._ids = itertools.count()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        if start:
            self._thread.start()

    # -- state ----------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self.error is not None or (self._thread.ident is not None and not self._thread.is_alive()
                                          and not self._stop.is_set())

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    @property
    def tokenizer(self):
        return self.core.tokenizer

    def get_stats(self) -> dict[str, Any]:
        return self.core.get_stats()

    # -- API ------------------------------------------------------------------------------------
    async def generate(self, prompt: Any, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        if self.is_dead:
            raise EngineDeadError("the engine has stopped") from self.error
        if not self._accepting:
            raise EngineShuttingDown("the server is shutting down")
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        _, ids = await asyncio.to_thread(self.core.tokenize_prompt, prompt)
        self.core.validate(ids, params)        # typed errors raise here, before queueing
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, {"prompt_token_ids": ids, "prompt": prompt
                                             if isinstance(prompt, str) else None}, params))
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                # outputs are cumulative: a consumer that fell behind (a slow HTTP client, a busy
                # event loop) takes the newest one and skips the rest, nothing is lost
                while (not isinstance(item, BaseException) and not item.finished
                       and not stream.queue.empty()):
                    item = stream.queue.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    stream.finished = True
                    if item.error is not None:
                        raise RequestFailedError(request_id, item.error)
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; wait up to `timeout` s for open requests; abort the rest. True if all
        finished on their own."""
        self.stop_accepting()
        deadline = time.monotonic() + max(timeout, 0.0)
        while self._streams and time.monotonic() < deadline and not self.is_dead:
            await asyncio.sleep(0.02)
        clean = not self._streams
        for rid in list(self._streams):
            self.abort(rid)
        end = time.monotonic() + 5.0
        while self._streams and time.monotonic() < end and not self.is_dead:
            await asyncio.sleep(0.02)
        return clean

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- the engine thread ----------------------------------------------------------------------
    def _deliver_step(self, outs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one thread-safe call (one wake-up per
        step, not one per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _handle(self, cmd: tuple) -> None:
        """One command from the inbox. A command that fails is its request's failure (the caller
        gets the exception, the log a line with the request id): never the engine's."""
        rid = cmd[1]
        try:
            if cmd[0] == "add":
                self.core.add_request(rid, cmd[2], cmd[3])
            elif cmd[0] == "abort":
                out = self.core.abort(rid)
                if out is not None:
                    self._deliver_step([out])
        except Exception as e:  # noqa: BLE001
            if isinstance(e, ValueError):   # a request the engine refuses (typed, names the field)
                log.warning("request %s refused: %s", rid, e)
            else:
                log.error("request %s failed in %r (%s: %s)", rid, cmd[0], type(e).__name__, e,
                          exc_info=e)
                e = RequestFailedError(rid, "failed while being added")
            self.core.abort(rid)
            stream = self._streams.get(rid)
            if stream is not None:
                stream.put(e)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                while True:
                    try:
                        cmd = self._inbox.get_nowait()
                    except queue.Empty:
                        break
                    self._handle(cmd)
                if self.core.has_unfinished() or self.core.scheduler.has_work():
                    self._deliver_step(self.core.step())
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as e:  # the loop is dead: tell every waiter
            log.critical("the engine's step loop stopped (%s: %s)", type(e).__name__, e, exc_info=e)
            self.error = e
            err = EngineDeadError(f"engine step loop failed: {type(e).__name__}: {e}")
            for stream in list(self._streams.values()):
                stream.put(err)
        finally:
            # multi-host: release the followers from this thread, the one that broadcasts steps
            from jaxserve.distributed import stop_followers
            try:
                stop_followers(self.core)
            except Exception:  # noqa: BLE001 - followers may already be gone
                pass
