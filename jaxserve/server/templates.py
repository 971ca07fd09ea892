"""Render untrusted Jinja chat templates in worker processes, under a time and an output budget.

A chat template sent with a request is code: even inside Jinja's sandbox it can loop for hours
(nested `range()` loops that each stay under the sandbox's range limit), allocate gigabytes
(`{{ 'a' * 10**10 }}`) or produce hundreds of megabytes of text. `TemplateSandbox` renders such
templates in a small pool of separate processes:

* each worker sets an address-space limit (`RLIMIT_AS`) on itself and streams the output,
  stopping as soon as it passes `max_output_chars`;
* the parent waits for the answer without blocking the event loop and SIGKILLs a worker that
  takes longer than `timeout_s`; a killed or crashed worker is replaced;
* requests and replies cross the pipe as JSON bytes, never as pickles.

Workers are started with the *spawn* start method (the server process runs JAX threads and must
never be forked) and import only the standard library and jinja2. The Jinja environment has the
same options, filter and globals as the one transformers' `apply_chat_template` uses, so ordinary
templates render to the same text.

    sandbox = TemplateSandbox()
    text = await sandbox.render(template, messages, add_generation_prompt=True,
                                special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    sandbox.close()

A `TemplateSandbox` is meant to be used from one event loop at a time.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
import weakref
from collections import OrderedDict
from typing import Any

__all__ = ["TemplateRenderError", "TemplateSandbox"]


class TemplateRenderError(ValueError):
    """The chat template could not be rendered; the message is safe to show to API clients."""


# Names a message's reasoning may be given under; the first is the one chat templates read.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Template variables that `render` sets itself.
_RESERVED_VARS = ("messages", "add_generation_prompt")
_COMPILED_CACHE_SIZE = 8
_MAX_ERROR_CHARS = 300


def _dumps(obj: Any) -> bytes:
    # Lone surrogates (valid in JSON "\ud800" escapes) survive the round trip.
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _loads(data: bytes) -> Any:
    return json.loads(data.decode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------------------------------
# Worker side: standard library + jinja2 only. Nothing here may import jax or the engine.
# ---------------------------------------------------------------------------------------------

def _make_environment():
    """A sandboxed environment that behaves like the one transformers renders chat templates in."""
    import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; when
        # rendering a prompt it just writes its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Unlike Jinja's own `tojson`, no HTML escaping, and json.dumps' layout options.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    class DictFactory:
        # `dict(...)` in templates, without exposing the `dict` type's attributes.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a namespace cannot hold underscore-prefixed attributes (got {name!r})")

    class SafeNamespace(jinja2.utils.Namespace):
        # A namespace that refuses underscore-prefixed names.
        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = DictFactory()
    env.globals["namespace"] = SafeNamespace
    return env


class _RenderFailure(Exception):
    """A render error whose message is meant for the client."""


def _short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= _MAX_ERROR_CHARS else line[:_MAX_ERROR_CHARS] + "..."


def _prepare_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _RenderFailure("the conversation is empty")
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise _RenderFailure("each chat message must be an object")
        # Keys set to null are dropped: templates handle a missing key better than a None.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _render(env, cache: OrderedDict, request: dict, max_output_chars: int) -> str:
    import jinja2

    source = request.get("template")
    if not isinstance(source, str):
        raise _RenderFailure("the chat template must be a string")
    compiled = cache.get(source)
    if compiled is None:
        try:
            compiled = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            where = f" at line {e.lineno}" if e.lineno else ""
            raise _RenderFailure(f"syntax error in the chat template{where}: {_short(e.message or '')}")
        cache[source] = compiled
        while len(cache) > _COMPILED_CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(source)

    context: dict[str, Any] = {"tools": None, "documents": None}
    context.update({k: v for k, v in (request.get("special_tokens") or {}).items() if v is not None})
    context.update(request.get("extra") or {})
    context["messages"] = _prepare_messages(request.get("messages"))
    context["add_generation_prompt"] = bool(request.get("add_generation_prompt"))

    pieces: list[str] = []
    total = 0
    stream = compiled.generate(**context)
    try:
        for piece in stream:
            total += len(piece)
            if total > max_output_chars:
                pieces.clear()
                raise _RenderFailure(
                    f"the chat template's output is longer than {max_output_chars} characters")
            pieces.append(piece)
    finally:
        stream.close()
    return "".join(pieces)


def _describe(exc: BaseException) -> str:
    import jinja2
    from jinja2.exceptions import SecurityError

    if isinstance(exc, _RenderFailure):
        return str(exc)
    if isinstance(exc, SecurityError):
        return f"the chat template tried an unsafe operation: {_short(str(exc))}"
    if isinstance(exc, jinja2.TemplateSyntaxError):
        where = f" at line {exc.lineno}" if exc.lineno else ""
        return f"syntax error in the chat template{where}: {_short(exc.message or '')}"
    if isinstance(exc, jinja2.TemplateError):
        return f"the chat template raised an error: {_short(str(exc))}"
    if isinstance(exc, MemoryError):
        return "the chat template used too much memory"
    if isinstance(exc, RecursionError):
        return "the chat template recursed too deeply"
    if isinstance(exc, SyntaxError):  # the compiled template is too deeply nested for Python
        return "the chat template is too complex to compile"
    return f"the chat template failed: {_short(str(exc))}"


def _limit_memory(limit: int) -> None:
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass


def _exit_with_parent(parent_pid: int) -> None:
    # If the server dies (even by SIGKILL) while this worker is busy, stop instead of lingering.
    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_main(conn, parent_pid: int, memory_limit_bytes: int | None, max_output_chars: int) -> None:
    """Entry point of a worker process: answer JSON render requests until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us
    _exit_with_parent(parent_pid)
    if memory_limit_bytes:
        _limit_memory(int(memory_limit_bytes))
    try:
        env = _make_environment()
    except BaseException:
        conn.send_bytes(_dumps({"error": "the template worker could not start"}))
        return
    cache: OrderedDict = OrderedDict()
    conn.send_bytes(b'{"ready": true}')
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        recycle = False
        try:
            reply = {"ok": _render(env, cache, _loads(data), max_output_chars)}
        except BaseException as e:  # everything a template can raise, reported as text
            recycle = isinstance(e, MemoryError)
            reply = {"error": _describe(e)}
        try:
            payload = _dumps(reply)
        except MemoryError:
            reply, recycle = {"error": "the chat template used too much memory"}, True
        if recycle:  # this process is exiting: say so, and leave a fresh one for the next request
            reply["recycle"] = True
            payload = _dumps(reply)
        try:
            conn.send_bytes(payload)
        except (OSError, ValueError):
            return
        if recycle:
            return


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------

