"""Run the OpenAI-compatible server: uvicorn in the main thread, the model loading (and compiling)
on a side thread so /health can answer 503 meanwhile, a watchdog for a dead engine, and graceful
SIGTERM: stop accepting, drain in-flight requests up to --shutdown-timeout, abort the rest, exit 0.
Whatever is stuck, the process ends within --shutdown-timeout + 10 s of the first SIGTERM (a
timer then exits hard), and at once on a second one.

The load thread also resolves the model (a hub id, with --revision and --download-dir, to its
snapshot folder), reads the generation config's default sampling (`app.state.default_sampling`)
and takes --tokenizer's tokenizer. uvicorn gets --ssl-* (HTTPS), --root-path and the access-log
switch; a stats line is logged every 10 s while there is work (--disable-log-stats), and each
request with --enable-log-requests. The gateway (`jaxserve/gateway/`: --api-keys-file, --usage-db,
--request-log) is built first, so a bad keys file stops start-up; SIGHUP re-reads the keys file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import threading
import time
import uuid
from typing import Any, AsyncIterator

import uvicorn

from jaxserve import logs
from jaxserve.config import DefaultSampling, default_sampling, read_generation_config
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.gateway import build_gateway
from jaxserve.server.app import build_app
from jaxserve.server.http import uvicorn_config
from jaxserve.server.metrics import Metrics
from jaxserve.server.serving import ServerState

log = logging.getLogger("jaxserve.server")


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


def _banner(host: str, port: int, name: str, api_key: str | None,
            certfile: str | None = None) -> str:
    """The ready line and a curl command that works as printed: the operator's own API key in it,
    greedy sampling (a small model's sampled first answer is often nonsense), and over HTTPS the
    server's certificate as curl's trust anchor (so a self-signed one verifies)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    if ":" in shown:   # IPv6 literal
        shown = f"[{shown}]"
    url = f"{'https' if certfile else 'http'}://{shown}:{port}/v1"
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    if certfile:
        auth = f" --cacert {shlex.quote(certfile)}" + auth
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hello!"}],
                       "temperature": 0})
    return (f"\njaxserve is ready: {url} (model {name!r})\n"
            f"  curl {url}/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d {shlex.quote(body)}\n")


def model_source(args) -> str | None:
    """What the loaders get as the model: a hub id is resolved here, with --revision and
    --download-dir, to its local snapshot folder (where generation_config.json is read too)."""
    from jaxserve.loading.hub import is_hub_id, resolve_hub_model

    model = args.model
    if model and is_hub_id(model) and not model.endswith(".gguf"):
        return resolve_hub_model(model, revision=args.revision, cache_dir=args.download_dir,
                                 config_only=args.load_format == "dummy")
    return model


def load_tokenizer(spec: str, *, revision: str | None = None, cache_dir: str | None = None):
    """--tokenizer: a HF directory, a .gguf file (the tokenizer in its metadata) or a hub id."""
    from jaxserve.loading.hub import is_hub_id
    from jaxserve.tokenizer import TokenizerError, load_hf_tokenizer

    if spec.endswith(".gguf") and os.path.isfile(spec):
        from jaxserve.loading.gguf_loader import GGUFCheckpoint
        return GGUFCheckpoint(spec).tokenizer()
    if os.path.isdir(spec):
        return load_hf_tokenizer(spec)
    if is_hub_id(spec):
        from transformers import AutoTokenizer
        try:   # only the tokenizer's files are fetched (HF_HUB_OFFLINE honoured)
            return AutoTokenizer.from_pretrained(spec, revision=revision, cache_dir=cache_dir)
        except Exception as e:  # transformers raises many types here
            raise TokenizerError(f"could not load the tokenizer {spec!r} from the Hugging Face "
                                 f"hub or its cache: {type(e).__name__}") from None
    raise TokenizerError(f"--tokenizer {spec!r} is not a directory, a .gguf file or a hub id "
                         f"like org/name")


def generation_defaults(args, source: str | None) -> DefaultSampling:
    """--generation-config (and --override-generation-config): the sampling defaults for the
    fields a request leaves out. `auto` reads the model folder's generation_config.json (a GGUF
    file or a preset has none)."""
    from jaxserve.sampling.params import SamplingParams

    if args.generation_config == "vllm":
        found = None
    elif args.generation_config == "auto":
        found = read_generation_config(source) if source and os.path.isdir(source) else None
    else:
        found = read_generation_config(args.generation_config)
    defaults = default_sampling(found, args.override_generation_config)
    SamplingParams(**defaults).validate()   # a bad value stops start-up, naming the field
    return defaults


