"""`jaxserve bench`: metric definitions, workloads, and each benchmark run end to end on CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from jaxserve.bench.datasets import random_requests, sharegpt_requests
from jaxserve.bench.metrics import RequestRecord, format_report, summarize
from jaxserve.cli import build_parser
from tests.engine_fixtures import tiny_loaded
from tests.server_fixtures import API_KEY, LiveServer, tiny_chat_model


def test_metrics_follow_vllm_definitions():
    recs = [RequestRecord(prompt_len=10, output_len=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
            RequestRecord(prompt_len=20, output_len=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
            RequestRecord(prompt_len=7, success=False, error="HTTP 500")]
    res = summarize(recs, duration=2.0)
    assert res["completed"] == 2 and res["failed"] == 1
    assert res["total_input_tokens"] == 30 and res["total_output_tokens"] == 8
    assert res["request_throughput"] == 1.0 and res["output_throughput"] == 4.0
    assert res["total_token_throughput"] == 19.0
    assert math.isclose(res["mean_ttft_ms"], 200.0) and math.isclose(res["median_ttft_ms"], 200.0)
    # TPOT = (latency - ttft) / (output - 1): 100 ms and 200 ms
    assert math.isclose(res["mean_tpot_ms"], 150.0)
    assert math.isclose(res["mean_itl_ms"], 1e3 * (0.4 + 0.4) / 6)
    assert math.isclose(res["p99_e2el_ms"], np.percentile([500.0, 700.0], 99))
    assert res["errors"] == ["HTTP 500"]
    text = format_report("Serving Benchmark Result", res)
    assert "Median TTFT (ms):" in text and "Request throughput (req/s):" in text


def test_random_requests_lengths_and_special_ids():
    reqs = random_requests(50, 40, 10, vocab_size=20, range_ratio=0.25, seed=3, special_ids=(0, 1))
    assert len(reqs) == 50
    assert all(30 <= r.prompt_len <= 50 and 7 <= r.output_len <= 12 for r in reqs)
    assert len({r.prompt_len for r in reqs}) > 1
    ids = np.concatenate([r.prompt_ids for r in reqs])
    assert ids.min() >= 2 and ids.max() < 20
    assert [r.prompt_ids for r in random_requests(3, 5, 5, 20, seed=1)] == \
           [r.prompt_ids for r in random_requests(3, 5, 5, 20, seed=1)]
    with pytest.raises(ValueError):
        random_requests(1, 5, 5, 20, range_ratio=1.5)


class _WordTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()]


def test_sharegpt_requests_apply_vllm_filters(tmp_path):
    conv = lambda p, r: {"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
    data = [conv("a b c d e", "x y z w v u"),        # kept: 5 in, 6 out
            conv("too short", "x y z w"),            # prompt < 4 tokens
            conv("a b c d", "x y"),                  # reply < 4 tokens
            {"conversations": [{"from": "human", "value": "alone"}]},
            conv(" ".join(["w"] * 1100), "x y z w")]  # prompt > 1024 tokens
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sharegpt_requests(str(path), 10, _WordTokenizer())
    assert [(r.prompt_len, r.output_len, r.prompt_text) for r in reqs] == [(5, 6, "a b c d e")]
    assert sharegpt_requests(str(path), 10, _WordTokenizer(), output_len=9)[0].output_len == 9
    with pytest.raises(ValueError, match="tokenizer"):
        sharegpt_requests(str(path), 10, None)


def _args(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_bench_throughput_and_latency_offline(tmp_path, capsys):
    from jaxserve.bench.offline import run_latency, run_throughput
    common = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64",
              "--num-kv-blocks", "32"]
    args = _args("throughput", *common, "--num-prompts", "6", "--input-len", "12",
                 "--output-len", "5", "--output-json", str(tmp_path / "t.json"))
    args.model = tiny_loaded()
    args.compilation_cache_dir = None
    res = run_throughput(args)
    assert res["completed"] == 6 and res["total_output_tokens"] == 30
    assert res["total_input_tokens"] == 72 and res["compiles_after_warmup"] == 0
    assert json.loads((tmp_path / "t.json").read_text())["output_throughput"] > 0
    assert "Offline Throughput Benchmark Result" in capsys.readouterr().out



def test_bench_latency_times_uncached_prefill(capsys):
    """Prefix caching is on (the default) and each prompt spans two full pages, so a batch seen
    before would be served from the cache: the timed iterations must find none of theirs there,
    unless asked to repeat the batch."""
    from jaxserve.bench.offline import run_latency
    common = ["--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--max-model-len", "64",
              "--num-kv-blocks", "32", "--batch-size", "3", "--input-len", "40", "--output-len", "4",
              "--num-iters-warmup", "1", "--num-iters", "3"]
    results = {}
    for repeat in (False, True):
        args = _args("latency", *common)
        args.model = tiny_loaded()
        args.compilation_cache_dir = None
        args.repeat_prompts = repeat
        results[repeat] = run_latency(args)
    fresh, repeated = results[False], results[True]
    assert len(fresh["latencies_s"]) == 3 and fresh["percentiles_s"]["50"] > 0
    assert fresh["prefix_caching"] and not fresh["repeat_prompts"]
    assert fresh["prefix_cache_queries"] == 3 * 3 * 40 and fresh["prefix_cache_hits"] == 0
    assert repeated["prefix_cache_hits"] > 0       # the stat does see reuse
    out = capsys.readouterr().out
    assert "prompts: fresh each iteration; prefix cache: on, 0 of 360" in out
    assert "the same batch every iteration (--repeat-prompts)" in out


@pytest.fixture(scope="module")
def live(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer)) as srv:
        yield srv


@pytest.mark.parametrize("rate", ["inf", "40"])
def test_bench_serve_against_a_live_server(live, rate, tmp_path):
    from jaxserve.bench.serve import run_serve
    args = _args("serve", "--base-url", live.url, "--api-key", API_KEY, "--num-prompts", "6",
                 "--input-len", "12", "--output-len", "5", "--request-rate", rate,
                 "--max-concurrency", "4", "--vocab-size", "200", "--disable-tqdm",
                 "--output-json", str(tmp_path / "s.json"))
    res = run_serve(args)
    assert res["completed"] == 6 and res["failed"] == 0, res.get("errors")
    assert res["total_output_tokens"] == 30 and res["total_input_tokens"] == 72
    assert res["median_ttft_ms"] > 0 and res["mean_itl_ms"] > 0 and res["mean_tpot_ms"] > 0
    assert res["median_e2el_ms"] >= res["median_ttft_ms"]
    assert json.loads((tmp_path / "s.json").read_text())["completed"] == 6


def test_bench_serve_against_a_model_without_tokenizer(tmp_path):
    # dummy-weight serving (no tokenizer): every streamed chunk carries its token ids, so TTFT and
    # ITL are still measured per token
    import httpx
    from jaxserve.bench.serve import run_serve
    with LiveServer(tiny_loaded(), api_key=None) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                "prompt": [3, 4, 5], "max_tokens": 5, "ignore_eos": True, "stream": True}) as r:
            chunks = [json.loads(line[5:]) for line in r.iter_lines()
                      if line.startswith("data:") and line[5:].strip() != "[DONE]"]
        ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        assert len(ids) == 5 and all(0 <= t < 128 for t in ids)
        assert all(len(c["choices"][0]["token_ids"]) >= 1 for c in chunks)
        args = _args("serve", "--base-url", srv.url, "--num-prompts", "3", "--input-len", "6",
                     "--output-len", "4", "--vocab-size", "100", "--disable-tqdm")
        res = run_serve(args)
    assert res["completed"] == 3 and res["failed"] == 0, res.get("errors")
    assert res["total_output_tokens"] == 12 and res["mean_itl_ms"] > 0


def test_bench_serve_records_failures(live):
    from jaxserve.bench.serve import run_serve
    args = _args("serve", "--base-url", live.url, "--api-key", "wrong-key", "--served-model-name",
                 "tiny-chat", "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                 "--vocab-size", "200", "--disable-tqdm")
    res = run_serve(args)
    assert res["completed"] == 0 and res["failed"] == 2 and "401" in res["errors"][0]


def test_bench_cli_help_lists_the_three_benchmarks(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(k in out for k in ("throughput", "latency", "serve"))
    assert _args("serve").request_rate == float("inf")