class _Worker:
    __slots__ = ("proc", "conn", "ready")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.ready = False


def _stop_workers(workers: list) -> None:
    """Kill and reap every worker in `workers` (slots may hold None). No locks, no event loop:
    safe from atexit, a finalizer or a signal handler."""
    for i, w in enumerate(list(workers)):
        if w is None:
            continue
        workers[i] = None
        _stop_one(w)


def _stop_one(w: _Worker) -> None:
    try:
        w.conn.close()
    except OSError:
        pass
    try:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=2.0)
    except (OSError, ValueError, AssertionError):
        pass


_start_lock = threading.Lock()


def _start_without_main(proc) -> None:
    """`proc.start()`, but the child does not re-import the parent's `__main__` module.

    A spawned child normally re-runs the parent's main script (or re-imports its `-m` module)
    before calling the target. The server's main module may import JAX or the engine (or, in a
    script without an `if __name__ == "__main__"` guard, start a server), which a template worker
    must never do. The start method reads `sys.modules["__main__"]` once, while `start()` runs, to
    decide what to re-import; showing it a bare module for that moment makes the child skip it."""
    with _start_lock:
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            proc.start()
        finally:
            if main is not None:
                sys.modules["__main__"] = main


class TemplateSandbox:
    """A small pool of worker processes that render chat templates under time/output/memory limits.

    Workers start lazily (the first render, or `start()`) and are replaced after being killed.
    `render` raises `TemplateRenderError` with a client-safe message on any failure.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 2.0, max_output_chars: int = 4_000_000,
                 memory_limit_bytes: int | None = 1 << 30, *, start_timeout_s: float = 60.0):
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if max_output_chars < 1:
            raise ValueError("max_output_chars must be >= 1")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.max_output_chars = int(max_output_chars)
        self.memory_limit_bytes = memory_limit_bytes
        self.start_timeout_s = float(start_timeout_s)
        self._ctx = multiprocessing.get_context("spawn")
        self._slots: list[_Worker | None] = [None] * self.workers
        self._idle: list[int] = list(range(self.workers - 1, -1, -1))  # pop() takes slot 0 first
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: weakref.ref | None = None
        self._closed = False
        # Kills the workers when close() is called, when the sandbox is garbage collected, or at
        # interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, _stop_workers, self._slots)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker now instead of on first use (does not wait for them)."""
        self._check_open()
        for i, w in enumerate(self._slots):
            if w is None:
                self._spawn(i)

    def close(self) -> None:
        """Kill and reap the workers. Idempotent; safe from a signal handler or atexit."""
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Process ids of the workers started so far."""
        return [w.proc.pid for w in list(self._slots) if w is not None and w.proc.pid is not None]

    def _check_open(self) -> None:
        if self._closed:
            raise TemplateRenderError("the chat template sandbox is closed")

    def _spawn(self, i: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, name=f"jaxserve-template-{i}", daemon=True,
            args=(child_conn, os.getpid(), self.memory_limit_bytes, self.max_output_chars))
        try:
            _start_without_main(proc)
        except BaseException:
            parent_conn.close()
            child_conn.close()
            raise
        child_conn.close()  # only the worker holds its end now, so its death reads as EOF here
        w = _Worker(proc, parent_conn)
        self._slots[i] = w
        if self._closed:  # close() ran while this worker was starting
            self._retire(i, restart=False)
            raise TemplateRenderError("the chat template sandbox is closed")
        return w

    def _retire(self, i: int, *, restart: bool) -> None:
        """Kill the worker in slot `i`; start a replacement (not waited for) if `restart`."""
        w = self._slots[i]
        self._slots[i] = None
        if w is not None:
            _stop_one(w)
        if restart and not self._closed:
            try:
                self._spawn(i)
            except Exception:
                pass  # tried again on the next render

    # -- rendering -----------------------------------------------------------------------------
    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is None or self._sem_loop() is not loop:
            self._sem = asyncio.Semaphore(self.workers)
            self._sem_loop = weakref.ref(loop)
        return self._sem

    async def render(self, template: str, messages: list[dict], *, add_generation_prompt: bool,
                     special_tokens: dict[str, str | None], extra: dict | None = None) -> str:
        """Render `template` over `messages` like `apply_chat_template(..., tokenize=False)`.

        `special_tokens` (bos_token, eos_token, ...) and `extra` (tools, documents, template
        kwargs) become template variables; `extra` wins over `special_tokens`."""
        self._check_open()
        if not isinstance(template, str):
            raise TemplateRenderError("the chat template must be a string")
        extra = dict(extra or {})
        for name in _RESERVED_VARS:
            if name in extra:
                raise TemplateRenderError(f"{name!r} cannot be passed as a chat template variable")
        try:
            payload = _dumps({"template": template, "messages": messages,
                              "add_generation_prompt": bool(add_generation_prompt),
                              "special_tokens": dict(special_tokens or {}), "extra": extra})
        except (TypeError, ValueError):
            raise TemplateRenderError("the chat messages and template variables must be JSON data") from None

        async with self._semaphore():
            self._check_open()
            if not self._idle:
                raise RuntimeError("TemplateSandbox used from more than one event loop at once")
            i = self._idle.pop()
            try:
                return await self._render_in(i, payload)
            finally:
                self._idle.append(i)

    async def _render_in(self, i: int, payload: bytes) -> str:
        w = self._slots[i]
        if w is not None and not w.proc.is_alive():  # died while idle (e.g. the OOM killer)
            self._retire(i, restart=False)
            w = None
        if w is None:
            try:
                w = self._spawn(i)
            except TemplateRenderError:
                raise
            except Exception:
                raise TemplateRenderError("could not start a chat template worker") from None
        if not w.ready:
            await self._wait_ready(i, w)

        try:
            w.conn.send_bytes(payload)
        except (OSError, ValueError):
            self._retire(i, restart=True)
            raise TemplateRenderError("the chat template worker stopped unexpectedly") from None

        try:
            data = await self._receive(w, self.timeout_s)
        except asyncio.TimeoutError:
            self._retire(i, restart=True)
            self._check_open()
            raise TemplateRenderError(
                f"the chat template took longer than {self.timeout_s} s to render") from None
        except asyncio.CancelledError:
            # The caller gave up; the render may still be running, so this worker is unusable.
            self._retire(i, restart=True)
            raise
        except (EOFError, OSError, ValueError):
            self._retire(i, restart=True)
            self._check_open()  # killed by close()
            raise TemplateRenderError("the chat template worker stopped unexpectedly") from None

        try:
            reply = _loads(data)
        except (ValueError, UnicodeDecodeError):
            reply = None
        if not isinstance(reply, dict):
            self._retire(i, restart=True)
            raise TemplateRenderError("the chat template worker sent a malformed reply")
        if "ok" in reply and isinstance(reply["ok"], str):
            return reply["ok"]
        if reply.get("recycle"):
            # The worker exits after a MemoryError; start its replacement now.
            w.proc.join(timeout=1.0)
            self._retire(i, restart=True)
        raise TemplateRenderError(str(reply.get("error") or "the chat template could not be rendered"))

    async def _wait_ready(self, i: int, w: _Worker) -> None:
        try:
            data = await self._receive(w, self.start_timeout_s)
            reply = _loads(data)
        except asyncio.CancelledError:
            raise  # the worker keeps starting; the next render waits for it
        except (asyncio.TimeoutError, EOFError, OSError, ValueError):
            self._retire(i, restart=False)
            raise TemplateRenderError("could not start a chat template worker") from None
        if not (isinstance(reply, dict) and reply.get("ready") is True):
            self._retire(i, restart=False)
            raise TemplateRenderError("could not start a chat template worker")
        w.ready = True

    def _reply_limit(self) -> int:
        # JSON of the largest allowed output: at most 6 bytes per character ("\u001f"), plus framing.
        return 6 * self.max_output_chars + 65536

    async def _receive(self, w: _Worker, timeout: float) -> bytes:
        """Wait (without blocking the loop) until the worker writes or exits, then read its reply."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fd = w.conn.fileno()

        def readable():
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(fd)
        # Readable means the reply has started (the worker finished rendering) or the pipe hit EOF.
        return w.conn.recv_bytes(self._reply_limit())

    def __enter__(self) -> "TemplateSandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