def _load_with_tokenizer(args, source: str | None):
    """The model with --tokenizer's tokenizer, its weights placed as `build_engine` places
    replica 0's (each device receives only its shards as they load)."""
    import jax
    from jax.sharding import Mesh

    from jaxserve.loading import load_model
    from jaxserve.sharding import AXES, make_mesh, param_sharding, parse_mesh

    sizes = parse_mesh(args.mesh)
    shardings = None
    if sizes["dp"] * sizes["tp"] > 1:
        grid = make_mesh(args.mesh, jax.devices()[: sizes["dp"] * sizes["tp"]])
        shardings = param_sharding(Mesh(grid.devices[:1], AXES))
    tokenizer = load_tokenizer(args.tokenizer, revision=args.tokenizer_revision,
                               cache_dir=args.download_dir)
    lm = load_model(source, dtype=args.dtype, load_format=args.load_format, seed=args.seed,
                    shardings=shardings, load_tokenizer=False, progress=True)
    return dataclasses.replace(lm, tokenizer=tokenizer)


def serving_engine_config(args):
    """The EngineConfig of the serve flags: the engine flags `jaxserve bench` shares, and the
    serve-only --enforce-eager (no warm-up) and --max-logprobs."""
    from jaxserve.arg_utils import engine_kwargs
    from jaxserve.engine.core import EngineConfig

    return EngineConfig(**engine_kwargs(args), warmup=not args.enforce_eager,
                        max_logprobs=args.max_logprobs)


def build_serving_engine(args, source: str | None = None):
    """The engine for the serve flags (every process of a multi-host job builds the same one).
    `source`: the model as `model_source` resolved it (resolved here when not given)."""
    from jaxserve.distributed import attach
    from jaxserve.engine.dp import build_engine

    source = model_source(args) if source is None else source
    model = _load_with_tokenizer(args, source) if args.tokenizer else source
    _, core = build_engine(model, serving_engine_config(args), args.mesh, dtype=args.dtype,
                           load_format=args.load_format, seed=args.seed, progress=True)
    attach(core)
    return core


def follow(args) -> int:
    """A follower process of a multi-host job: no HTTP, it replays the leader's steps."""
    from jaxserve.distributed import follow as follow_steps
    import jax
    core = build_serving_engine(args)
    log.info("process %d of %d ready, following process 0", jax.process_index(),
             jax.process_count())
    steps = follow_steps(core)
    log.info("process %d: leader stopped after %d steps", jax.process_index(), steps)
    return 0


def default_served_name(model: str | None) -> str:
    """The name clients send as `model` when no --served-model-name is given: the hub id or preset
    as given; for a local path its last component (a path is never shown: /v1/models and the
    unauthenticated /metrics carry this name)."""
    if not model:
        return "SmolLM2-135M-Instruct"
    from jaxserve.loading import ModelNotFoundError, default_model_path
    try:   # the embedded default is named alike however it is given
        if os.path.abspath(model) == os.path.abspath(default_model_path()):
            return "SmolLM2-135M-Instruct"
    except ModelNotFoundError:
        pass
    if os.path.exists(model):
        base = os.path.basename(os.path.normpath(model))
        return base[:-5] if base.endswith(".gguf") and len(base) > 5 else base
    return model


class RequestLoggingEngine(AsyncEngine):
    """--enable-log-requests: a line when a request arrives (id, prompt, sampling parameters) and
    one when it ends (finish reasons, tokens, seconds), on the `jaxserve.requests` logger."""

    def __init__(self, core, *, max_log_len: int | None = None, **kw):
        super().__init__(core, **kw)
        self.max_log_len = max_log_len
        self.log = logging.getLogger("jaxserve.requests")

    async def generate(self, prompt: Any, params=None, request_id: str | None = None
                       ) -> AsyncIterator:
        request_id = request_id or f"req-{uuid.uuid4().hex[:12]}"
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if text is None and ids is not None and self.tokenizer is not None:   # a chat's render
            text = self.tokenizer.decode(ids[:self.max_log_len])
        if text is not None and self.max_log_len is not None:
            text = text[:self.max_log_len]
        self.log.info("request %s: prompt %r%s, %s", request_id, text,
                      f" ({len(ids)} tokens)" if ids is not None else "", params)
        start, last = time.monotonic(), None
        async with contextlib.aclosing(super().generate(prompt, params, request_id)) as outs:
            try:
                async for last in outs:
                    yield last
            finally:
                if last is not None and last.finished:
                    self.log.info("request %s finished: %s, %d tokens in %.2f s", request_id,
                                  ", ".join(str(o.finish_reason) for o in last.outputs),
                                  sum(len(o.token_ids) for o in last.outputs),
                                  time.monotonic() - start)
                else:
                    self.log.info("request %s ended early (aborted or failed) after %.2f s",
                                  request_id, time.monotonic() - start)


