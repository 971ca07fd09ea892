"""The gateway (jaxserve/gateway/): keys file validation, limiter and usage store as units, then a
live server with a keys file, driven by the official openai client."""

import hashlib
import json
import os
import threading
import time

import httpx
import openai
import pytest

from jaxserve import cli
from jaxserve.engine.core import EngineConfig, EngineCore
from jaxserve.gateway.gate import Gateway
from jaxserve.gateway.keys import KeyEntry, KeysFileError, load_keys, parse_keys
from jaxserve.gateway.limits import Limiter, Refusal
from jaxserve.gateway.store import Record, UsageStore
from tests.server_fixtures import MAX_MODEL_LEN, MODEL, LiveServer, tiny_chat_model

# -- the keys file ------------------------------------------------------------------------------

GOOD = """keys:
  - name: a
    key: sk-aaaaaaaa
  - name: b
    key_sha256: {digest}
    requests_per_minute: 5
    budget_period: day
"""


@pytest.mark.parametrize("text, line, words", [
    ("keys:\n  - name: a\n    key: [unclosed\n", 4, "starts on line 3"),
    ("keys:\n  - name: a\n    key: sk-aaaaaaaa\n  - name: a\n    key: sk-bbbbbbbb\n", 4,
     "duplicate name"),
    ("keys:\n  - name: a\n    key: sk-aaaaaaaa\n  - name: b\n    key: sk-aaaaaaaa\n", 5,
     "duplicate key"),
    ("keys:\n  - name: a\n    key: sk-aaaaaaaa\n    rpm: 5\n", 4, "unknown field 'rpm'"),
    ("keys:\n  - name: a\n    key: sk-aaaaaaaa\n    max_concurrent: -1\n", 4, "positive integer"),
    ("keys:\n  - name: a\n    key: sk-aaaaaaaa\n    budget_period: week\n", 4, "budget_period"),
    ("keys:\n  - name: a\n    key_sha256: abc\n", 3, "64 hex digits"),
    ("keys:\n  - name: a\n", 2, "exactly one of 'key'"),
    ("keyz: []\n", 1, "unknown top-level field"),
])
def test_keys_file_errors_name_the_line(text, line, words):
    with pytest.raises(KeysFileError) as e:
        parse_keys(text, "keys.yaml")
    assert f"keys.yaml, line {line}" in str(e.value) and words in str(e.value), str(e.value)


def test_example_keys_file_loads():
    ring = load_keys(os.path.join(os.path.dirname(__file__), "..", "configs",
                                  "api-keys.example.yaml"))
    assert ring.lookup(b"password").name == "team-a"


def test_keys_lookup():
    ring = parse_keys(GOOD.format(digest=hashlib.sha256(b"sk-bbbbbbbb").hexdigest()))
    assert ring.lookup(b"sk-aaaaaaaa").name == "a"
    b = ring.lookup(b"sk-bbbbbbbb")
    assert b.name == "b" and b.requests_per_minute == 5 and b.budget_period == "day"
    assert ring.lookup(b"sk-cccccccc") is None and ring.lookup(b"") is None


# -- the limiter, with a fake clock ---------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self):
        return self.t


def test_limiter_requests_per_minute_window():
    clock = Clock()
    lim = Limiter(window_seconds=60, clock=clock)
    k = KeyEntry("k", requests_per_minute=2)
    lim.admit(k, 1)
    clock.t += 10
    lim.admit(k, 1)
    with pytest.raises(Refusal) as e:
        lim.admit(k, 1)
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after == 50
    clock.t += 50.5   # the first request leaves the window
    lim.admit(k, 1)


def test_limiter_tokens_concurrency_budget():
    clock = Clock()
    spent = {"k": 90}
    lim = Limiter(window_seconds=60, clock=clock, spent_since=lambda name, day: spent[name])
    tpm = KeyEntry("t", tokens_per_minute=100)
    lim.admit(tpm, 60)
    assert lim.add_tokens(tpm, 40)            # the window now holds 100 = the limit
    with pytest.raises(Refusal) as e:
        lim.admit(tpm, 1)
    assert e.value.reason == "tokens_per_minute"
    clock.t += 61
    lim.admit(tpm, 1)

    conc = KeyEntry("c", max_concurrent=2)
    lim.admit(conc, 0)
    lim.admit(conc, 0)
    with pytest.raises(Refusal) as e:
        lim.admit(conc, 0)
    assert e.value.reason == "max_concurrent"
    lim.release(conc)
    lim.admit(conc, 0)
    assert lim.open_requests("c") == 2

    budget = KeyEntry("k", token_budget=100, budget_period="total")   # 90 spent before start
    lim.admit(budget, 5)
    assert not lim.add_tokens(budget, 5)      # 100: spent
    with pytest.raises(Refusal) as e:
        lim.admit(budget, 1)
    assert e.value.code == "insufficient_quota"


