"""The Starlette application: thin routes over the serving logic, plus the guard middleware.

Middleware order (outermost first): CORS (when configured) -> Guard: OPTIONS answered (204 with the
path's `Allow`, 404 for an unknown path), request-body limit (413), API-key check on every path but
/health, /metrics and /version (decided on the raw path; the key is looked up by the gateway,
`jaxserve/gateway/`, in constant time, and its entry travels to the handlers in the ASGI scope),
refusal while shutting down (503). Every error leaves as an OpenAI error envelope.

OPTIONS never reaches a handler and needs no key: browsers send CORS preflights without
credentials, and the answer only lists the path's methods. CORS itself is opt-in
(`allowed_origins`); with it, CORSMiddleware answers preflights from the allowed origins before the
guard. Without it no CORS headers are sent, so browsers on other origins are refused. (vLLM allows
every origin by default, which lets any web page a user opens drive a key-less server on their
machine or network and read the answers; here an operator has to ask for that, with "*".)
"""

from __future__ import annotations

import asyncio
import importlib.metadata

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Match, Route

from jaxserve.engine.embed import PoolerConfig
from jaxserve.gateway.gate import SCOPE_KEY, Gateway, key_of
from jaxserve.gateway.keys import KeyRing
from jaxserve.server.chat import create_chat_completion
from jaxserve.server.completions import create_completion
from jaxserve.server.embeddings import EmbeddingService, create_embedding
from jaxserve.server.errors import APIError, error_response
from jaxserve.server.metrics import CURRENT
from jaxserve.server.serving import ServerState, error_reply, read_json, request_id

OPEN_PATHS = {"/health", "/metrics", "/version"}


def _version() -> str:
    try:
        return importlib.metadata.version("jaxserve")
    except importlib.metadata.PackageNotFoundError:   # run from a source tree, not installed
        from jaxserve import __version__
        return __version__


VERSION = _version()


