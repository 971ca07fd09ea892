"""Run the OpenAI-compatible server: uvicorn in the main thread, the model loading (and compiling)
on a side thread so /health can answer 503 meanwhile, a watchdog for a dead engine, and graceful
SIGTERM: stop accepting, drain in-flight requests up to --shutdown-timeout, abort the rest, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any

import uvicorn

from jaxserve.server.app import build_app
from jaxserve.server.metrics import Metrics
from jaxserve.server.serving import ServerState


class JaxServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state = state
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        # NOTE: unlike uvicorn's own handler we do not re-raise the signal after shutdown, so a
        # drained SIGTERM exits with status 0.
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


def serve(args) -> int:
    from jaxserve.engine.async_engine import AsyncEngine

    names = args.served_model_name or [args.model or "SmolLM2-135M-Instruct"]
    chat_template = args.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as f:
            chat_template = f.read()
    state = ServerState(model_names=names, metrics=Metrics(names[0]),
                        max_queued_requests=args.max_queued_requests, chat_template=chat_template,
                        trust_request_chat_template=args.trust_request_chat_template)
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
        if state.engine is not None:
            state.engine.shutdown()

    app = build_app(state, api_key=api_key, max_body_bytes=args.max_request_body_bytes,
                    allowed_origins=origins)
    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_keep_alive=5, h11_max_incomplete_event_size=64 * 1024,
                            timeout_graceful_shutdown=max(1, int(args.shutdown_timeout) + 5))
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
