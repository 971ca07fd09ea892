"""Hostile input against a real server (uvicorn on loopback, API key on, the real SmolLM2 tokenizer
over a tiny random model). Every case asserts its status and error envelope, that /health answers
within a second while the case runs, that a normal request succeeds after it, and that a client
mistake leaves one log line and no traceback. Add a case here for every bug found.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.server_fixtures import (API_KEY, MAX_MODEL_LEN, LiveServer, serve_tiny_process,
                                   tiny_chat_model)

HDR = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = ("{% for a in range(99999) %}{% for b in range(99999) %}{% for c in range(99999) %}"
                "{% endfor %}{% endfor %}{% endfor %}")


@pytest.fixture(scope="module")
def live(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer), trust_request_chat_template=True,
                    max_request_sequences=64, http={"header_timeout": 1.0, "body_timeout": 2.0}
                    ) as srv:
        yield srv


def _idle(live) -> bool:
    s = live.engine.get_stats()
    return (s["kv_blocks_free"] == s["kv_blocks_total"] and live.engine.num_open_streams == 0
            and live.state.inflight == 0)


def _wait_idle(live, timeout=30.0) -> bool:
    end = time.time() + timeout
    while time.time() < end and not _idle(live):
        time.sleep(0.05)
    return _idle(live)


class HealthProbe:
    """Polls /health every 0.1 s on its own thread; `worst` is the slowest answer seen."""

    def __init__(self, url: str):
        self.url, self.worst, self.failures = url, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    code = c.get(self.url + "/health").status_code
                except httpx.HTTPError as e:
                    code = repr(e)
                self.worst = max(self.worst, time.perf_counter() - t0)
                if code != 200:
                    self.failures.append(code)
                time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def assert_normal_request_works(live):
    ok = httpx.post(live.url + COMP, json={"prompt": "ok", "max_tokens": 2}, headers=HDR, timeout=60)
    assert ok.status_code == 200, ok.text
    assert _wait_idle(live)


def check(live, caplog, path, data, status, param=None, *, timeout=60):
    """Send one hostile request (a dict, or raw bytes/str) and assert everything the suite promises."""
    body = data if isinstance(data, (bytes, str)) else json.dumps(data)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxserve"), HealthProbe(live.url) as probe:
        r = httpx.post(live.url + path, content=body, headers=HDR, timeout=timeout)
    assert r.status_code == status, r.text[:500]
    if status != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param is not None:
            assert err["param"] == param, err
        msg = err["message"]
        assert "Error" not in msg and "Traceback" not in msg and "/" not in msg, msg
    assert probe.worst < 1.0 and not probe.failures, (probe.worst, probe.failures)
    if status < 500:   # a client mistake: at most a warning line, never a traceback
        assert not [rec for rec in caplog.records if rec.exc_info], caplog.text
    assert not live.engine.is_dead
    assert_normal_request_works(live)
    return r


def deep(n: int) -> str:
    return '{"messages": ' + "[" * n + "]" * n + "}"


CASES = [
    # (id, path, body, status, param)
    ("top_k-2^31-chat", CHAT, {"messages": MSG, "max_tokens": 4, "temperature": 1, "top_k": 2**31},
     400, "top_k"),
    ("top_k-2^31-completions", COMP, {"prompt": "hi", "max_tokens": 4, "temperature": 1,
                                      "top_k": 2**31}, 400, "top_k"),
    ("top_k-2^31-1-ok", COMP, {"prompt": "hi", "max_tokens": 4, "temperature": 1,
                               "top_k": 2**31 - 1}, 200, None),
    ("min_tokens-2^63-chat", CHAT, {"messages": MSG, "min_tokens": 2**63}, 400, "min_tokens"),
    ("min_tokens-beyond-context", CHAT, {"messages": MSG, "min_tokens": 10 * MAX_MODEL_LEN},
     400, "min_tokens"),
    ("max_tokens-2^63", COMP, {"prompt": "hi", "max_tokens": 2**63}, 400, "max_tokens"),
    ("temperature-1e308", CHAT, {"messages": MSG, "max_tokens": 2, "temperature": 1e308},
     400, "temperature"),
    ("temperature-1e-300", CHAT, {"messages": MSG, "max_tokens": 2, "temperature": 1e-300}, 200, None),
    ("top_p-1e308", CHAT, {"messages": MSG, "max_tokens": 2, "top_p": 1e308}, 400, "top_p"),
    ("top_p-1e-300", CHAT, {"messages": MSG, "max_tokens": 2, "top_p": 1e-300}, 200, None),
    ("min_p-1e308", CHAT, {"messages": MSG, "max_tokens": 2, "min_p": 1e308}, 400, "min_p"),
    ("min_p-1e-300", CHAT, {"messages": MSG, "max_tokens": 2, "min_p": 1e-300}, 200, None),
    ("repetition-1e308", CHAT, {"messages": MSG, "max_tokens": 2, "repetition_penalty": 1e308},
     400, "repetition_penalty"),
    ("repetition-1e-300", CHAT, {"messages": MSG, "max_tokens": 2, "repetition_penalty": 1e-300},
     400, "repetition_penalty"),
    ("seed-2^64", COMP, {"prompt": "hi", "max_tokens": 2, "seed": 2**64}, 400, "seed"),
    ("seed-negative-ok", COMP, {"prompt": "hi", "max_tokens": 2, "seed": -1}, 200, None),
    ("n-2^63", CHAT, {"messages": MSG, "n": 2**63, "temperature": 1}, 400, "n"),
    ("logprobs-2^63", COMP, {"prompt": "hi", "logprobs": 2**63}, 400, "logprobs"),
    ("top_logprobs-2^63", CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 2**63},
     400, "top_logprobs"),
    ("logit_bias-huge-key", CHAT, {"messages": MSG, "logit_bias": {"9" * 5000: 1}}, 400, "logit_bias"),
    ("logit_bias-2^40-key", CHAT, {"messages": MSG, "logit_bias": {str(2**40): 1}}, 400, "logit_bias"),
    ("logit_bias-1e308", CHAT, {"messages": MSG, "logit_bias": {"5": 1e308}}, 400, "logit_bias"),
    ("stop-long-string", CHAT, {"messages": MSG, "stop": ["x" * 5000]}, 400, "stop"),
    ("stop_token_ids-2^40", CHAT, {"messages": MSG, "stop_token_ids": [2**40]}, 400, "stop_token_ids"),
    ("prompt-token-2^63", COMP, {"prompt": [2**63]}, 400, "prompt_token_ids"),
    ("prompts-x-n-over-cap", COMP, {"prompt": ["Once upon a time"] * 256, "n": 128, "max_tokens": 16,
                                    "temperature": 1}, 400, "n"),
    ("prompts-over-cap", COMP, {"prompt": ["x"] * 100000, "max_tokens": 1}, 400, "n"),
    ("json-nested-100000", CHAT, deep(100000), 400, None),
    ("json-nested-100", CHAT, deep(100), 400, None),
    ("surrogate-completions-prompt", COMP, '{"prompt": "\\ud800", "max_tokens": 2}', 400, "prompt"),
    ("surrogate-chat-content", CHAT, '{"messages": [{"role": "user", "content": "a\\udfff"}]}',
     400, "messages"),
    ("surrogate-model", CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}',
     400, "model"),
    ("surrogate-key", CHAT, '{"\\ud800": 1, "messages": [{"role": "user", "content": "x"}]}', 400, None),
    ("surrogate-tokenize", "/tokenize", '{"prompt": "\\ud800"}', 400, "prompt"),
    ("model-100k-chars", CHAT, {"model": "m" * 100000, "messages": MSG}, 404, "model"),
    ("template-nested-loops", CHAT, {"messages": MSG, "max_tokens": 2, "chat_template": NESTED_LOOPS},
     400, "chat_template"),
    ("template-200MB", CHAT, {"messages": MSG, "max_tokens": 2,
                              "chat_template": "{% for i in range(99999) %}{{ 'x' * 2000 }}{% endfor %}"},
     400, "chat_template"),
    ("template-10GB-string", CHAT, {"messages": MSG, "max_tokens": 2,
                                    "chat_template": "{{ 'a' * 10000000000 }}"}, 400, "chat_template"),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_request(live, caplog, path, body, status, param):
    r = check(live, caplog, path, body, status, param)
    if status == 404:
        assert len(r.json()["error"]["message"]) < 400   # a 100k-character name is not echoed


def test_six_hanging_templates_at_once_leave_the_server_serving(live, caplog):
    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"messages": MSG, "max_tokens": 2, "chat_template": NESTED_LOOPS}
            hang = [c.post(live.url + CHAT, json=body, headers=HDR) for _ in range(6)]
            normal = [c.post(live.url + CHAT, json={"messages": MSG, "max_tokens": 2}, headers=HDR)
                      for _ in range(4)]
            return await asyncio.gather(*hang, *normal)

    t0 = time.perf_counter()
    with HealthProbe(live.url) as probe:
        codes = [r.status_code for r in asyncio.run(main())]
    assert codes == [400] * 6 + [200] * 4, codes
    assert time.perf_counter() - t0 < 20 and probe.worst < 1.0
    assert_normal_request_works(live)


def test_queue_counts_sequences_not_requests(smollm):
    # max_num_seqs 8 + 0 queued: a request of n=6 in flight leaves room for 2 sequences
    with LiveServer(tiny_chat_model(smollm.tokenizer), api_key=None, max_queued_requests=0) as srv:
        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                long = asyncio.create_task(c.post(srv.url + COMP, json={
                    "prompt": "x", "n": 6, "temperature": 1, "max_tokens": 200, "ignore_eos": True}))
                while srv.state.inflight < 6:
                    await asyncio.sleep(0.01)
                too_many = await c.post(srv.url + COMP, json={"prompt": ["a", "b"], "n": 2,
                                                              "temperature": 1, "max_tokens": 2})
                fits = await c.post(srv.url + COMP, json={"prompt": ["a", "b"], "max_tokens": 2})
                return too_many, fits, await long

        too_many, fits, long = asyncio.run(main())
        assert too_many.status_code == 429 and too_many.headers["Retry-After"] == "1"
        assert too_many.json()["error"]["code"] == "rate_limit_exceeded"
        assert fits.status_code == 200 and long.status_code == 200
        assert _wait_idle(srv)


def test_slow_bodies_hold_no_queue_slot_and_are_cut(smollm):
    # no queue beyond max_num_seqs: if a trickling body held an admission, normal requests would 429
    with LiveServer(tiny_chat_model(smollm.tokenizer), api_key=None, max_queued_requests=0,
                    http={"header_timeout": 1.0, "body_timeout": 1.5}) as srv:
        socks = []
        for _ in range(100):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: 5000\r\n\r\n{\"messages\": ")
            socks.append(s)
        for _ in range(20):   # each trickles on; normal clients are served meanwhile
            for s in socks:
                try:
                    s.send(b" ")
                except OSError:
                    pass
            r = httpx.post(srv.url + CHAT, json={"messages": MSG, "max_tokens": 2}, timeout=30)
            assert r.status_code == 200, r.text
        time.sleep(2.0)
        closed = 0
        for s in socks:
            s.settimeout(1.0)
            try:
                data = s.recv(4096)
                closed += data == b"" or data.startswith(b"HTTP/1.1 408")
            except OSError:
                closed += 1
            s.close()
        assert closed == len(socks)
        assert _wait_idle(srv)


def test_random_json_in_every_field_never_5xx(live):
    """Property test: any JSON value in any request field gets a non-5xx answer, and the engine
    lives on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    extremes = st.sampled_from([2**31, 2**63, -2**63 - 1, 10**30, 1e308, -1e308, 1e-300, -1, 0, ""])
    leaf = (st.none() | st.booleans() | st.integers() | extremes
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
    value = st.recursive(leaf, lambda kids: st.lists(kids, max_size=4)
                         | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
    fields = ["model", "messages", "prompt", "n", "temperature", "top_p", "top_k", "min_p",
              "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop",
              "stop_token_ids", "max_tokens", "max_completion_tokens", "min_tokens", "logprobs",
              "top_logprobs", "logit_bias", "stream", "stream_options", "ignore_eos", "echo",
              "skip_special_tokens", "include_stop_str_in_output", "response_format", "tools",
              "tool_choice", "add_generation_prompt", "user", "chat_template", "suffix"]
    seen: dict[int, int] = {}

    @settings(max_examples=int(os.environ.get("JAXSERVE_HYPOTHESIS_EXAMPLES", "80")), deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(path=st.sampled_from([CHAT, COMP]),
           changes=st.dictionaries(st.sampled_from(fields), value, min_size=1, max_size=3))
    def one(path, changes):
        body = ({"messages": MSG} if path == CHAT else {"prompt": "hi"}) | {"max_tokens": 4}
        body.update(changes)
        try:
            data = json.dumps(body)
        except (ValueError, TypeError):
            return
        r = httpx.post(live.url + path, content=data, headers=HDR, timeout=120)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (body, r.text[:300])
        assert not live.engine.is_dead

    one()
    assert set(seen) & {200} and set(seen) & {400}, seen   # both kinds of answer were exercised
    assert_normal_request_works(live)


def test_sigterm_ends_the_process_while_templates_hang(smollm, tmp_path):
    proc, url = serve_tiny_process(
        smollm.tokenizer, str(tmp_path), "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
        "--num-kv-blocks", "64", "--shutdown-timeout", "2", "--trust-request-chat-template",
        "--chat-template-timeout", "600")
    model_dir = str(tmp_path / "tiny")
    try:
        # the served name of a local path is its last component; the path itself is not shown
        metrics = httpx.get(url + "/metrics").text
        assert model_dir not in metrics and 'model_name="tiny"' in metrics
        body = {"model": "tiny", "messages": MSG, "max_tokens": 2, "chat_template": NESTED_LOOPS}
        threads = [threading.Thread(target=lambda: _swallow(url + CHAT, body)) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(2.0)   # every worker is stuck rendering
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - t0
        assert took < 2 + 12, took
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _swallow(url, body):
    try:
        httpx.post(url, json=body, timeout=60)
    except httpx.HTTPError:
        pass


def test_hard_exit_timer_fires_when_the_drain_is_stuck(monkeypatch):
    import uvicorn

    from jaxserve.server import launch
    from jaxserve.server.metrics import Metrics
    from jaxserve.server.serving import ServerState

    exits = []
    monkeypatch.setattr(launch.os, "_exit", exits.append)
    srv = launch.JaxServer(uvicorn.Config(None), ServerState(["m"], Metrics("m")), shutdown_timeout=0)
    srv.hard_exit_grace = 0.2
    srv.handle_exit(signal.SIGTERM, None)
    time.sleep(0.6)
    assert exits == [0] and srv.should_exit