async def log_stats(state: ServerState, interval: float = 10.0) -> None:
    """Every `interval` seconds while there is work, one line on the `jaxserve.stats` logger:
    prompt and generation throughput, running and waiting requests, KV cache use, prefix cache
    hits (vLLM logs the same figures; --disable-log-stats turns it off)."""
    log = logging.getLogger("jaxserve.stats")
    before, then = None, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        if state.engine is None:
            continue
        stats, now = state.engine.get_stats(), time.monotonic()
        if before is not None:
            delta = {k: stats[k] - before[k] for k in ("prompt_tokens_total",
                                                       "generation_tokens_total",
                                                       "prefix_cache_queries", "prefix_cache_hits")}
            if (delta["prompt_tokens_total"] or delta["generation_tokens_total"]
                    or stats["num_requests_running"] or stats["num_requests_waiting"]):
                queries = delta["prefix_cache_queries"]
                hits = (f", prefix cache hits {100 * delta['prefix_cache_hits'] / queries:.1f}%"
                        if queries else "")
                log.info("prompt %.1f tokens/s, generation %.1f tokens/s; %d running, %d waiting; "
                         "KV cache %.1f%% used%s", delta["prompt_tokens_total"] / (now - then),
                         delta["generation_tokens_total"] / (now - then),
                         stats["num_requests_running"], stats["num_requests_waiting"],
                         100 * stats["kv_cache_usage_perc"], hits)
        before, then = stats, now


def _tls_and_proxy(args) -> dict[str, Any]:
    """The uvicorn settings of --ssl-* (HTTPS), --root-path and --disable-uvicorn-access-log."""
    extra: dict[str, Any] = {}
    if args.ssl_certfile:
        extra.update(ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                     ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs)
        if args.ssl_ciphers:
            extra["ssl_ciphers"] = args.ssl_ciphers
    if args.root_path:
        extra["root_path"] = args.root_path
    if args.disable_uvicorn_access_log:
        extra["access_log"] = False
    return extra


def serve(args) -> int:
    from jaxserve.server.templates import TemplateSandbox

    logs.configure()
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
    api_key = None if args.api_keys_file else (args.api_key or os.environ.get("JAXSERVE_API_KEY")
                                               or None)
    gateway = build_gateway(api_key=api_key, keys_file=args.api_keys_file, usage_db=args.usage_db,
                            request_log=args.request_log, log_content=args.log_request_content)
    origins = _origins(args.allowed_origins)

    server_box: dict[str, JaxServer] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        srv = server_box["server"]
        srv.loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(srv.watchdog())]
        if args.api_keys_file:
            srv.loop.add_signal_handler(signal.SIGHUP, gateway.reload)
        if not args.disable_log_stats:
            tasks.append(asyncio.create_task(log_stats(state)))
        yield
        for task in tasks:
            task.cancel()
        if sandbox is not None:
            sandbox.close()
        gateway.close()   # the last usage records and request-log lines
        if state.engine is not None:
            state.engine.shutdown()

    app = build_app(state, gateway=gateway, max_body_bytes=args.max_request_body_bytes,
                    allowed_origins=origins, pooler_config=args.pooler_config)
    app.router.lifespan_context = lifespan
    extra = _tls_and_proxy(args)
    config = uvicorn_config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            header_timeout=args.http_header_timeout,
                            body_timeout=args.http_body_timeout,
                            max_connections_per_client=args.max_connections_per_client,
                            shutdown_timeout=args.shutdown_timeout, **extra)
    server = JaxServer(config, state, args.shutdown_timeout)
    server_box["server"] = server

    def load() -> None:
        try:
            source = model_source(args)
            defaults = generation_defaults(args, source)
            if defaults:
                log.info("default sampling for the fields a request leaves out: %s (the "
                         "generation config; --generation-config vllm ignores the model's)",
                         defaults)
            state.default_sampling = defaults   # set before the engine: requests get 503 till then
            core = build_serving_engine(args, source)
            state.engine = (RequestLoggingEngine(core, max_log_len=args.max_log_len)
                            if args.enable_log_requests else AsyncEngine(core))
            log.info("%s", _banner(args.host, args.port, names[0], api_key, args.ssl_certfile))
        except BaseException as e:
            log.error("could not start the engine: %s: %s", type(e).__name__, e)
            server.load_error = e

    scheme = "https" if "ssl_certfile" in extra else "http"
    log.info("loading %s; %s://%s:%s/health answers 503 until ready",
             args.model or "the embedded default (SmolLM2-135M-Instruct)", scheme, args.host,
             args.port)
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
