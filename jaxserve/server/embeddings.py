"""POST /v1/embeddings: the served model's pooled final hidden states, in OpenAI's shape.

    {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": [...] | "<b64>"}],
     "model": ..., "usage": {"prompt_tokens": N, "total_tokens": N}}

Inputs are tokenized off the event loop and validated before any device work (empty input, ids
outside the vocabulary, an input longer than max_model_len, too many tokens in all: 400s). The
`Embedder` (jaxserve/engine/embed.py) is built on the first request over the engine's own weights
and runs one request at a time in a worker thread, beside the generation engine's step thread. A
request waiting its turn is dropped if its client disconnects; one already on the device finishes
(its calls cannot be interrupted) and the next waits for it. "base64" is the vector's
little-endian float32 bytes, as OpenAI sends them (and the `openai` client asks for by default).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from jaxserve.engine.embed import Embedder, PoolerConfig, check_token_inputs, input_limit
from jaxserve.engine.outputs import InvalidRequestError
from jaxserve.gateway.gate import key_of
from jaxserve.server import protocol
from jaxserve.server.errors import APIError
from jaxserve.server.serving import ServerState, error_reply, read_json, request_id, until_disconnected


class EmbeddingService:
    """The server's embedder: built lazily for the running engine, one call at a time."""

    def __init__(self, pooler: PoolerConfig | None = None, max_input_len: int | None = None):
        self.pooler = pooler or PoolerConfig()
        self.max_input_len = max_input_len   # None: max_model_len, at most DEFAULT_MAX_INPUT_LEN
        self.embedder: Embedder | None = None
        self._core = None
        self._lock = asyncio.Lock()
        self.pending = 0                     # admitted requests, running or waiting
        self._retired_lowerings = 0

    @property
    def lowerings(self) -> int:
        """Compiles (lowerings) made by the embedders this service built."""
        return self._retired_lowerings + (self.embedder.lowerings if self.embedder else 0)

    def input_limit(self, core) -> tuple[int, str]:
        """(the longest input embedded, its name in error messages)."""
        return input_limit(core.max_model_len, self.max_input_len)

    def admit(self, limit: int) -> None:
        """One request runs at a time; beyond `limit` waiting ones a request is refused (429)."""
        if self.pending > limit:
            raise APIError(429, f"the server is busy ({self.pending} embedding requests in flight); "
                                "retry later", headers={"Retry-After": "1"},
                           code="rate_limit_exceeded")
        self.pending += 1

    def release(self) -> None:
        self.pending = max(0, self.pending - 1)

    async def run(self, core, inputs: list[list[int]], normalize: bool) -> list[np.ndarray]:
        async with self._lock:
            task = asyncio.ensure_future(asyncio.to_thread(self._run, core, inputs, normalize))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                # the device work cannot be stopped: keep the turn until it ends
                await asyncio.wait({task})
                raise

    def _run(self, core, inputs: list[list[int]], normalize: bool) -> list[np.ndarray]:
        if self.embedder is None or self._core is not core:
            self._retired_lowerings = self.lowerings
            try:
                self.embedder = Embedder.for_engine(core, max_input_len=self.input_limit(core)[0])
            except RuntimeError as e:
                raise InvalidRequestError("model", str(e)) from None
            self._core = core
        return self.embedder.embed(inputs, pooling_type=self.pooler.pooling_type,
                                   normalize=normalize)


def _tokenize(tokenizer, texts: list[str | list[int]], add_special_tokens: bool) -> list[list[int]]:
    return [x if isinstance(x, list) else tokenizer.encode(x, add_special_tokens=add_special_tokens)
            for x in texts]


def _render(rid: str, model: str, vectors: list[np.ndarray], encoding: str, tokens: int) -> bytes:
    def encode(v: np.ndarray):
        if encoding == "base64":
            return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")
        return v.tolist()

    data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
    return json.dumps({"id": rid, "object": "list", "created": int(time.time()), "model": model,
                       "data": data, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def create_embedding(request: Request) -> Response:
    state: ServerState = request.app.state.server
    service: EmbeddingService = request.app.state.embeddings
    rid = request_id("embd")
    admitted = False
    try:
        engine = state.ready_engine()
        body = await read_json(request)
        model = state.check_model(body)
        request.app.state.gateway.check_model(key_of(request.scope), model)   # the key's models
        req = protocol.embedding_request(body)
        core = engine.core
        dim = core.lm.config.hidden_size
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"'dimensions': this model's embeddings have {dim} dimensions and "
                                f"cannot be shortened (it is not a matryoshka model); send {dim} "
                                "or leave it out", param="dimensions")
        texts = [x for x in req.inputs if isinstance(x, str)]
        if texts and engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send token ids", param="input")
        ids = (await asyncio.to_thread(_tokenize, engine.tokenizer, req.inputs,
                                       req.add_special_tokens) if texts else list(req.inputs))
        limit, limit_name = service.input_limit(core)
        if req.truncate_prompt_tokens is not None:
            keep = limit if req.truncate_prompt_tokens == -1 else req.truncate_prompt_tokens
            if keep > limit:
                raise APIError(400, f"'truncate_prompt_tokens' ({keep}) exceeds the {limit} "
                                    f"tokens this server embeds ({limit_name})",
                               param="truncate_prompt_tokens")
            ids = [x[-keep:] for x in ids]
        check_token_inputs(ids, core.lm.config.vocab_size, limit, "input", limit_name)
        total = sum(len(x) for x in ids)
        if total > protocol.MAX_EMBEDDING_TOKENS:
            raise APIError(400, f"the inputs have {total} tokens in all; this server embeds at most "
                                f"{protocol.MAX_EMBEDDING_TOKENS} per request", param="input")
        service.admit(state.max_queued_requests)
        admitted = True
        normalize = service.pooler.normalize if req.normalize is None else req.normalize
        vectors = await until_disconnected(request, service.run(core, ids, normalize))
        content = await asyncio.to_thread(_render, rid, model, vectors, req.encoding_format, total)
    except Exception as e:
        return error_reply(e, rid).response()
    finally:
        if admitted:
            service.release()
    return Response(content, media_type="application/json")
