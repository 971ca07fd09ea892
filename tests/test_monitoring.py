"""The Grafana dashboard parses, takes its datasource as an import input, and queries only
metric names that a server's /metrics exposes."""

import json
import pathlib
import re

from jaxserve.server.metrics import Metrics

DASHBOARD = pathlib.Path(__file__).parent.parent / "configs/grafana/jaxserve-dashboard.json"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
FAKE_STATS = {"num_requests_running": 3, "num_requests_waiting": 1, "kv_cache_usage_perc": 0.25,
              "prefix_cache_queries": 100, "prefix_cache_hits": 40, "num_preemptions": 0,
              "prompt_tokens_total": 1000, "generation_tokens_total": 500,
              "compiles_after_warmup": 0}


def exposed_names() -> set[str]:
    m = Metrics("m")
    m.finished("stop")
    m.request_error(400)
    m.ttft.observe(0.1)
    names = set()
    for line in m.render(FAKE_STATS).splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0])
    return names


def dashboard_queries(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"]]
    return exprs


def test_dashboard_queries_only_exposed_metrics():
    dash = json.loads(DASHBOARD.read_text())
    used = {n for e in dashboard_queries(dash) for n in re.findall(r"jaxserve:[A-Za-z0-9_]+", e)}
    exposed = exposed_names()
    assert used, "no jaxserve: metric in the dashboard"
    assert not used - exposed, f"queried but not exposed: {sorted(used - exposed)}"
    # every panel kind the issue asks for is there
    for name in ("request_success_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "kv_cache_usage_perc",
                 "num_requests_running", "num_requests_waiting", "num_preemptions_total",
                 "request_errors_total"):
        assert "jaxserve:" + name in used, name


def test_dashboard_datasource_is_an_import_input():
    dash = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"] == DS, p["title"]
            assert all(t["datasource"] == DS for t in p["targets"]), p["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
