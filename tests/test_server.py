"""The OpenAI-compatible server, driven over loopback by the official `openai` client and httpx."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.server_fixtures import API_KEY, MAX_MODEL_LEN, MODEL, LiveServer, tiny_chat_model

HDR = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def live(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _idle(live):
    s = live.engine.get_stats()
    return (s["kv_blocks_free"] == s["kv_blocks_total"] and live.engine.num_open_streams == 0
            and live.state.inflight == 0)


def _wait_idle(live, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end and not _idle(live):
        time.sleep(0.05)
    return _idle(live)


# -- the openai client ------------------------------------------------------------------------------

def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                       max_tokens=8, temperature=0.0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_neutral_structured_output_and_tool_fields_pass(client):
    """What clients send by default (text format, no tools, tools with tool_choice "none") is
    accepted, and tools under "none" are ignored: not rendered into the prompt, a plain text
    answer. Asking for JSON output, tool calls or guided decoding is a 400 (the bad-input table)."""
    msgs = [{"role": "user", "content": "Hi!"}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, temperature=0.0)
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, temperature=0.0,
        extra_body={"response_format": {"type": "text"}, "tools": [], "tool_choice": "none"})
    assert r.choices[0].finish_reason in ("stop", "length")
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    for kw in ({"tools": [weather], "tool_choice": "none"},
               {"extra_body": {"functions": [weather["function"]], "function_call": "none"}}):
        t = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4,
                                           temperature=0.0, **kw)
        assert t.usage.prompt_tokens == plain.usage.prompt_tokens   # nothing rendered
        assert t.choices[0].message.content == plain.choices[0].message.content
        assert not t.choices[0].message.tool_calls


def test_completion_and_echo(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.usage.completion_tokens == 6
    assert r.choices[0].finish_reason == "length"
    e = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0.0,
                                  echo=True, extra_body={"ignore_eos": True})
    assert e.choices[0].text == "Once upon a time" + r.choices[0].text


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=20,
              temperature=0.8, seed=42)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens

    comp = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=7, stream=True,
                                          temperature=0.0, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True}))
    assert comp[-1].usage.completion_tokens == 7
    whole = client.completions.create(model=MODEL, prompt="abc", max_tokens=7, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in comp if c.choices) == whole.choices[0].text


def test_n_and_seed(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Pick a word"}], max_tokens=10,
              temperature=1.0, seed=7, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    c = client.completions.create(model=MODEL, prompt=["one", "two"], n=2, max_tokens=3,
                                  temperature=1.0, seed=1)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2, 3]


def test_logprobs_shapes(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert item.token == item.top_logprobs[0].token  # greedy picks the top token
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0.0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert "".join(lp.tokens) == c.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # a 3-character window past the start, not blank, whose first occurrence is where it stands
    at = next(i for i in range(3, len(base) - 3)
              if base[i:i + 3].strip() and base.find(base[i:i + 3]) == i)
    stop = base[at:at + 3]
    cut = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0.0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == base[: base.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=0.0,
                                         stop=[stop], stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.text


def test_tokenize_detokenize(live):
    r = httpx.post(live.url + "/tokenize", json={"prompt": "Hello world"}, headers=HDR)
    assert r.status_code == 200 and r.json()["count"] == len(r.json()["tokens"])
    assert r.json()["max_model_len"] == MAX_MODEL_LEN
    d = httpx.post(live.url + "/detokenize", json={"tokens": r.json()["tokens"]}, headers=HDR)
    assert d.json()["prompt"] == "Hello world"
    m = httpx.post(live.url + "/tokenize", json={"messages": [{"role": "user", "content": "x"}]}, headers=HDR)
    assert m.status_code == 200 and m.json()["count"] > 3


def test_health_and_metrics_are_open(live):
    assert httpx.get(live.url + "/health").status_code == 200
    m = httpx.get(live.url + "/metrics")
    assert m.status_code == 200
    for name in ("jaxserve:num_requests_running", "jaxserve:kv_cache_usage_perc",
                 "jaxserve:prefix_cache_queries_total", "jaxserve:generation_tokens_total",
                 "jaxserve:time_to_first_token_seconds_bucket", "jaxserve:compiles_after_warmup_total",
                 "jaxserve:request_success_total"):
        assert name in m.text
    assert 'jaxserve:compiles_after_warmup_total{model_name="tiny-chat"} 0' in m.text


def _metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(f'{name}{{model_name="{MODEL}"}}'))
    return float(line.rsplit(" ", 1)[1])


def test_latency_histograms_count_tokens(live):
    # one TTFT and (tokens - 1) inter-token gaps per request, streamed or not
    names = ("jaxserve:time_to_first_token_seconds_count", "jaxserve:inter_token_latency_seconds_count")
    before = [_metric(httpx.get(live.url + "/metrics").text, n) for n in names]
    for stream in (False, True):
        r = httpx.post(live.url + COMP, headers=HDR, timeout=60, json={
            "model": MODEL, "prompt": "x", "max_tokens": 6, "ignore_eos": True, "stream": stream})
        assert r.status_code == 200
    after = [_metric(httpx.get(live.url + "/metrics").text, n) for n in names]
    assert after[0] - before[0] == 2 and after[1] - before[1] == 2 * 5


# -- bad input ---------------------------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG = [5] * (MAX_MODEL_LEN + 10)

BAD = [
    # (path, body (dict or raw str), headers override, status, param)
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, 400, "temperature"),
    (CHAT, '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', None, 400, "temperature"),
    (CHAT, {"messages": MSG, "temperature": -0.5}, None, 400, "temperature"),
    (CHAT, {"messages": MSG, "top_p": 0}, None, 400, "top_p"),
    (CHAT, {"messages": MSG, "top_p": 1.5}, None, 400, "top_p"),
    (CHAT, {"messages": MSG, "n": 100000}, None, 400, "n"),
    (COMP, {"prompt": ""}, None, 400, "prompt"),
    (COMP, {"prompt": [5, 999999]}, None, 400, "prompt_token_ids"),
    (COMP, {"prompt": [-3, 4]}, None, 400, "prompt_token_ids"),
    (COMP, {"prompt": LONG}, None, 400, "prompt"),
    (COMP, {"prompt": [5] * 100, "max_tokens": 200}, None, 400, "max_tokens"),
    (CHAT, {"messages": MSG, "model": "gpt-5"}, None, 404, "model"),
    (CHAT, {"messages": MSG, "temperature": "hot"}, None, 400, "temperature"),
    (CHAT, {"messages": "hello"}, None, 400, "messages"),
    (COMP, {"prompt": "x", "max_tokens": "10"}, None, 400, "max_tokens"),
    (COMP, {"prompt": {"a": 1}}, None, 400, "prompt"),
    (CHAT, {"messages": MSG, "stop": [""]}, None, 400, "stop"),
    (CHAT, {"messages": MSG, "logit_bias": {"abc": 1}}, None, 400, "logit_bias"),
    (CHAT, {"messages": MSG, "chat_template": "{{ 'x' }}"}, None, 400, "chat_template"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, None, 400, "response_format"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400,
     "tools"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "auto"}, None, 400, "tool_choice"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}}}, None, 400, "tool_choice"),
    (CHAT, {"messages": MSG, "tool_choice": "required"}, None, 400, "tool_choice"),
    (CHAT, {"messages": MSG, "tools": ["f"], "tool_choice": "none"}, None, 400, "tools"),
    (CHAT, {"messages": MSG, "functions": [{"name": "f"}]}, None, 400, "functions"),
    (COMP, {"prompt": "x", "guided_json": {"type": "object"}}, None, 400, "guided_json"),
    (CHAT, "this is not json", None, 400, None),
    (CHAT, {"messages": MSG, "pad": "x" * (2 << 20)}, None, 413, None),
    (CHAT, {"messages": MSG}, {}, 401, None),
    (CHAT, {"messages": MSG}, {"Authorization": "Bearer wrong"}, 401, None),
]


@pytest.mark.parametrize("path,body,headers,status,param", BAD,
                         ids=[f"{i}-{b[3]}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_envelope_and_server_keeps_serving(live, path, body, headers, status, param):
    hdrs = dict(HDR if headers is None else headers)
    hdrs["Content-Type"] = "application/json"
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(live.url + path, content=data, headers=hdrs, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert "0x" not in err["message"] and "/" not in err["message"].replace("N/A", "")
    if status == 400 and param in ("prompt", "max_tokens") and isinstance(body, dict) and len(
            str(body.get("prompt", ""))) > 200:
        assert str(MAX_MODEL_LEN) in err["message"]  # names the numbers
    if isinstance(body, dict) and (body.get("tools") or body.get("functions")) and (
            body.get("tool_choice") != "none"):
        assert "not supported by this server yet" in err["message"]
    ok = httpx.post(live.url + COMP, json={"prompt": "ok", "max_tokens": 2}, headers=HDR, timeout=60)
    assert ok.status_code == 200
    assert _wait_idle(live)


def test_method_and_path_errors(live):
    r = httpx.get(live.url + COMP, headers=HDR)
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    r = httpx.get(live.url + "/v1/nothing", headers=HDR)
    assert r.status_code == 404 and "error" in r.json()


# -- load and disconnects ----------------------------------------------------------------------------

async def _stream_client(url, i, stop_after=None):
    async with httpx.AsyncClient(timeout=300) as c:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Story {i}"}],
                "max_tokens": 24, "temperature": 0.7, "seed": i, "stream": True,
                "ignore_eos": True}
        n, finished = 0, None
        async with c.stream("POST", url + CHAT, json=body, headers=HDR) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                n += 1
                if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                    finished = chunk["choices"][0]["finish_reason"]
                if stop_after is not None and n >= stop_after:
                    return n, None  # leave mid-stream: the connection closes
        return n, finished


def test_64_concurrent_streams_complete(live):
    async def main():
        return await asyncio.gather(*[_stream_client(live.url, i) for i in range(64)])

    results = asyncio.run(main())
    assert all(fin == "length" for _, fin in results)
    assert _wait_idle(live)


def _finished(live) -> dict[str, float]:
    out = {}
    for line in httpx.get(live.url + "/metrics").text.splitlines():
        if line.startswith("jaxserve:request_success_total{"):
            out[line.split('finished_reason="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_100_disconnecting_clients_free_everything(live):
    idle_usage = live.engine.get_stats()["kv_cache_usage_perc"]
    before = _finished(live)

    async def main():
        return await asyncio.gather(*[_stream_client(live.url, i, stop_after=3) for i in range(100)])

    asyncio.run(main())
    assert _wait_idle(live, timeout=30)
    assert live.engine.get_stats()["kv_cache_usage_perc"] == idle_usage
    m = httpx.get(live.url + "/metrics").text
    assert f'jaxserve:kv_cache_usage_perc{{model_name="{MODEL}"}} {idle_usage}' in m
    after = _finished(live)   # every stream is counted once: aborted, or finished before it noticed
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert sum(grew.values()) == 100 and grew.get("abort", 0) >= 50, grew
    t = time.time()
    ok = httpx.post(live.url + COMP, json={"prompt": "still here", "max_tokens": 3}, headers=HDR, timeout=30)
    assert ok.status_code == 200 and time.time() - t < 10


def test_non_streaming_disconnect_aborts(live):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + COMP, json=body, headers=HDR, timeout=0.3)
    assert _wait_idle(live, timeout=30)


def test_queue_full_is_429_with_retry_after(smollm):
    # max_num_seqs 8 + 0 queued: the 9th concurrent request is refused, then service resumes
    with LiveServer(tiny_chat_model(smollm.tokenizer), api_key=None, max_queued_requests=0) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                body = {"prompt": "x", "max_tokens": 150, "ignore_eos": True}
                return await asyncio.gather(*[c.post(srv.url + COMP, json=body) for _ in range(14)])

        codes = [r.status_code for r in asyncio.run(main())]
        assert 429 in codes and 200 in codes, codes
        refused = [r for r in asyncio.run(main()) if r.status_code == 429]
        assert refused and refused[0].headers["Retry-After"] == "1"
        assert refused[0].json()["error"]["type"] == "rate_limit_error"
        assert _wait_idle(srv)
        ok = httpx.post(srv.url + COMP, json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def test_generation_config_defaults_fill_only_what_a_request_leaves_out(live):
    live.state.default_sampling = {"temperature": 0.0, "max_tokens": 3}
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}]}
        a = httpx.post(live.url + CHAT, json=body, headers=HDR, timeout=60).json()
        b = httpx.post(live.url + CHAT, json=body, headers=HDR, timeout=60).json()
        assert a["usage"]["completion_tokens"] <= 3 and a["choices"][0]["message"] == b["choices"][0][
            "message"]   # greedy: the default temperature 0 applied
        long = httpx.post(live.url + CHAT, json={**body, "max_tokens": 7, "ignore_eos": True},
                          headers=HDR, timeout=60).json()
        assert long["usage"]["completion_tokens"] == 7   # the request's own value wins
    finally:
        live.state.default_sampling = {}
