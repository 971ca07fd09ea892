"""Request parsing for the OpenAI endpoints, by hand and strict about types.

Unknown fields are ignored (clients send vendor extras), but a known field of the wrong type or out
of bounds is a 400 naming the field (never 422). Sampling bounds are checked by
`SamplingParams.validate`, whose error names the field too. Fields asking for what this server does
not do (structured output, tool calls, vLLM's guided decoding) are a 400 naming the field, not
silently ignored: an answer that ignored them would look valid and be wrong. (Tools sent with
`tool_choice` "none" ask for no tool call, so they pass and are ignored.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxserve.sampling.params import SamplingParams
from jaxserve.server.errors import APIError

_NUM = (int, float)


def _bad(field: str, msg: str) -> APIError:
    return APIError(400, f"'{field}': {msg}", param=field)


def get(body: dict, field: str, kinds: tuple, default: Any = None, *, what: str | None = None) -> Any:
    if field not in body or body[field] is None:
        return default
    v = body[field]
    if isinstance(v, bool) and bool not in kinds:
        raise _bad(field, f"must be {what or _describe(kinds)}, got a boolean")
    if not isinstance(v, kinds):
        raise _bad(field, f"must be {what or _describe(kinds)}, got {_describe((type(v),))}")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(field, f"must be a finite number, got {v}")
    return v


def _describe(kinds: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
             list: "an array", dict: "an object"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _int_list(v: Any, field: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise _bad(field, "must be an array of integers")
    return v


@dataclasses.dataclass
class StreamOptions:
    include_usage: bool = False


def parse_stream_options(body: dict) -> StreamOptions:
    so = get(body, "stream_options", (dict,), {})
    return StreamOptions(include_usage=bool(get(so, "include_usage", (bool,), False)))


def sampling_params(body: dict, *, default_max_tokens: int | None, logprobs: int | None,
                    defaults: dict | None = None) -> SamplingParams:
    """The request's sampling fields; a field it leaves out (or sends as null) takes the server's
    default (`defaults`: --generation-config's temperature, top_p, top_k, min_p,
    repetition_penalty), else vLLM's."""
    d = defaults or {}
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise _bad("stop", "must be a string or an array of strings")
    if isinstance(stop, list) and len(stop) > 64:
        raise _bad("stop", "at most 64 stop strings")
    bias = get(body, "logit_bias", (dict,), None)
    if bias is not None:
        parsed = {}
        for k, v in bias.items():
            try:
                tok = int(k)
            except (TypeError, ValueError):
                raise _bad("logit_bias", f"key {k!r} is not a token id") from None
            if isinstance(v, bool) or not isinstance(v, _NUM):
                raise _bad("logit_bias", f"bias for token {k} must be a number")
            parsed[tok] = float(v)
        bias = parsed
    max_tokens = get(body, "max_completion_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = get(body, "max_tokens", (int,), default_max_tokens)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        stop_ids = _int_list(stop_ids, "stop_token_ids")
    top_k = get(body, "top_k", (int,), d.get("top_k", 0))
    return SamplingParams(
        n=get(body, "n", (int,), 1),
        temperature=float(get(body, "temperature", _NUM, d.get("temperature", 1.0))),
        top_p=float(get(body, "top_p", _NUM, d.get("top_p", 1.0))),
        top_k=-1 if top_k == -1 else top_k,
        min_p=float(get(body, "min_p", _NUM, d.get("min_p", 0.0))),
        presence_penalty=float(get(body, "presence_penalty", _NUM, 0.0)),
        frequency_penalty=float(get(body, "frequency_penalty", _NUM, 0.0)),
        repetition_penalty=float(get(body, "repetition_penalty", _NUM,
                                     d.get("repetition_penalty", 1.0))),
        seed=get(body, "seed", (int,), None),
        stop=stop,
        stop_token_ids=stop_ids,
        include_stop_str_in_output=get(body, "include_stop_str_in_output", (bool,), False),
        ignore_eos=get(body, "ignore_eos", (bool,), False),
        max_tokens=max_tokens,
        min_tokens=get(body, "min_tokens", (int,), 0),
        logprobs=logprobs,
        logit_bias=bias,
        skip_special_tokens=get(body, "skip_special_tokens", (bool,), True),
    )


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


NO_TOOL_CALLS = ("tool calling is not supported by this server yet; tools are accepted only with "
                 "tool_choice 'none', which ignores them")


def refuse_unsupported(body: dict) -> None:
    """400 for requests that need structured output or tool calling. Their neutral values pass:
    `response_format` of type "text", tools with `tool_choice` "none" (frameworks send their
    tools along routinely; they are ignored, never rendered into the prompt), an empty `tools`
    list, `tool_choice` "auto" without tools. The legacy `functions` / `function_call` pair
    follows the same rules."""
    fmt = get(body, "response_format", (dict,), None)
    if fmt is not None and fmt.get("type", "text") != "text":
        raise _bad("response_format", f"type {fmt.get('type')!r} is not supported: this server "
                                      "does not constrain output to JSON or a schema (only 'text')")
    _refuse_tool_calls(body, "tools", "tool_choice")
    _refuse_tool_calls(body, "functions", "function_call")
    for field in _GUIDED:
        if body.get(field) is not None:
            raise _bad(field, "guided decoding is not supported by this server")


def _refuse_tool_calls(body: dict, tools_field: str, choice_field: str) -> None:
    tools = get(body, tools_field, (list,), None)
    if tools and not all(isinstance(t, dict) for t in tools):
        raise _bad(tools_field, "must be an array of objects")
    choice = get(body, choice_field, (str, dict), None)
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise _bad(choice_field, f"must be 'none', 'auto', 'required' or a named tool, got "
                                 f"{choice[:50]!r}")
    if choice == "none":
        return
    if tools:   # an absent choice means "auto" when tools are present (OpenAI)
        raise _bad(choice_field if choice is not None else tools_field, NO_TOOL_CALLS)
    if choice is not None and choice != "auto":   # "required" or a named tool, with no tools
        raise _bad(choice_field, NO_TOOL_CALLS)


def completion_prompts(body: dict) -> list[str | list[int]]:
    """`prompt`: a string, an array of strings, an array of token ids, or an array of those."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("prompt", "is required")
    p = body["prompt"]
    if isinstance(p, str):
        return [p]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [p]
        if all(isinstance(x, list) for x in p):
            return [_int_list(x, "prompt") for x in p]
    if isinstance(p, list) and not p:
        raise _bad("prompt", "must not be empty")
    raise _bad("prompt", "must be a string, an array of strings, or token ids")


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty array of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("messages", f"message {i} must be an object with a string 'role'")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise _bad("messages", f"message {i}: only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad("messages", f"message {i}: 'content' must be a string or text parts")
        out.append({**{k: v for k, v in m.items() if k in ("role", "name")}, "content": content})
    return out


MAX_EMBEDDING_INPUTS = 2048          # inputs per request (OpenAI's limit)
MAX_EMBEDDING_TOKENS = 300_000       # tokens summed over a request's inputs (OpenAI's limit)


@dataclasses.dataclass
class EmbeddingRequest:
    inputs: list[str | list[int]]       # texts, or token ids
    encoding_format: str = "float"      # "float" | "base64" (little-endian float32)
    dimensions: int | None = None
    add_special_tokens: bool = True     # vLLM extra: for text inputs
    truncate_prompt_tokens: int | None = None   # vLLM extra: keep the last k tokens (-1: the limit)
    normalize: bool | None = None       # vLLM extra: None = the server's pooler setting


def embedding_request(body: dict) -> EmbeddingRequest:
    """`input`: a string, an array of strings, an array of token ids, or an array of those;
    `user` is accepted and ignored."""
    if "input" not in body or body["input"] is None:
        raise _bad("input", "is required")
    x = body["input"]
    inputs: list[str | list[int]] | None = None
    if isinstance(x, str):
        inputs = [x]
    elif isinstance(x, list) and not x:
        raise _bad("input", "must not be empty")
    elif isinstance(x, list):
        if all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            inputs = [x]
        elif len(x) > MAX_EMBEDDING_INPUTS:
            raise _bad("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(x)}")
        elif all(isinstance(t, str) for t in x):
            inputs = list(x)
        elif all(isinstance(t, list) for t in x):
            inputs = [_int_list(t, "input") for t in x]
    if inputs is None:
        raise _bad("input", "must be a string, an array of strings, an array of token ids, or an "
                            "array of token id arrays")
    fmt = get(body, "encoding_format", (str,), "float")
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format", f"must be 'float' or 'base64', got {fmt[:50]!r}")
    get(body, "user", (str,), None)
    truncate = get(body, "truncate_prompt_tokens", (int,), None)
    if truncate is not None and truncate != -1 and truncate < 1:
        raise _bad("truncate_prompt_tokens", f"must be -1 or at least 1, got {truncate}")
    return EmbeddingRequest(
        inputs=inputs, encoding_format=fmt, dimensions=get(body, "dimensions", (int,), None),
        add_special_tokens=get(body, "add_special_tokens", (bool,), True),
        truncate_prompt_tokens=truncate, normalize=get(body, "normalize", (bool,), None))
