"""Server lifecycle: 503 while loading, a dead engine, and SIGTERM drain of a real `jaxserve` process."""

import asyncio
import json
import signal
import threading
import time

import httpx
import uvicorn
from starlette.testclient import TestClient

from jaxserve.server.app import build_app
from jaxserve.server.launch import JaxServer
from jaxserve.server.metrics import Metrics
from jaxserve.server.serving import ServerState
from tests.server_fixtures import LiveServer, serve_tiny_process, tiny_chat_model



def test_health_is_503_until_the_engine_is_ready():
    state = ServerState(model_names=["m"], metrics=Metrics("m"))
    client = TestClient(build_app(state))
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert r.headers["Retry-After"]
    assert client.get("/metrics").status_code == 200


def test_dead_engine_makes_health_503_and_the_server_exit_nonzero(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer), api_key=None) as live:
        def boom():
            raise RuntimeError("device lost")

        live.engine.core.step = boom
        r = httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 503 and "error" in r.json()
        assert httpx.get(live.url + "/health").status_code == 503
        srv = JaxServer(uvicorn.Config(live.app), live.state, shutdown_timeout=1)
        asyncio.run(asyncio.wait_for(srv.watchdog(), 5))
        assert srv.exit_code == 1 and srv.should_exit


def test_sigterm_drains_inflight_streams_and_exits_0(smollm, tmp_path):
    proc, url = serve_tiny_process(
        smollm.tokenizer, str(tmp_path), "--served-model-name", "tiny", "--max-num-seqs", "8",
        "--max-num-batched-tokens", "64", "--num-kv-blocks", "128", "--shutdown-timeout", "60")
    try:

        results, started = [], threading.Barrier(5)

        def stream(i):
            body = {"model": "tiny", "prompt": f"story {i}", "max_tokens": 200, "stream": True,
                    "ignore_eos": True, "temperature": 0.5, "seed": i}
            finish, n = None, 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        n += 1
                        if n == 1:
                            started.wait(timeout=60)
                        c = json.loads(line[6:])
                        if c.get("choices") and c["choices"][0]["finish_reason"]:
                            finish = c["choices"][0]["finish_reason"]
            results.append((finish, n))

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has its first chunk
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 2},
                                 timeout=10).status_code
        except httpx.HTTPError:
            refused = "connection refused"
        assert refused in (503, "connection refused")
        for t in threads:
            t.join(timeout=120)
        assert [f for f, _ in results] == ["length"] * 4, results  # in-flight streams finished
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_error_inside_a_stream_is_an_sse_error_then_done(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer), api_key=None) as live:
        real_step, calls = live.engine.core.step, []

        def flaky():
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("device lost")
            return real_step()

        live.engine.core.step = flaky
        lines = []
        with httpx.stream("POST", live.url + "/v1/completions", timeout=30,
                          json={"prompt": "x", "max_tokens": 50, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        err = json.loads(lines[-2][6:])["error"]
        assert err["code"] == 503 and "engine" in err["message"]


def test_request_templates_are_sandboxed(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer), api_key=None,
                    trust_request_chat_template=True) as live:
        ok = httpx.post(live.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
        assert ok.status_code == 200
        evil = httpx.post(live.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "chat_template": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
        assert evil.status_code == 400 and evil.json()["error"]["param"] == "chat_template"
        assert "unsafe" in evil.json()["error"]["message"]  # refused by the sandbox
        assert httpx.get(live.url + "/health").status_code == 200
