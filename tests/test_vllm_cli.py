"""`vllm serve` command lines: every vLLM flag accepted with its meaning, or refused naming what to
use instead (fast parsing tests), and one real server started from a vLLM-style command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from jaxserve.arg_utils import VLLM_ONLY, UsageError
from jaxserve.cli import build_parser, parse_command_line
from jaxserve.server import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    return parse_command_line(list(argv))


def refused(*argv: str) -> str:
    with pytest.raises(ValueError) as e:
        parse(*argv)
    return str(e.value)


# -- the model --------------------------------------------------------------------------------------

def test_model_positional_or_flag_and_serve_is_the_default_command():
    assert parse("serve", "org/m")[0].model == "org/m"
    assert parse("org/m")[0].model == "org/m"                      # jaxserve MODEL
    assert parse("serve", "--model", "org/m")[0].model == "org/m"
    assert parse("serve", "org/m", "--model", "org/m")[0].model == "org/m"
    assert parse("serve")[0].model is None                         # the embedded default
    assert "two models" in refused("serve", "org/a", "--model", "org/b")


def test_config_file_model_yields_to_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: org/from-file\ntensor-parallel-size: 2\n")
    assert parse("serve", "--config", str(cfg))[0].model == "org/from-file"
    args, _ = parse("serve", "org/on-line", "--config", str(cfg))
    assert args.model == "org/on-line" and args.mesh == "dp=1,tp=2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization: awq\n")
    assert "--quantization awq" in refused("serve", "--config", str(bad))


# -- engine flags -----------------------------------------------------------------------------------

def test_parallel_sizes_become_the_mesh():
    assert parse("serve", "--tensor-parallel-size", "2")[0].mesh == "dp=1,tp=2"
    assert parse("serve", "-tp", "2", "-dp", "2")[0].mesh == "dp=2,tp=2"
    assert parse("serve", "-tp", "1")[0].mesh == "dp=1,tp=1"
    assert parse("serve", "--mesh", "tp=2", "-dp", "3")[0].mesh == "dp=3,tp=2"
    assert parse("serve", "--mesh", "tp=2", "-tp", "2")[0].mesh == "dp=1,tp=2"
    assert "disagrees with --mesh tp=2" in refused("serve", "--mesh", "tp=2", "-tp", "4")
    assert "at least 1" in refused("serve", "-tp", "0")
    assert parse("bench", "throughput", "-tp", "2")[0].mesh == "dp=1,tp=2"


def test_num_gpu_blocks_override_counts_the_null_block():
    assert parse("serve", "--num-gpu-blocks-override", "256")[0].num_kv_blocks == 255
    assert parse("serve", "--num-gpu-blocks-override", "256", "--num-kv-blocks", "255")[0]
    assert "disagrees" in refused("serve", "--num-gpu-blocks-override", "256", "--num-kv-blocks", "9")
    assert parse("bench", "throughput", "--num-gpu-blocks-override", "9")[0].num_kv_blocks == 8


def test_vllm_value_spellings():
    args, _ = parse("serve", "--max-model-len", "32k", "--max-num-batched-tokens", "8K",
                    "--dtype", "float")
    assert (args.max_model_len, args.max_num_batched_tokens, args.dtype) == (32000, 8192, "float32")
    with pytest.raises(SystemExit):
        parse("serve", "--max-model-len", "lots")


def test_enforce_eager_and_max_logprobs_reach_the_engine_config():
    from jaxserve.sampling.sampler import NUM_TOP_LOGPROBS

    config = launch.serving_engine_config(parse("serve", "--enforce-eager", "--max-logprobs", "5")[0])
    assert config.warmup is False and config.max_logprobs == 5
    config = launch.serving_engine_config(parse("serve", "--num-gpu-blocks-override", "64")[0])
    assert config.warmup is True and config.max_logprobs == NUM_TOP_LOGPROBS == 20
    assert config.num_kv_blocks == 63
    assert "use --max-logprobs 20" in refused("serve", "--max-logprobs", "-1")
    assert "[0, 20]" in refused("serve", "--max-logprobs", "21")


def test_engine_enforces_max_logprobs_and_compiles_lazily_without_warmup():
    from jaxserve.engine.core import EngineConfig, EngineCore
    from jaxserve.engine.outputs import InvalidRequestError
    from jaxserve.sampling.params import SamplingParams
    from tests.engine_fixtures import tiny_loaded

    lm = tiny_loaded()
    small = dict(max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16, block_size=8,
                 num_kv_blocks=8, compilation_cache_dir=None, show_progress=False, freeze_gc=False)
    with pytest.raises(ValueError, match="max_logprobs"):
        EngineCore(lm, EngineConfig(max_logprobs=21, **small))
    core = EngineCore(lm, EngineConfig(max_logprobs=2, warmup=False, **small))
    assert core.runner.warmup_seconds == {}            # nothing compiled at start-up
    with pytest.raises(InvalidRequestError, match="at most 2 logprobs"):
        core.validate([3, 4], SamplingParams(logprobs=3))
    core.add_request("r", {"prompt_token_ids": [3, 4, 5]},
                     SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=2))
    done = []
    while core.has_unfinished():
        done += [o for o in core.step() if o.finished]
    assert len(done[0].outputs[0].token_ids) == 3
    assert core.get_stats()["compiles_after_warmup"] > 0   # the lazy compiles are counted


# -- model sources, tokenizer, generation config ------------------------------------------------------

def test_revision_and_download_dir_go_to_the_hub(monkeypatch, tmp_path):
    import jaxserve.loading.hub as hub
    calls = []
    monkeypatch.setattr(hub, "resolve_hub_model",
                        lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path))
    args, notes = parse("serve", "org/m", "--revision", "v2", "--download-dir", "/cache")
    assert launch.model_source(args) == str(tmp_path) and not notes
    assert calls == [("org/m", {"revision": "v2", "cache_dir": "/cache", "config_only": False})]
    args, notes = parse("serve", str(tmp_path), "--revision", "v2")
    assert launch.model_source(args) == str(tmp_path) and "--revision is ignored" in notes[0]


def test_tokenizer_from_a_gguf_file_or_a_folder(smollm_path, tmp_path):
    from jaxserve.tokenizer import TokenizerError

    tok = launch.load_tokenizer(smollm_path)
    assert tok.decode(tok.encode("Hello there")) == "Hello there"
    tok.save_pretrained(tmp_path)
    assert launch.load_tokenizer(str(tmp_path)).encode("Hello there") == tok.encode("Hello there")
    with pytest.raises(TokenizerError, match="not a directory"):
        launch.load_tokenizer("no-such-tokenizer")


def test_generation_config_sets_default_sampling(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 50, "repetition_penalty": 1.05,
         "max_new_tokens": 512, "eos_token_id": [1, 2]}))
    model = str(tmp_path)
    # top_k 50 is transformers' own default: not a recommendation (as vLLM reads it)
    want = {"temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05, "max_tokens": 512}
    assert launch.generation_defaults(parse("serve", model)[0], model) == want
    assert launch.generation_defaults(parse("serve", model, "--generation-config", model)[0],
                                      None) == want
    assert launch.generation_defaults(
        parse("serve", model, "--generation-config", "vllm")[0], model) == {}
    args = parse("serve", model, "--override-generation-config", '{"temperature": 0, "top_k": 50}')[0]
    assert launch.generation_defaults(args, model) == {**want, "temperature": 0.0, "top_k": 50}
    assert "no generation_config.json" in refused("serve", "--generation-config", "/nowhere")
    assert "not JSON" in refused("serve", "--override-generation-config", "{temperature")
    assert "not a sampling field" in refused("serve", "--override-generation-config", '{"n": 2}')
    with pytest.raises(ValueError, match="top_p"):
        launch.generation_defaults(parse("serve", "--override-generation-config",
                                         '{"top_p": 7}')[0], None)


# -- server, TLS, logging ---------------------------------------------------------------------------

def test_tls_root_path_and_access_log_reach_uvicorn(tmp_path):
    from jaxserve.server.http import uvicorn_config

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("k")
    cert.write_text("c")
    args, _ = parse("serve", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
                    "--ssl-cert-reqs", "2", "--ssl-ca-certs", str(cert), "--root-path", "/llm",
                    "--disable-uvicorn-access-log")
    config = uvicorn_config(None, host="h", port=1, **launch._tls_and_proxy(args))
    assert (config.ssl_keyfile, config.ssl_certfile, config.ssl_cert_reqs) == (str(key), str(cert), 2)
    assert config.ssl_ca_certs == str(cert) and config.root_path == "/llm"
    assert config.access_log is False
    assert launch._tls_and_proxy(parse("serve")[0]) == {}
    assert "needs --ssl-certfile" in refused("serve", "--ssl-keyfile", str(key))
    assert "no such file" in refused("serve", "--ssl-certfile", str(tmp_path / "none.pem"))


def test_logging_switches():
    args, _ = parse("serve", "--disable-log-requests", "--disable-log-stats")
    assert args.disable_log_stats and not args.enable_log_requests
    args, _ = parse("serve", "--enable-log-requests", "--max-log-len", "80")
    assert args.enable_log_requests and args.max_log_len == 80
    assert "give one" in refused("serve", "--enable-log-requests", "--disable-log-requests")


def test_request_log_and_stats_lines(caplog):
    import asyncio
    import logging

    from jaxserve.engine.core import EngineConfig, EngineCore
    from jaxserve.sampling.params import SamplingParams
    from jaxserve.server.metrics import Metrics
    from jaxserve.server.serving import ServerState
    from tests.engine_fixtures import tiny_loaded

    core = EngineCore(tiny_loaded(), EngineConfig(
        max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16, block_size=8, num_kv_blocks=8,
        compilation_cache_dir=None, show_progress=False, freeze_gc=False, warmup=False))
    engine = launch.RequestLoggingEngine(core, max_log_len=5)
    state = ServerState(["m"], Metrics("m"), engine=engine)

    async def run():
        stats = asyncio.create_task(launch.log_stats(state, interval=0.05))
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        async for out in engine.generate({"prompt_token_ids": [3, 4, 5], "prompt": "a long prompt"},
                                         params, "r1"):
            pass
        await asyncio.sleep(0.2)
        stats.cancel()
        return out

    with caplog.at_level(logging.INFO, logger="jaxserve"):
        try:
            assert asyncio.run(run()).finished
        finally:
            engine.shutdown()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("request r1: prompt 'a lon' (3 tokens), SamplingParams(") for m in lines)
    assert any(m.startswith("request r1 finished: length, 3 tokens in") for m in lines)
    assert any("generation" in m and "tokens/s" in m and "KV cache" in m for m in lines)


def test_banner_curl_line_works_as_printed():
    text = launch._banner("0.0.0.0", 8000, "m", "s3cr'et")
    assert "curl http://127.0.0.1:8000/v1/chat/completions" in text
    assert "-H 'Authorization: Bearer s3cr'\"'\"'et'" in text      # the key, shell-quoted
    assert '"temperature": 0' in text
    text = launch._banner("::1", 8443, "m", None, certfile="/etc/c.pem")
    assert "curl https://[::1]:8443/v1/chat/completions" in text and "--cacert /etc/c.pem" in text
    assert "Authorization" not in text


# -- vLLM-only flags ----------------------------------------------------------------------------------

def _given(c) -> list[str]:
    """A command line giving flag `c` a value it does not take silently."""
    if c.kind == "flag":
        return [c.flags[0]]
    if c.kind == "bool":
        return ["--no-" + c.flags[0][2:]]
    return [c.flags[-1], "2" if c.values == ("1",) else "other", *(["x"] if c.kind == "values" else [])]


@pytest.mark.parametrize("c", VLLM_ONLY, ids=lambda c: c.flags[0])
def test_vllm_only_flags_are_refused_or_noted(c):
    if c.refuse:
        message = refused("serve", *_given(c))
        assert message.startswith(c.flags[0] if c.kind != "bool" else "--no-")
        assert c.refuse in message
    if c.note:
        on = [c.flags[0]] if c.kind in ("flag", "bool") else [c.flags[0], "4"]
        _, notes = parse("serve", *on)
        assert notes == [f"{' '.join(on)}: {c.note}"]
    for value in c.values:   # what jaxserve does anyway: accepted without a word
        assert parse("serve", c.flags[0], value)[1] == []


def test_refusals_are_usage_errors_from_main(capsys):
    from jaxserve.cli import main

    assert main(["serve", "--quantization", "awq"]) == 2
    err = capsys.readouterr().err
    assert "error: --quantization awq" in err and "GGUF" in err
    assert issubclass(UsageError, ValueError)


def test_help_lists_vllm_flags_and_every_default(capsys):
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    assert "vLLM compatibility" in text and "--tensor-parallel-size" in text and "-tp" in text
    assert "(default: 8000)" in text and "(default: 0.9)" in text
    formatter = serve._get_formatter()
    for action in serve._actions:
        if action.option_strings and not any(action.default is v
                                                 for v in (None, False, argparse.SUPPRESS)):
            assert "default" in formatter._get_help_string(action), action.option_strings
    for name in ("generate", "chat", "convert"):
        assert "(default:" in parser._subparsers._group_actions[0].choices[name].format_help()


def test_python_dash_m_jaxserve_is_the_command():
    proc = subprocess.run([sys.executable, "-m", "jaxserve", "serve", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "vLLM compatibility" in proc.stdout


# -- one real server from a vLLM command line -----------------------------------------------------

@pytest.mark.slow
def test_vllm_style_command_line_serves_the_openai_client(smollm_path):
    from openai import OpenAI

    from tests.server_fixtures import free_port, wait_healthy

    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxserve", "serve", smollm_path, "--tensor-parallel-size", "1",
         "--port", str(port), "--max-model-len", "1024", "--max-num-seqs", "4",
         "--num-gpu-blocks-override", "256", "--generation-config", "vllm",
         "--disable-log-requests", "--trust-remote-code", "--compilation-cache-dir", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [proc], timeout=180)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        name = client.models.list().data[0].id
        out = client.chat.completions.create(
            model=name, temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.choices[0].message.content
        emb = client.embeddings.create(model=name, input=["Paris", "the capital of France"])
        vecs = [e.embedding for e in emb.data]
        assert len(vecs) == 2 and len(vecs[0]) == 576 and emb.usage.prompt_tokens > 2
        assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-3   # LAST pooling, normalized
    finally:
        proc.terminate()
        try:
            log = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            log = proc.communicate()[0]
    assert "--trust-remote-code: not needed" in log
    assert "255 pages x 16 tokens" in log      # 256 blocks, one of them the null block
    assert proc.returncode == 0, log[-3000:]