def test_limiter_daily_budget_renews():
    clock = Clock()
    lim = Limiter(clock=clock, spent_since=lambda name, day: 0)
    k = KeyEntry("d", token_budget=10, budget_period="day")
    lim.admit(k, 10)
    lim.release(k)
    with pytest.raises(Refusal):
        lim.admit(k, 1)
    clock.t += 86400
    lim.admit(k, 1)


# -- the store ------------------------------------------------------------------------------------

def test_store_folds_records_and_survives_reopen(tmp_path):
    path = str(tmp_path / "u.db")
    store = UsageStore(path, interval=60)
    t = time.time()
    store.record(Record("a", "m", t, 10, 2, 5, user="u1", tag="x"))
    store.record(Record("a", "m", t, 20, 0, 7, error=True))
    store.record(Record("b", "m", t, 1, 0, 1))
    rows = store.rows(key="a")
    assert len(rows) == 1 and rows[0]["requests"] == 2 and rows[0]["prompt_tokens"] == 30
    assert rows[0]["cached_tokens"] == 2 and rows[0]["completion_tokens"] == 12
    assert rows[0]["errors"] == 1
    store.close()
    again = UsageStore(path)
    assert again.spent_since("a", "0000-00-00") == 42
    tags = again.db.execute("SELECT user, tag, requests FROM usage_tags").fetchall()
    assert tags == [("u1", "x", 1)]
    again.close()


