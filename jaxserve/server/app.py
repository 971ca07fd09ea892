"""The Starlette application: thin routes over the serving logic, plus the guard middleware.

Middleware order (outermost first): CORS (when configured) -> Guard: request-body limit (413),
API-key check on every path but /health and /metrics (constant-time compare, decided on the raw
path), refusal while shutting down (503). Every error leaves as an OpenAI error envelope.
"""

from __future__ import annotations

import asyncio
import hmac

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from jaxserve.server.chat import create_chat_completion
from jaxserve.server.completions import create_completion
from jaxserve.server.errors import APIError, error_response
from jaxserve.server.serving import ServerState, error_reply, read_json, request_id

OPEN_PATHS = {"/health", "/metrics"}


class GuardMiddleware:
    """Raw ASGI so that oversized bodies are cut off while streaming in, before buffering."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, state: ServerState):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("raw_path", b"").split(b"?", 1)[0].decode("latin-1") or scope["path"]
        if path not in OPEN_PATHS:
            if self.api_key is not None:
                supplied = b""
                for k, v in scope.get("headers", []):
                    if k == b"authorization":
                        supplied = v[7:] if v[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(supplied, self.api_key):
                    return await error_response(401, "invalid or missing API key",
                                                headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
            if self.state.shutting_down:
                return await error_response(503, "the server is shutting down",
                                            headers={"Retry-After": "5"})(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_body
                except ValueError:
                    too_big = True
                if too_big:
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
            await e.response()(scope, receive, send)


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
    return PlainTextResponse(state.metrics.render(stats), media_type="text/plain; version=0.0.4")


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    max_len = state.engine.core.max_model_len if state.engine is not None else None
    data = [{"id": name, "object": "model", "created": state.created, "owned_by": "jaxserve",
             "root": name, "max_model_len": max_len} for name in state.model_names]
    return JSONResponse({"object": "list", "data": data})


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


async def _http_error(request: Request, exc: HTTPException) -> Response:
    msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, msg)


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_reply(exc, request_id("http")).response()


def build_app(state: ServerState, *, api_key: str | None = None, max_body_bytes: int = 32 << 20,
              allowed_origins: list[str] | None = None) -> Starlette:
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/completions", create_completion, methods=["POST"]),
        Route("/v1/chat/completions", create_chat_completion, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ]
    middleware = []
    if allowed_origins:
        wildcard = "*" in allowed_origins
        middleware.append(Middleware(CORSMiddleware, allow_origins=allowed_origins,
                                     allow_credentials=not wildcard, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                                 state=state))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.server = state
    return app
