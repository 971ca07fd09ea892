"""The routes around the endpoints: model retrieval, /version, OPTIONS and CORS preflights, 405s.

In-process (Starlette's test client over the ASGI app), with no engine: these never reach it.
"""

import importlib.metadata

import pytest
from starlette.testclient import TestClient

from jaxserve.server.app import build_app
from jaxserve.server.metrics import Metrics
from jaxserve.server.serving import ServerState

KEY = "k-123"
HDR = {"Authorization": f"Bearer {KEY}"}
NAME = "org/some-model"       # a served name with a slash, as HF ids have


def _client(**kw) -> TestClient:
    state = ServerState(model_names=[NAME], metrics=Metrics(NAME), model_aliases=("gpt-4o",))
    return TestClient(build_app(state, api_key=KEY, **kw))


@pytest.fixture(scope="module")
def client():
    return _client()


def test_retrieve_model(client):
    listed = client.get("/v1/models", headers=HDR).json()["data"][0]
    r = client.get(f"/v1/models/{NAME}", headers=HDR)
    assert r.status_code == 200 and r.json() == listed
    assert r.json()["object"] == "model" and r.json()["id"] == NAME
    assert client.get("/v1/models/org%2Fsome-model", headers=HDR).json()["id"] == NAME
    alias = client.get("/v1/models/gpt-4o", headers=HDR).json()
    assert alias["id"] == "gpt-4o" and alias["root"] == NAME
    assert client.get(f"/v1/models/{NAME}").status_code == 401


def test_retrieve_unknown_model_is_404_model_not_found(client):
    r = client.get("/v1/models/nope", headers=HDR)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["type"] == "not_found_error"
    assert err["param"] == "model" and "`nope`" in err["message"]
    long = "x" * 5000
    msg = client.get(f"/v1/models/{long}", headers=HDR).json()["error"]["message"]
    assert "x" * 200 + "..." in msg and "x" * 201 not in msg


def test_version_is_open_and_from_package_metadata(client):
    r = client.get("/version")
    assert r.status_code == 200 and r.json() == {"version": importlib.metadata.version("jaxserve")}


def test_bare_options_answers_allow_without_a_key(client):
    for path, methods in (("/v1/chat/completions", "OPTIONS, POST"),
                          ("/v1/embeddings", "OPTIONS, POST"),
                          ("/v1/models", "GET, HEAD, OPTIONS"),
                          (f"/v1/models/{NAME}", "GET, HEAD, OPTIONS")):
        r = client.options(path)
        assert r.status_code == 204 and r.headers["allow"] == methods, (path, r.status_code)
        assert r.content == b""
    r = client.options("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_405_names_the_allowed_methods(client):
    r = client.get("/v1/chat/completions", headers=HDR)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == 405


def test_preflight_without_configured_origins_grants_nothing(client):
    # answered (no 401/405), but without CORS headers the browser refuses the cross-origin call
    r = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 204 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("origins", [["https://app.example"], ["*"]])
def test_cors_preflight_with_configured_origins(origins):
    c = _client(allowed_origins=origins)
    # as the openai package sends it from a browser: its own x-stainless-* headers included
    r = c.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] in ("https://app.example", "*")
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
    # the actual request carries the key and gets the CORS header too
    g = c.get("/v1/models", headers={**HDR, "Origin": "https://app.example"})
    assert g.status_code == 200 and "access-control-allow-origin" in g.headers
    assert c.get("/v1/models", headers={"Origin": "https://app.example"}).status_code == 401
    if origins != ["*"]:
        bad = c.options("/v1/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in bad.headers