def test_usage_command_json(tmp_path, capsys):
    path = str(tmp_path / "u.db")
    store = UsageStore(path)
    store.record(Record("a", "m", time.time(), 3, 0, 4))
    store.close()
    assert cli.main(["usage", "--usage-db", path, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["key"] == "a" and rows[0]["prompt_tokens"] == 3
    assert rows[0]["completion_tokens"] == 4 and rows[0]["requests"] == 1
    assert cli.main(["usage", "--usage-db", path]) == 0
    assert "completion_tokens" in capsys.readouterr().out


def test_bad_keys_file_stops_the_server(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - name: a\n    key: sk-aaaaaaaa\n    tokens_per_minit: 3\n")
    assert cli.main(["serve", "--api-keys-file", str(bad), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "line 4" in err and "tokens_per_minit" in err


# -- a live server --------------------------------------------------------------------------------

KEYS = """keys:
  - name: team
    key: sk-team-0001
  - name: rpm
    key: sk-rpm-00001
    requests_per_minute: 2
  - name: budget
    key: sk-budget-01
    token_budget: 1
  - name: stream
    key: sk-stream-01
    token_budget: 10
  - name: conc
    key: sk-conc-0001
    max_concurrent: 2
  - name: other
    key: sk-other-001
    models: [some-other-model]
  - name: boss
    key: sk-boss-0001
    admin: true
"""
WINDOW = 2.0


@pytest.fixture(scope="module")
def core(smollm):
    return EngineCore(tiny_chat_model(smollm.tokenizer), EngineConfig(
        max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=64, block_size=16,
        num_kv_blocks=256, compilation_cache_dir=None, show_progress=False))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gw")
    (d / "keys.yaml").write_text(KEYS)
    return d


def _gateway(files) -> Gateway:
    store = UsageStore(str(files / "usage.db"), request_log=str(files / "requests.jsonl"))
    return Gateway(keys=load_keys(str(files / "keys.yaml")), keys_path=str(files / "keys.yaml"),
                   store=store, limiter=Limiter(window_seconds=WINDOW,
                                                spent_since=store.spent_since))


@pytest.fixture(scope="module")
def live(core, files):
    with LiveServer(None, core=core, gateway=_gateway(files)) as srv:
        yield srv


def client(live, key):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=120)


MSGS = [{"role": "user", "content": "Hi there!"}]


def test_rpm_limit_then_window_passes(live):
    c = client(live, "sk-rpm-00001")
    for _ in range(2):
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded"
    retry = int(e.value.response.headers["Retry-After"])
    assert 1 <= retry <= WINDOW
    time.sleep(WINDOW + 0.1)
    c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    metrics = httpx.get(live.url + "/metrics").text
    assert 'jaxserve:key_rejections_total{key="rpm",reason="requests_per_minute"} 1' in metrics


def test_model_not_allowed_is_not_found(live):
    c = client(live, "sk-other-001")
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert e.value.code == "model_not_found" and MODEL in e.value.message
    with pytest.raises(openai.NotFoundError) as unknown:   # the answer for a model not served
        c.chat.completions.create(model="no-such-model", messages=MSGS, max_tokens=2)
    assert unknown.value.body == {**e.value.body, "message": unknown.value.body["message"]}
    for call in (lambda: c.completions.create(model=MODEL, prompt="Hi", max_tokens=2),
                 lambda: c.embeddings.create(model=MODEL, input="Hi"),
                 lambda: c.models.retrieve(MODEL)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert c.models.list().data == []      # other models are not shown either


def test_concurrency_never_exceeds_limit(live):
    c = client(live, "sk-conc-0001")
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(live.gateway.limiter.open_requests("conc"))
            s = live.engine.get_stats()
            seen.append(s["num_requests_running"] + s["num_requests_waiting"])
            time.sleep(0.002)

    results = []

    def one():
        try:
            c.completions.create(model=MODEL, prompt="Once", max_tokens=24,
                                 extra_body={"ignore_eos": True})
            results.append("ok")
        except openai.RateLimitError as e:
            results.append(e.code)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert max(seen) <= 2 and results.count("ok") >= 1
    assert set(results) <= {"ok", "rate_limit_exceeded"}
    assert live.gateway.limiter.open_requests("conc") == 0


def _disconnects(live) -> float:
    return live.state.metrics.render(None).count('status="499"') and sum(
        float(line.rsplit(" ", 1)[1]) for line in live.state.metrics.render(None).splitlines()
        if line.startswith("jaxserve:request_errors_total{") and 'status="499"' in line)


def test_stream_ends_with_length_when_budget_runs_out(live):
    c = client(live, "sk-stream-01")
    before = _disconnects(live)
    chunks = list(c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=60, stream=True,
                                       extra_body={"ignore_eos": True}))
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and finals.count("length") == 1
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3 and 7 <= chunks[-1].usage.completion_tokens < 60
    assert _disconnects(live) == before   # cut by the server, not a client gone (no 499)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2)
    assert e.value.code == "insufficient_quota"


def test_usage_matches_responses_and_request_log(live, files):
    c = client(live, "sk-team-0001")
    before = len(_log_lines(live, files))
    usages = []
    r = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=5, user="alice",
                                  metadata={"tag": "nightly"})
    usages.append(r.usage)
    r = c.completions.create(model=MODEL, prompt=["Once upon", "a time"], max_tokens=4, n=2)
    usages.append(r.usage)
    s = c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=6, stream=True,
                                  stream_options={"include_usage": True})
    usages.append([ch for ch in s][-1].usage)
    rows = httpx.get(live.url + "/v1/usage", headers={"Authorization": "Bearer sk-team-0001"}
                     ).json()["data"]
    assert {r["key"] for r in rows} == {"team"}
    (row,) = rows
    assert row["requests"] == 3 and row["errors"] == 0
    assert row["prompt_tokens"] == sum(u.prompt_tokens for u in usages)
    assert row["completion_tokens"] == sum(u.completion_tokens for u in usages)
    tags = live.gateway.store.db.execute(
        "SELECT user, tag, requests FROM usage_tags WHERE key = 'team'").fetchall()
    assert tags == [("alice", "nightly", 1)]
    lines = _log_lines(live, files)[before:]
    assert len(lines) == 3
    assert [x["key"] for x in lines] == ["team"] * 3
    assert lines[0]["user"] == "alice" and lines[0]["tag"] == "nightly"
    assert lines[0]["status"] == 200 and lines[0]["ttft"] is not None
    assert "Hi there" not in "".join(json.dumps(x) for x in lines)   # no prompt text
    assert "prompt" not in lines[0] and "completion" not in lines[0]
    everyone = httpx.get(live.url + "/v1/usage", headers={"Authorization": "Bearer sk-boss-0001"}
                         ).json()["data"]
    assert {"team", "rpm"} <= {r["key"] for r in everyone}
    metrics = httpx.get(live.url + "/metrics").text
    assert 'jaxserve:key_requests_total{key="team"} 3' in metrics
    assert (f'jaxserve:key_tokens_total{{key="team",kind="completion"}} '
            f'{row["completion_tokens"]}') in metrics


def _log_lines(live, files):
    live.gateway.store.flush()
    path = files / "requests.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_reload_picks_up_a_new_key(live, files):
    hdr = {"Authorization": "Bearer sk-newkey-001"}
    assert httpx.get(live.url + "/v1/models", headers=hdr).status_code == 401
    keys = files / "keys.yaml"
    keys.write_text("keys: [oops\n")
    assert not live.gateway.reload()                       # a bad file keeps the old keys
    assert httpx.get(live.url + "/v1/models",
                     headers={"Authorization": "Bearer sk-team-0001"}).status_code == 200
    keys.write_text(KEYS + "  - name: new\n    key: sk-newkey-001\n")
    assert live.gateway.reload()
    assert httpx.get(live.url + "/v1/models", headers=hdr).status_code == 200
    keys.write_text(KEYS)
    live.gateway.reload()


def test_budget_survives_restart(live, core, files):
    c = client(live, "sk-budget-01")
    c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)   # 0 spent: admitted
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert e.value.code == "insufficient_quota" and "Retry-After" in e.value.response.headers
    live.__exit__(None, None, None)   # the module's server stops (flushing its usage) ...
    with LiveServer(None, core=core, gateway=_gateway(files)) as again:   # ... a new one starts
        with pytest.raises(openai.RateLimitError) as e:
            client(again, "sk-budget-01").chat.completions.create(model=MODEL, messages=MSGS,
                                                                  max_tokens=2)
        assert e.value.code == "insufficient_quota"
        client(again, "sk-team-0001").chat.completions.create(model=MODEL, messages=MSGS,
                                                               max_tokens=2)
