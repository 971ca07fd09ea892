"""A real uvicorn server on loopback, in a thread, over a tiny random model that uses the real
SmolLM2 tokenizer (so text, chat templates and detokenization are the real ones; answers are noise)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import uvicorn

from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.core import EngineConfig, EngineCore
from jaxserve.loading import LoadedModel
from jaxserve.server.app import build_app
from jaxserve.server.http import uvicorn_config
from jaxserve.server.metrics import Metrics
from jaxserve.server.serving import ServerState
from jaxserve.server.templates import TemplateSandbox
from tests.engine_fixtures import tiny_loaded

API_KEY = "test-key-123"
MODEL = "tiny-chat"
MAX_MODEL_LEN = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs, timeout: float = 240.0) -> None:
    """Poll `url`/health until 200, failing early (with their output) if a process exits."""
    import httpx
    deadline = time.time() + timeout
    while True:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, [p.stdout.read() for p in dead]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the server never became ready"
        time.sleep(0.5)


def tiny_chat_model(tokenizer) -> LoadedModel:
    lm = tiny_loaded(seed=21, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    return LoadedModel(lm.model, lm.config, lm.hf_config, tokenizer, "tiny-chat", lm.dtype)


class LiveServer:
    def __init__(self, lm: LoadedModel, *, api_key: str | None = API_KEY, max_body_bytes: int = 1 << 20,
                 max_queued_requests: int = 1024, num_kv_blocks: int = 256,
                 trust_request_chat_template: bool = False, max_request_sequences: int = 256,
                 http: dict | None = None, gateway=None, core: EngineCore | None = None):
        """`gateway`: a jaxserve.gateway Gateway (keys, limits, usage; closed on exit);
        `core`: an engine core to reuse (a restart over the same model, without a recompile)."""
        core = core or EngineCore(lm, EngineConfig(
            max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=64, block_size=16,
            num_kv_blocks=num_kv_blocks, compilation_cache_dir=None, show_progress=False))
        self.state = ServerState(model_names=[MODEL], metrics=Metrics(MODEL),
                                 max_queued_requests=max_queued_requests,
                                 max_request_sequences=max_request_sequences,
                                 trust_request_chat_template=trust_request_chat_template,
                                 template_sandbox=(TemplateSandbox(timeout_s=2.0)
                                                   if trust_request_chat_template else None))
        self.state.engine = AsyncEngine(core)
        self.gateway = gateway
        self.app = build_app(self.state, api_key=api_key, max_body_bytes=max_body_bytes,
                             gateway=gateway)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, host="127.0.0.1", port=self.port,
                                                    shutdown_timeout=5, **(http or {})))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.state.engine.shutdown()
        if self.gateway is not None:
            self.gateway.close()
        if self.state.template_sandbox is not None:
            self.state.template_sandbox.close()

    @property
    def engine(self) -> AsyncEngine:
        return self.state.engine


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve_tiny_process(tokenizer, out_dir: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """A real `jaxserve serve` process (CPU) over the tiny chat model saved as an orbax checkpoint
    in `out_dir/tiny` (served as "tiny"), with `flags` added; returns (process, base url) once
    /health answers 200. The caller ends the process."""
    from jaxserve.loading.orbax_io import save_orbax
    lm = tiny_chat_model(tokenizer)
    model_dir = save_orbax(lm.model, lm.hf_config, os.path.join(out_dir, "tiny"), tokenizer=lm.tokenizer)
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxserve.cli", "serve", "--model", model_dir, "--port", str(port),
         "--max-model-len", "256", "--compilation-cache-dir", "", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc])
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url
