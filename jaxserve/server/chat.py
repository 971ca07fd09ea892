"""POST /v1/chat/completions, streaming and not.

The conversation is rendered with the model's chat template (or the operator's `--chat-template`)
in transformers' sandboxed Jinja environment, off the event loop. A template sent in the request
is refused unless the operator passed `--trust-request-chat-template`; then it renders in a
worker process under a time and output-size budget (`jaxserve/server/templates.py`), so a
template that never ends or floods memory costs its request a 400 and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from jaxserve.engine.outputs import CompletionOutput
from jaxserve.gateway.gate import key_of
from jaxserve.sampling.params import MAX_LOGPROBS
from jaxserve.server import protocol
from jaxserve.server.errors import APIError
from jaxserve.server.serving import (ServerState, end_unfinished, error_reply, prepare_prompts,
                                     read_json, request_id, run_merged, run_to_completion, sse,
                                     usage)
from jaxserve.server.templates import TemplateRenderError
from jaxserve.tokenizer import encode_chat


def _entry(token: str | None, logprob: float) -> dict:
    token = token or ""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _chat_logprobs(out: CompletionOutput, start: int, k: int) -> dict:
    content = []
    for tok, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:]):
        chosen = entry.get(tok)
        ranked = sorted(entry.values(), key=lambda lp: lp.rank or 10**9)[:k]
        content.append({**_entry(chosen.decoded_token if chosen else None,
                                 chosen.logprob if chosen else float("nan")),
                        "top_logprobs": [_entry(lp.decoded_token, lp.logprob) for lp in ranked]})
    return {"content": content}


def render_chat(tokenizer, messages: list[dict], template: str | None, add_generation_prompt: bool,
                ) -> list[int]:
    try:
        return encode_chat(tokenizer, messages, chat_template=template,
                           add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 TemplateError, SecurityError, missing template
        raise _template_error(e) from None


def _template_error(e: Exception) -> APIError:
    first = str(e).splitlines()[0][:200] if str(e) else "it raised an error"
    return APIError(400, f"could not apply the chat template: {first}", param="messages")


async def render(state: ServerState, tokenizer, messages: list[dict], template: str | None,
                 add_generation_prompt: bool, *, from_request: bool) -> list[int]:
    """The conversation's prompt token ids. A request's own template renders in the sandbox's
    worker processes; the model's or the operator's in a thread."""
    if not from_request:
        return await asyncio.to_thread(render_chat, tokenizer, messages, template,
                                       add_generation_prompt)
    try:   # the tokenizer's special tokens are the template's variables, as in transformers
        text = await state.template_sandbox.render(
            template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=dict(getattr(tokenizer, "special_tokens_map", {}) or {}))
    except TemplateRenderError as e:
        raise APIError(400, f"could not apply the chat template: {e}", param="chat_template") from None
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)


async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    gate = request.app.state.gateway
    rid = request_id("chatcmpl")
    admitted, body = 0, None
    try:
        engine = state.ready_engine()
        body = await read_json(request)
        model = state.check_model(body)
        gate.check_model(key_of(request.scope), model)   # first: 404 says nothing more
        messages = protocol.chat_messages(body)
        protocol.refuse_unsupported(body)
        want_lp = protocol.get(body, "logprobs", (bool,), False)
        top = protocol.get(body, "top_logprobs", (int,), None)
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise APIError(400, f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}",
                           param="top_logprobs")
        if top and not want_lp:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        k = (top or 0) if want_lp else None
        template = protocol.get(body, "chat_template", (str,), None)
        if template is not None and not state.trust_request_chat_template:
            raise APIError(400, "request-supplied chat templates are not allowed on this server",
                           param="chat_template")
        template = template or state.chat_template
        add_gen = protocol.get(body, "add_generation_prompt", (bool,), True)
        stream = protocol.get(body, "stream", (bool,), False)
        opts = protocol.parse_stream_options(body)
        params = protocol.sampling_params(body, default_max_tokens=None, logprobs=k,
                                          defaults=state.default_sampling)
        params.validate(engine.core.lm.config.vocab_size)
        server_max = state.default_sampling.get("max_tokens") if params.max_tokens is None else None
        if engine.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; use /v1/completions with token ids")
        engine = state.admit(params.n)
        admitted = params.n
        ids = await render(state, engine.tokenizer, messages, template, add_gen,
                           from_request=body.get("chat_template") is not None)
        if server_max is not None:   # the server's default, within the room the prompt leaves
            params.max_tokens = max(1, min(server_max, engine.core.max_model_len - len(ids)))
        prepared = await prepare_prompts(engine, [ids], params)
        ticket = gate.admit(request.scope, model=model, body=body, endpoint="chat", request_id=rid,
                            prompt_tokens=len(ids), prompt_text=messages if gate.log_content else None)
    except Exception as e:
        state.release(admitted)
        err = error_reply(e, rid)
        gate.reject(request.scope, endpoint="chat", request_id=rid, status=err.status, body=body)
        return err.response()

    created = int(time.time())
    prompt_tokens = len(prepared[0][1])

    if not stream:
        try:
            _, final = (await run_to_completion(request, state, engine, prepared, params, rid))[0]
        except Exception as e:
            err = error_reply(e, rid)
            ticket.finish(err.status)
            return err.response()
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": _chat_logprobs(o, 0, k) if k is not None else None,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                   for o in final.outputs]
        completion_tokens = sum(len(o.token_ids) for o in final.outputs)
        ticket.engine_output(final)
        ticket.add_completion(completion_tokens)
        ticket.finish(200, [o.finish_reason for o in final.outputs],
                      [o.text for o in final.outputs] if gate.log_content else None)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    def chunk(choices: list[dict], **extra) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra})

    async def events() -> AsyncIterator[str]:
        sent_text: dict[int, int] = {}
        sent_tok: dict[int, int] = {}
        completion_tokens, status = 0, 200
        reasons: dict[int, str | None] = {i: None for i in range(params.n)}
        texts: dict[int, str] = {}
        within_budget = True
        try:
            for i in range(params.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
            async with contextlib.aclosing(run_merged(
                    state, engine, prepared, params, rid,
                    ended_by_server=lambda: not within_budget)) as outs:
                async for _, out in outs:
                    for o in out.outputs:
                        t0, n0 = sent_text.get(o.index, 0), sent_tok.get(o.index, 0)
                        delta = o.text[t0:]
                        new_tokens = len(o.token_ids) - n0
                        completion_tokens += new_tokens
                        within_budget = ticket.add_completion(new_tokens) and within_budget
                        sent_text[o.index], sent_tok[o.index] = len(o.text), len(o.token_ids)
                        texts[o.index] = o.text
                        # NOTE: a spent budget ends the sample as max_tokens would
                        reason = o.finish_reason or (None if within_budget else "length")
                        reasons[o.index] = reason
                        if not delta and reason is None and (k is None or new_tokens == 0):
                            continue
                        yield chunk([{"index": o.index, "delta": {"content": delta} if delta else {},
                                      "logprobs": _chat_logprobs(o, n0, k) if k is not None else None,
                                      "finish_reason": reason,
                                      "stop_reason": o.stop_reason if o.finish_reason else None}])
                    if out.finished:
                        ticket.engine_output(out)
                    if not within_budget:   # the key's budget ran out: every sample ends here
                        for i in end_unfinished(reasons):
                            yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                          "finish_reason": "length", "stop_reason": None}])
                        break
            if opts.include_usage or not within_budget:
                yield chunk([], usage=usage(prompt_tokens, completion_tokens))
        except Exception as e:
            err = error_reply(e, rid)
            status = err.status
            yield sse(err.body())
        finally:
            state.release(admitted)
            ended = status != 200 or all(reasons.values())   # else the client went away
            ticket.finish(status if ended else 499, list(reasons.values()),
                          [texts.get(i, "") for i in range(params.n)] if gate.log_content else None)
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
