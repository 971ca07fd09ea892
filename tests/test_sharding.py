"""Mesh parsing, the sharding rules, and tensor-parallel greedy decoding on 4 forced CPU devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxserve.sharding import MeshError, parse_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_mesh():
    assert parse_mesh(None) == {"dp": 1, "tp": 1}
    assert parse_mesh("tp=2") == {"dp": 1, "tp": 2}
    assert parse_mesh("dp=2,tp=4") == {"dp": 2, "tp": 4}
    for bad in ("tp", "pp=2", "tp=0", "tp=x"):
        with pytest.raises(MeshError):
            parse_mesh(bad)


def test_mesh_size_must_match_devices():
    import jax
    from jaxserve.sharding import make_mesh
    with pytest.raises(MeshError, match="needs 8 devices"):
        make_mesh("dp=2,tp=4", jax.devices()[:1])


@pytest.fixture(scope="module")
def tp_results():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "workers", "tp_greedy.py"), ROOT],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


@pytest.mark.parametrize("family", ["llama_kv2", "qwen2_kv1", "qwen2_kv4"])
def test_tensor_parallel_greedy_equals_single_device(tp_results, family):
    base = tp_results[f"{family}/None"]["tokens"]
    assert all(len(t) == 12 for t in base)
    for mesh in ("tp=2", "tp=4") + (("dp=2,tp=2",) if family != "qwen2_kv1" else ()):
        r = tp_results[f"{family}/{mesh}"]
        assert r["tokens"] == base and r["tokens_again"] == base, mesh
        assert r["compiles_after_warmup"] == 0
        assert "'tp'" in r["wo_spec"]  # the o projection is split over q heads
        # fused q/k/v split over kv heads where tp divides them, else replicated
        assert ("'tp'" in r["wqkv_spec"]) == r["spmd"], mesh


def test_peer_all_reduce_table_rides_with_the_weights(tp_results):
    # the runner appends the comm table to the executables' weights argument and sizes the
    # buffers for the largest step (32 tokens x hidden 64 x 4 B); tokens unchanged
    r = tp_results["qwen2_kv4/tp=2/peer_plumbing"]
    assert r["tokens"] == tp_results["qwen2_kv4/None"]["tokens"]
    assert r["extra_params"] == 1 and r["compiles_after_warmup"] == 0
    assert r["capacity_asked"] == 32 * 64 * 4


def test_explicit_spmd_when_tp_splits_q_and_kv_heads(tp_results):
    # shard_map with collectives in the model when tp divides the kv heads; XLA partitions otherwise
    expect = {"llama_kv2/tp=2": True, "llama_kv2/tp=4": False, "qwen2_kv1/tp=2": False,
              "qwen2_kv4/tp=2": True, "qwen2_kv4/tp=4": True, "qwen2_kv4/dp=2,tp=2": True}
    assert {k: tp_results[k]["spmd"] for k in expect} == expect


def test_data_parallel_spreads_requests_over_replicas(tp_results):
    steps = tp_results["llama_kv2/dp=2,tp=2"]["replica_steps"]
    assert len(steps) == 2 and all(n > 0 for n in steps)


def test_async_engine_streams_over_data_parallel_replicas(tp_results):
    r = tp_results["qwen2_kv4/dp=2,tp=2/async"]
    assert r["tokens"] == tp_results["qwen2_kv4/None"]["tokens"] * 2
    assert r["blocks_free"] == r["blocks_total"]


def test_pallas_decode_kernel_per_shard_under_tp(tp_results):
    r = tp_results["llama_kv2/tp=2/pallas"]
    assert r["tokens"] == tp_results["llama_kv2/None"]["tokens"]
    assert r["compiles_after_warmup"] == 0


def test_greedy_tokens_picked_per_vocab_shard(tp_results):
    # greedy decode steps under tp pick their tokens from each shard's slice of the LM head:
    # the same tokens and logprobs as one device, with the head split (tp=2), replicated (tp=4),
    # or the logits gathered first (switch off)
    base = tp_results["qwen2_kv4/None/pallas"]
    assert base["tokens"] == tp_results["qwen2_kv4/None"]["tokens"]
    for key, traced in (("tp=2/pallas/vocab_parallel=1", [[65, True]]),
                        ("tp=4/pallas/vocab_parallel=1", [[130, False]]),
                        ("tp=2/pallas/vocab_parallel=0", [])):
        r = tp_results[f"qwen2_kv4/{key}"]
        assert r["traced"] == traced, key
        # the smallest greedy decode step (2 rows): [2, 130] logits gathered, or [tp, 2, 4] stats
        gathers = {"tp=2/pallas/vocab_parallel=1": ["f32[2,2,4]"],
                   "tp=4/pallas/vocab_parallel=1": [],
                   "tp=2/pallas/vocab_parallel=0": ["f32[2,130]"]}
        assert r["all_gathers"] == gathers[key], key
        assert r["tokens"] == base["tokens"], key
        np.testing.assert_allclose(r["cumulative_logprob"], base["cumulative_logprob"],
                                   rtol=1e-4, atol=1e-4)
        assert r["compiles_after_warmup"] == 0


def test_greedy_vocab_parallel_equals_the_samplers_greedy_mode(tp_results):
    # 4 shards of random logits with penalties, biases, a stop mask and ties (across shards
    # and inside one): the whole-vocab argmax's tokens (ties to the lower id), its logprobs
    r = tp_results["greedy_vocab_parallel/unit"]
    assert r["tokens"] == r["want_tokens"]
    assert r["tokens"][:2] == [7, 13]
    np.testing.assert_allclose(r["lp"], r["want_lp"], rtol=1e-5, atol=1e-5)
    # the shards' statistics exchanged as a sum of rows placed over zeros (the peer all-reduce's
    # way) equal XLA's all-gather of them, bit for bit
    assert r["exchange_equal"]


def test_skinny_matmul_per_shard_under_tp(tp_results):
    # the kernel (forced on, interpret mode) on each shard's weights gives one device's tokens.
    # A bf16 model: the kernel vs XLA's GEMMs and tp=2's partial sums vs one device round
    # differently, so a greedy path may part after several tokens (the 30-token prompt's does
    # after 8); the first 6 of every prompt must agree, a wrong kernel would miss from the first
    one_xla = tp_results["qwen2_kv4_bf16/None/skinny=0"]
    one = tp_results["qwen2_kv4_bf16/None/skinny=1"]
    tp2 = tp_results["qwen2_kv4_bf16/tp=2/skinny=1"]
    assert one_xla["kernel_weights"] == []
    # hidden 64, 8 heads of 8 dims, F 128: whole weights on one device, their halves under tp=2
    # (o's 32-row half fits no K tile and stays with XLA)
    assert [64, 128] in one["kernel_weights"] and [64, 256] in one["kernel_weights"]
    assert [64, 64] in tp2["kernel_weights"] and [64, 128] in tp2["kernel_weights"]
    first = lambda r: [t[:6] for t in r["tokens"]]
    assert first(one) == first(one_xla) and first(tp2) == first(one_xla)
    assert tp2["compiles_after_warmup"] == 0


def test_decode_steps_under_tp_have_two_rows_at_least(tp_results):
    # XLA turns a one-row matmul against a small weight shard into a slow reduction: under tp a
    # lone sequence decodes in a two-row bucket (one padding row), with the same tokens
    r = tp_results["llama_kv2/tp=2/pallas"]
    assert r["decode_buckets"][0] == [2, 2]
    assert r["single"] == tp_results["llama_kv2/None"]["tokens"][2]


def test_kv_heads_split_when_divisible_else_replicated(tp_results):
    assert "'tp'" in tp_results["llama_kv2/tp=2"]["kv_spec"]        # K=2 over tp=2
    assert "'tp'" not in tp_results["llama_kv2/tp=4"]["kv_spec"]    # K=2 < tp=4: replicated
    assert "'tp'" not in tp_results["qwen2_kv1/tp=2"]["kv_spec"]


def test_tp_mesh_spanning_two_processes_equals_single_device(tp_results, tmp_path):
    from tests.server_fixtures import free_port
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    worker = os.path.join(ROOT, "tests", "workers", "multihost_greedy.py")
    procs = [subprocess.Popen([sys.executable, worker, ROOT, str(i), str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    res = json.loads([x for x in outs[0][0].splitlines() if x.startswith("RESULT ")][-1][7:])
    base = tp_results["llama_kv2/None"]
    assert res["tokens"] == base["tokens"] and res["seeded"] == base["seeded"]
    assert res["spans_processes"] and res["spmd"] and "'tp'" in res["wqkv_spec"]
    assert res["compiles_after_warmup"] == 0
    followed = [x for x in outs[1][0].splitlines() if x.startswith("FOLLOWED ")]
    assert followed and int(followed[-1].split()[1]) > 0
    # both processes planned the cache and printed the memory line (per-device weights are read
    # from the shardings: a replicated array's shards are not addressable that way across processes)
    for _, err in outs:
        assert "GiB per device (tp=2)" in err


def test_rules_table():
    import jax
    from jaxserve.sharding import spec_for
    from jax.sharding import Mesh
    import numpy as np
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("dp", "tp"))
    assert spec_for(("embed", "heads", "head_dim"), (64, 4, 16), mesh) == P(None, "tp", None)


def test_multi_host_server_two_processes(smollm, tmp_path):
    """`jaxserve serve` as a 2-process job (loopback, one CPU device each, tp=2 across them):
    process 0 answers over HTTP with the one-device tokens; SIGTERM on it releases the follower
    and both exit 0."""
    import signal

    import httpx

    from jaxserve import LLM, SamplingParams
    from jaxserve.loading.orbax_io import save_orbax
    from tests.server_fixtures import free_port, tiny_chat_model, wait_healthy

    lm = tiny_chat_model(smollm.tokenizer)
    model_dir = save_orbax(lm.model, lm.hf_config, str(tmp_path / "tiny"), tokenizer=lm.tokenizer)
    engine_flags = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens",
                    "32", "--num-kv-blocks", "64"]
    want = LLM(model_dir, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32,
               num_kv_blocks=64, compilation_cache_dir=None, show_progress=False).generate(
        {"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0.0, max_tokens=8),
        use_tqdm=False)[0].outputs[0].text

    http_port, coord_port = free_port(), free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxserve.cli", "serve", "--model", model_dir, "--port",
         str(http_port), "--mesh", "tp=2", "--compilation-cache-dir", "", *engine_flags,
         "--coordinator-address", f"127.0.0.1:{coord_port}", "--num-processes", "2",
         "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for i in (0, 1)]
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(url, procs, timeout=300)
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model_dir, "prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=120) == 0
        assert procs[1].wait(timeout=120) == 0
        assert "leader stopped" in procs[1].stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
