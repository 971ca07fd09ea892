"""`jaxserve:request_errors_total{status, reason}` on a live server: each refusal is counted once,
under its status and its fixed reason, and a stream whose client disconnects counts as a 499."""

import time

import httpx
import pytest

from jaxserve.server.metrics import Metrics, error_reason
from tests.server_fixtures import API_KEY, MODEL, LiveServer, tiny_chat_model

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def live(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer)) as srv:
        yield srv


def errors(url: str) -> dict[tuple[str, str], float]:
    """(status, reason) -> count, from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("jaxserve:request_errors_total{"):
            labels, value = line[len("jaxserve:request_errors_total{"):].rsplit("} ", 1)
            kv = dict(part.split("=", 1) for part in labels.split(","))
            assert kv["model_name"] == f'"{MODEL}"'
            out[(kv["status"].strip('"'), kv["reason"].strip('"'))] = float(value)
    return out


def test_refusals_are_counted_by_status_and_reason(live):
    before = errors(live.url)
    url = live.url + "/v1/completions"
    assert httpx.post(url, headers=AUTH, json={"model": MODEL, "prompt": "hi",
                                               "max_tokens": -1}).status_code == 400
    assert httpx.post(url, json={"model": MODEL, "prompt": "hi"}).status_code == 401
    assert httpx.post(url, headers=AUTH, json={"model": "no-such-model",
                                               "prompt": "hi"}).status_code == 404
    assert httpx.get(live.url + "/no/such/path", headers=AUTH).status_code == 404
    assert httpx.post(url, headers=AUTH, content=b"x" * (2 << 20)).status_code == 413
    after = errors(live.url)
    expected = {("400", "invalid_request"): 1, ("401", "auth"): 1, ("404", "not_found"): 2,
                ("413", "too_large"): 1}
    for key, n in expected.items():
        assert after.get(key, 0) - before.get(key, 0) == n, (key, after)
    assert set(after) - set(before) <= set(expected)   # nothing counted twice or elsewhere


def test_a_stream_cut_by_its_client_counts_as_499(live):
    before = errors(live.url).get(("499", "client_disconnected"), 0)
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 200, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", headers=AUTH, json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())   # the stream has started; leave now
    deadline = time.time() + 20
    while errors(live.url).get(("499", "client_disconnected"), 0) != before + 1:
        assert time.time() < deadline, errors(live.url)
        time.sleep(0.1)
    time.sleep(0.5)
    assert errors(live.url).get(("499", "client_disconnected"), 0) == before + 1   # once


def test_reasons_are_a_fixed_small_set():
    reasons = {error_reason(s) for s in range(400, 600)}
    assert reasons <= {"invalid_request", "auth", "not_found", "too_large", "rate_limited",
                       "timeout", "unavailable", "server_error", "client_disconnected"}
    m = Metrics("m")
    m.request_error(429)
    m.request_error(429)
    m.request_error(500)
    text = m.render(None)
    assert 'jaxserve:request_errors_total{model_name="m",status="429",reason="rate_limited"} 2' in text
    assert 'jaxserve:request_errors_total{model_name="m",status="500",reason="server_error"} 1' in text