class GuardMiddleware:
    """Raw ASGI so that oversized bodies are cut off while streaming in, before buffering."""

    def __init__(self, app, *, gateway: Gateway, max_body_bytes: int, state: ServerState,
                 routes: list[Route]):
        self.app = app
        self.gateway = gateway
        self.max_body = max_body_bytes
        self.state = state
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        CURRENT.set(self.state.metrics)   # error_reply counts this request's errors here
        if scope["method"] == "OPTIONS":
            return await self.options(scope)(scope, receive, send)
        path = scope.get("raw_path", b"").split(b"?", 1)[0].decode("latin-1") or scope["path"]
        if path not in OPEN_PATHS:
            supplied = b""
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    supplied = v[7:] if v[:7].lower() == b"bearer " else b""
            entry = self.gateway.authenticate(supplied)
            if entry is None:
                self.state.metrics.request_error(401)
                return await error_response(401, "invalid or missing API key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            scope.setdefault("state", {})[SCOPE_KEY] = entry
            if self.state.shutting_down:
                self.state.metrics.request_error(503)
                return await error_response(503, "the server is shutting down",
                                            headers={"Retry-After": "5"})(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
                    self.state.metrics.request_error(413)
                    return await error_response(413, f"request body larger than {self.max_body} bytes"
                                                )(scope, receive, send)
        seen = 0
        max_body = self.max_body

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > max_body:
                    raise APIError(413, f"request body larger than {max_body} bytes")
            return msg

        try:
            await self.app(scope, limited_receive, send)
        except APIError as e:
            self.state.metrics.request_error(e.status)
            await e.response()(scope, receive, send)

    def options(self, scope) -> Response:
        """204 with the methods the path takes, without calling any handler; 404 when no route
        has the path."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                allow = sorted({*(route.methods or ()), "OPTIONS"})
                return Response(status_code=204, headers={"Allow": ", ".join(allow)})
        return error_response(404, "not found")


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.server
    if state.shutting_down:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if state.engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if state.engine.is_dead:
        return JSONResponse({"status": "engine_dead"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    stats = state.engine.get_stats() if state.engine is not None else None
    if stats is not None:
        # the embedder compiles each of its buckets on first use, by design: those are not the
        # unexpected compiles this counter watches for in the generation engine's steps
        embedding = request.app.state.embeddings.lowerings
        stats = {**stats, "compiles_after_warmup": max(0, stats["compiles_after_warmup"] - embedding)}
    text = state.metrics.render(stats) + request.app.state.gateway.render_metrics()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


def _model_card(state: ServerState, name: str) -> dict:
    max_len = state.engine.core.max_model_len if state.engine is not None else None
    root = name if name in state.model_names else state.served_name   # an alias: what it serves
    return {"id": name, "object": "model", "created": state.created, "owned_by": "jaxserve",
            "root": root, "max_model_len": max_len}


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    key = key_of(request.scope)   # a key limited to some models sees only those
    return JSONResponse({"object": "list", "data": [_model_card(state, n) for n in state.model_names
                                                    if key.allows(n)]})


async def retrieve_model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    name = request.path_params["model_id"]
    try:
        state.check_model({"model": name})   # 404 model_not_found for an unknown id
        request.app.state.gateway.check_model(key_of(request.scope), name)
    except Exception as e:
        return error_reply(e, request_id("model")).response()
    return JSONResponse(_model_card(state, name))


async def version(request: Request) -> Response:
    return JSONResponse({"version": VERSION})


async def tokenize(request: Request) -> Response:
    state: ServerState = request.app.state.server
    rid = request_id("tok")
    try:
        engine = state.ready_engine()
        body = await read_json(request)
        state.check_model(body)
        tok = engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer")
        if "messages" in body:
            from jaxserve.server import protocol
            from jaxserve.server.chat import render_chat
            msgs = protocol.chat_messages(body)
            ids = await asyncio.to_thread(
                render_chat, tok, msgs, state.chat_template,
                protocol.get(body, "add_generation_prompt", (bool,), True))
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise APIError(400, "'prompt' must be a string", param="prompt")
            add = body.get("add_special_tokens", True)
            ids = await asyncio.to_thread(tok.encode, prompt, add_special_tokens=bool(add))
        return JSONResponse({"count": len(ids), "max_model_len": engine.core.max_model_len,
                             "tokens": ids})
    except Exception as e:
        return error_reply(e, rid).response()


async def detokenize(request: Request) -> Response:
    state: ServerState = request.app.state.server
    rid = request_id("detok")
    try:
        engine = state.ready_engine()
        body = await read_json(request)
        state.check_model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise APIError(400, "'tokens' must be an array of integers", param="tokens")
        v = engine.core.lm.config.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {v})", param="tokens")
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer")
        return JSONResponse({"prompt": await asyncio.to_thread(engine.tokenizer.decode, ids)})
    except Exception as e:
        return error_reply(e, rid).response()


async def get_usage(request: Request) -> Response:
    """The caller's usage rows (an admin key, the single --api-key or no key: everyone's);
    `?since=YYYY-MM-DD` keeps the days from then on."""
    gate: Gateway = request.app.state.gateway
    key = key_of(request.scope)
    since = request.query_params.get("since")
    who = None if (key.admin or gate.single_key) else key.name
    if gate.store is None or gate.store.db is None:
        return error_response(404, "usage is not recorded on this server (start it with "
                                   "--usage-db or --api-keys-file)")
    rows = await asyncio.to_thread(gate.store.rows, key=who, since=since)
    return JSONResponse({"object": "list", "data": rows})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    request.app.state.server.metrics.request_error(exc.status_code)
    return error_response(exc.status_code, msg, headers=exc.headers)   # 405 keeps its Allow


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_reply(exc, request_id("http")).response()


def build_app(state: ServerState, *, api_key: str | None = None, max_body_bytes: int = 32 << 20,
              allowed_origins: list[str] | None = None,
              pooler_config: str | dict | PoolerConfig | None = None,
              max_embed_len: int | None = None, gateway: Gateway | None = None) -> Starlette:
    """`gateway`: keys, limits and usage (`jaxserve/gateway/`); without one, `api_key` is the one
    key (named "default", no limits), or no key is needed.
    `pooler_config`: how /v1/embeddings pools (vLLM's `--pooler-config`: JSON such as
    '{"pooling_type": "MEAN", "normalize": false}', or a pooling type; default LAST, normalized).
    `max_embed_len`: the longest input it embeds (default max_model_len, at most 8192; its
    private KV cache holds this many tokens plus one engine step's)."""
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/v1/embeddings", create_embedding, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/v1/usage", get_usage, methods=["GET"]),
    ]
    if gateway is None:
        gateway = Gateway(keys=KeyRing.single(api_key) if api_key else None)
    middleware = []
    if allowed_origins:
        wildcard = "*" in allowed_origins
        # any request header: browser clients send their own (the openai package: x-stainless-*)
        middleware.append(Middleware(CORSMiddleware, allow_origins=allowed_origins,
                                     allow_credentials=not wildcard, allow_methods=["GET", "POST"],
                                     allow_headers=["*"]))
    middleware.append(Middleware(GuardMiddleware, gateway=gateway, max_body_bytes=max_body_bytes,
                                 state=state, routes=routes))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.server = state
    app.state.gateway = gateway
    app.state.embeddings = EmbeddingService(PoolerConfig.parse(pooler_config), max_embed_len)
    return app
