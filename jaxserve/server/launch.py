"""Run the OpenAI-compatible server: uvicorn in the main thread, the model loading (and compiling)
on a side thread so /health can answer 503 meanwhile, a watchdog for a dead engine, and graceful
SIGTERM: stop accepting, drain in-flight requests up to --shutdown-timeout, abort the rest, exit 0.
Whatever is stuck, the process ends within --shutdown-timeout + 10 s of the first SIGTERM (a
timer then exits hard), and at once on a second one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from typing import Any

import uvicorn

from jaxserve.server.app import build_app
from jaxserve.server.http import uvicorn_config
from jaxserve.server.metrics import Metrics
from jaxserve.server.serving import ServerState


class JaxServer(uvicorn.Server):
    hard_exit_grace = 10.0   # seconds past --shutdown-timeout before the process exits regardless
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._hard_exit: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        # NOTE: unlike uvicorn's own handler we do not re-raise the signal after shutdown, so a
        # drained SIGTERM exits with status 0.
        if self._draining and sig == signal.SIGTERM:   # a second SIGTERM: stop now
            os._exit(self.exit_code or 1)
        if self._hard_exit is None:
            # the last resort: nothing (a stuck thread, a wedged device call) keeps the process
            self._hard_exit = threading.Timer(self.shutdown_timeout + self.hard_exit_grace,
                                              os._exit, (self.exit_code,))
            self._hard_exit.daemon = True
            self._hard_exit.start()
        if self._draining or self.loop is None or self.state.engine is None:
            if self._draining and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        self.state.shutting_down = True
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.state.engine.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True

    async def watchdog(self) -> None:
        while not self.should_exit:
            eng = self.state.engine
            if getattr(self, "load_error", None) is not None or (eng is not None and eng.is_dead):
                self.exit_code = 1
                self.should_exit = True
                return
            await asyncio.sleep(0.2)


def _banner(host: str, port: int, name: str, api_key: str | None) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    auth = ' -H "Authorization: Bearer $JAXSERVE_API_KEY"' if api_key else ""
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello!"}]})
    return (f"\njaxserve is ready: http://{shown}:{port}/v1 (model {name!r})\n"
            f"  curl http://{shown}:{port}/v1/chat/completions -H 'Content-Type: application/json'"
            f"{auth} -d '{body}'\n")


def build_serving_engine(args):
    """The engine for the serve flags (every process of a multi-host job builds the same one)."""
    from jaxserve.cli import engine_kwargs
    from jaxserve.distributed import attach
    from jaxserve.engine.core import EngineConfig
    from jaxserve.engine.dp import build_engine

    _, core = build_engine(args.model, EngineConfig(**engine_kwargs(args)), args.mesh,
                           dtype=args.dtype, load_format=args.load_format, seed=args.seed,
                           progress=True)
    attach(core)
    return core


def follow(args) -> int:
    """A follower process of a multi-host job: no HTTP, it replays the leader's steps."""
    from jaxserve.distributed import follow as follow_steps
    import jax
    core = build_serving_engine(args)
    print(f"jaxserve: process {jax.process_index()} of {jax.process_count()} ready, following "
          f"process 0", file=sys.stderr, flush=True)
    steps = follow_steps(core)
    print(f"jaxserve: process {jax.process_index()}: leader stopped after {steps} steps",
          file=sys.stderr, flush=True)
    return 0


def default_served_name(model: str | None) -> str:
    """The name clients send as `model` when no --served-model-name is given: the hub id or preset
    as given; for a local path its last component (a path is never shown: /v1/models and the
    unauthenticated /metrics carry this name)."""
    if not model:
        return "SmolLM2-135M-Instruct"
    if os.path.exists(model):
        base = os.path.basename(os.path.normpath(model))
        return base[:-5] if base.endswith(".gguf") and len(base) > 5 else base
    return model


def _setup_logging() -> None:
    """jaxserve's warnings and errors (client mistakes, request failures) on stderr, one line each
    with a time stamp."""
    logger = logging.getLogger("jaxserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(args) -> int:
    from jaxserve.engine.async_engine import AsyncEngine
    from jaxserve.server.templates import TemplateSandbox

    _setup_logging()
    names = args.served_model_name or [default_served_name(args.model)]
    aliases = tuple(a for a in (args.model,) if a and a not in names)
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    sandbox = (TemplateSandbox(timeout_s=args.chat_template_timeout)
               if args.trust_request_chat_template else None)
    state = ServerState(model_names=names, metrics=Metrics(names[0]),
                        max_queued_requests=args.max_queued_requests,
                        max_request_sequences=args.max_request_sequences,
                        chat_template=chat_template, model_aliases=aliases,
                        trust_request_chat_template=args.trust_request_chat_template,
                        template_sandbox=sandbox)
    api_key = args.api_key or os.environ.get("JAXSERVE_API_KEY") or None
    origins = _origins(args.allowed_origins)

    server_box: dict[str, JaxServer] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv = server_box["server"]
        srv.loop = asyncio.get_running_loop()
        task = asyncio.create_task(srv.watchdog())
        yield
        task.cancel()
        if sandbox is not None:
            sandbox.close()
        if state.engine is not None:
            state.engine.shutdown()

    app = build_app(state, api_key=api_key, max_body_bytes=args.max_request_body_bytes,
                    allowed_origins=origins)
    app.router.lifespan_context = lifespan
    config = uvicorn_config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            header_timeout=args.http_header_timeout,
                            body_timeout=args.http_body_timeout,
                            max_connections_per_client=args.max_connections_per_client,
                            shutdown_timeout=args.shutdown_timeout)
    server = JaxServer(config, state, args.shutdown_timeout)
    server_box["server"] = server

    def load() -> None:
        try:
            core = build_serving_engine(args)
            state.engine = AsyncEngine(core)
            print(_banner(args.host, args.port, names[0], api_key), file=sys.stderr, flush=True)
        except BaseException as e:
            print(f"error: could not start the engine: {type(e).__name__}: {e}", file=sys.stderr,
                  flush=True)
            server.load_error = e

    print(f"jaxserve: loading {args.model or 'the embedded default (SmolLM2-135M-Instruct)'}; "
          f"http://{args.host}:{args.port}/health answers 503 until ready", file=sys.stderr, flush=True)
    threading.Thread(target=load, name="jaxserve-load", daemon=True).start()
    server.run()
    return server.exit_code


def _origins(value: str | None) -> list[str] | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("["):
        return [str(x) for x in json.loads(value)]
    return [x.strip() for x in value.split(",") if x.strip()]
