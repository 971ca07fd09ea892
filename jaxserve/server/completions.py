"""POST /v1/completions (OpenAI legacy completions), streaming and not."""

from __future__ import annotations

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


def _logprobs_block(tokenizer, out: CompletionOutput, start: int, k: int, offset0: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset0
    for tok, entry in zip(out.token_ids[start:], (out.logprobs or [])[start:]):
        text = entry[tok].decoded_token if tok in entry else tokenizer.decode([tok])
        tokens.append(text)
        token_lps.append(entry[tok].logprob if tok in entry else None)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 10**9)[:max(k, 0)]
        tops.append({lp.decoded_token: lp.logprob for _, lp in ranked})
        offsets.append(pos)
        pos += len(text or "")
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


async def create_completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    gate = request.app.state.gateway
    rid = request_id("cmpl")
    admitted, body = 0, None
    try:
        engine = state.ready_engine()
        body = await read_json(request)
        model = state.check_model(body)
        gate.check_model(key_of(request.scope), model)   # first: 404 says nothing more
        prompts = protocol.completion_prompts(body)
        protocol.refuse_unsupported(body)
        k = protocol.get(body, "logprobs", (int,), None)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise APIError(400, f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {k}", param="logprobs")
        echo = protocol.get(body, "echo", (bool,), False)
        if echo and k is not None:
            raise APIError(400, "'echo' together with 'logprobs' is not supported (prompt logprobs "
                                "are not computed)", param="echo")
        stream = protocol.get(body, "stream", (bool,), False)
        opts = protocol.parse_stream_options(body)
        params = protocol.sampling_params(body, default_max_tokens=16, logprobs=k,
                                          defaults=state.default_sampling)
        params.validate(engine.core.lm.config.vocab_size)
        engine = state.admit(len(prompts) * params.n)
        admitted = len(prompts) * params.n
        prepared = await prepare_prompts(engine, prompts, params)
        ticket = gate.admit(request.scope, model=model, body=body, endpoint="completions",
                            request_id=rid, prompt_tokens=sum(len(ids) for _, ids in prepared),
                            prompt_text=prompts if gate.log_content else None)
    except Exception as e:
        state.release(admitted)
        err = error_reply(e, rid)
        gate.reject(request.scope, endpoint="completions", request_id=rid, status=err.status,
                    body=body)
        return err.response()

    tok = engine.tokenizer
    created = int(time.time())
    n = params.n

    def prompt_text(tr) -> str:
        return tr.prompt_text if tr.prompt_text is not None else tok.decode(tr.prompt_ids)

    if not stream:
        try:
            finals = await run_to_completion(request, state, engine, prepared, params, rid)
        except Exception as e:
            err = error_reply(e, rid)
            ticket.finish(err.status)
            return err.response()
        choices, completion_tokens = [], 0
        for p in range(len(prepared)):
            tr, out = finals[p]
            for o in out.outputs:
                completion_tokens += len(o.token_ids)
                pre = prompt_text(tr) if echo else ""
                choices.append({
                    "index": p * n + o.index, "text": pre + o.text,
                    "logprobs": _logprobs_block(tok, o, 0, k, 0) if k is not None else None,
                    "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
        prompt_tokens = sum(len(ids) for _, ids in prepared)
        for p in range(len(prepared)):
            ticket.engine_output(finals[p][1])
        ticket.add_completion(completion_tokens)
        ticket.finish(200, [c["finish_reason"] for c in choices],
                      [c["text"] for c in choices] if gate.log_content else None)
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    async def events() -> AsyncIterator[str]:
        sent_text: dict[tuple[int, int], int] = {}
        sent_tok: dict[tuple[int, int], int] = {}
        completion_tokens, status = 0, 200
        reasons: dict[int, str | None] = {i: None for i in range(len(prepared) * n)}
        texts: dict[int, str] = {}
        within_budget = True

        def frame(choices: list[dict], **extra) -> str:
            return sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                        "choices": choices, **extra})

        try:
            async with contextlib.aclosing(run_merged(
                    state, engine, prepared, params, rid,
                    ended_by_server=lambda: not within_budget)) as outs:
                async for tr, out in outs:
                    for o in out.outputs:
                        key = (tr.prompt_index, o.index)
                        first = key not in sent_text
                        t0, n0 = sent_text.get(key, 0), sent_tok.get(key, 0)
                        delta = (prompt_text(tr) if first and echo else "") + o.text[t0:]
                        new_tokens = len(o.token_ids) - n0
                        completion_tokens += new_tokens
                        within_budget = ticket.add_completion(new_tokens) and within_budget
                        sent_text[key], sent_tok[key] = len(o.text), len(o.token_ids)
                        index = tr.prompt_index * n + o.index
                        texts[index] = o.text
                        # NOTE: a spent budget ends the sample as max_tokens would
                        reason = reasons[index] = o.finish_reason or (None if within_budget
                                                                      else "length")
                        if (not delta and reason is None and (k is None or new_tokens == 0)
                                and (tok is not None or new_tokens == 0)):
                            continue  # e.g. half of a multi-byte character: wait for the rest
                        choice = {"index": index, "text": delta,
                                  "logprobs": _logprobs_block(tok, o, n0, k, t0) if k is not None else None,
                                  "finish_reason": reason,
                                  "stop_reason": o.stop_reason if o.finish_reason else None}
                        if tok is None:   # no text to stream: each chunk carries its new token ids
                            choice["token_ids"] = list(o.token_ids[n0:])
                        yield frame([choice])
                    if out.finished:
                        ticket.engine_output(out)
                    if not within_budget:   # the key's budget ran out: every sample ends here
                        for i in end_unfinished(reasons):
                            yield frame([{"index": i, "text": "", "logprobs": None,
                                          "finish_reason": "length", "stop_reason": None}])
                        break
            if opts.include_usage or not within_budget:
                prompt_tokens = sum(len(ids) for _, ids in prepared)
                yield frame([], usage=usage(prompt_tokens, completion_tokens))
        except Exception as e:  # an error after the stream started: SSE error event, then [DONE]
            err = error_reply(e, rid)
            status = err.status
            yield sse(err.body())
        finally:
            state.release(admitted)
            ended = status != 200 or all(reasons.values())   # else the client went away
            ticket.finish(status if ended else 499, list(reasons.values()),
                          [texts.get(i, "") for i in range(len(reasons))] if gate.log_content
                          else None)
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
