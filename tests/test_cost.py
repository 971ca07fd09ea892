"""`jaxserve cost` on a hand-made bench JSON whose numbers check by hand:

1,000 tok/s serving half the day = 43.2M tokens/day; one GPU at $3.60/h = $86.40/day, so
$2.00 per 1M tokens. 300k input + 100k output tokens: 75% input. An API at $1 in / $9 out costs
0.75 * 1 + 0.25 * 9 = $3.00 per 1M of that mix, so it bills $86.40 at 28.8M tokens/day
(21.6M input + 7.2M output), 2/3 of the capacity.
"""

import json
import math
import sys

import pytest

from jaxserve.cli import main
from jaxserve.cost import CostReport, Workload

BENCH = {"benchmark": "throughput", "model": "tiny", "device": "TEST GPU", "num_prompts": 1000,
         "duration_s": 400.0, "total_input_tokens": 300_000, "total_output_tokens": 100_000,
         "output_throughput": 250.0, "total_token_throughput": 1000.0}


def _report(**kw) -> CostReport:
    args = dict(gpu_hour_usd=3.6, num_gpus=1, utilization=0.5, api_input_usd_per_mtok=1.0,
                api_output_usd_per_mtok=9.0)
    args.update(kw)
    return CostReport(Workload.from_bench(BENCH), **args)


def test_arithmetic():
    r = _report()
    assert r.workload.input_fraction == 0.75
    assert r.daily_cost_usd == pytest.approx(86.4)
    assert r.daily_capacity_tokens == pytest.approx(43.2e6)
    assert r.self_usd_per_mtok == pytest.approx(2.0)
    assert r.api_blended_usd_per_mtok == pytest.approx(3.0)
    assert r.break_even_tokens_per_day == pytest.approx(28.8e6)
    assert r.api_cost_per_day(28.8e6) == pytest.approx(r.self_cost_per_day(28.8e6))
    # past one deployment's capacity a second one is paid for
    assert r.self_cost_per_day(0) == pytest.approx(86.4)
    assert r.self_cost_per_day(43.2e6) == pytest.approx(86.4)
    assert r.self_cost_per_day(43.3e6) == pytest.approx(172.8)


def test_gpus_and_utilization_scale_the_price():
    assert _report(num_gpus=2).self_usd_per_mtok == pytest.approx(4.0)
    assert _report(utilization=1.0).self_usd_per_mtok == pytest.approx(1.0)
    assert _report(num_gpus=2).break_even_tokens_per_day == pytest.approx(57.6e6)
    assert math.isinf(_report(api_input_usd_per_mtok=0.0, api_output_usd_per_mtok=0.0)
                      .break_even_tokens_per_day)


def test_latency_json_is_refused():
    with pytest.raises(ValueError, match="not latency"):
        Workload.from_bench({"benchmark": "latency", "avg_latency_s": 1.0})


def _write(tmp_path, res=BENCH):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(res))
    return str(path)


def test_cli_end_to_end(tmp_path, capsys):
    rc = main(["cost", "--bench-json", _write(tmp_path), "--gpu-hour-usd", "3.6",
               "--utilization", "0.5", "--api-input-usd-per-mtok", "1",
               "--api-output-usd-per-mtok", "9"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "throughput tiny on TEST GPU" in out
    assert "$86.40/day" in out and "43.20M tokens/day" in out
    assert "split: by token counts" in out
    assert "self-hosted       2.0000       2.0000            2.0000" in out
    assert "hosted API        1.0000       9.0000            3.0000" in out
    assert "break-even: 28.80M tokens/day of this mix (21.60M input + 7.20M output) = 66.7%" in out


def test_cli_without_api_prices_and_bad_flags(tmp_path, capsys):
    path = _write(tmp_path)
    assert main(["cost", "--bench-json", path, "--gpu-hour-usd", "3.6"]) == 0
    out = capsys.readouterr().out
    assert "2.0000" in out and "break-even:" not in out and "\nhosted API" not in out
    assert main(["cost", "--bench-json", path, "--gpu-hour-usd", "3.6",
                 "--api-input-usd-per-mtok", "1"]) == 2
    assert "give both" in capsys.readouterr().err
    assert main(["cost", "--bench-json", path, "--gpu-hour-usd", "3.6", "--utilization", "0"]) == 2


def test_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails as if not installed
    rc = main(["cost", "--bench-json", _write(tmp_path), "--gpu-hour-usd", "3.6",
               "--plot", str(tmp_path / "cost.png")])
    assert rc == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "cost.png").exists()


def test_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "cost.png"
    assert main(["cost", "--bench-json", _write(tmp_path), "--gpu-hour-usd", "3.6",
                 "--api-input-usd-per-mtok", "1", "--api-output-usd-per-mtok", "9",
                 "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
