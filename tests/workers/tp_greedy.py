"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4: greedy tokens of
tiny Llama and Qwen2 models under several meshes (tp and dp x tp), printed as JSON."""

import json
import sys

import jax

sys.path.insert(0, sys.argv[1])
from jaxserve import LLM, SamplingParams  # noqa: E402
from tests.engine_fixtures import tiny_loaded  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9, 30)]
sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
result = {}
for family, overrides in {
    "llama_kv2": {},                                            # K=2: tp=2 splits, tp=4 replicates
    "qwen2_kv1": {"architectures": ["Qwen2ForCausalLM"], "num_key_value_heads": 1},
    # K=4 (shard_map at tp=2 and 4), q/k/v biases, tied embedding; vocab 130 splits over tp=2
    # but not tp=4 (replicated head)
    "qwen2_kv4": {"architectures": ["Qwen2ForCausalLM"], "num_attention_heads": 8,
                  "num_key_value_heads": 4, "tie_word_embeddings": True, "vocab_size": 130},
}.items():
    for mesh in (None, "tp=2", "tp=4") + (("dp=2,tp=2",) if family != "qwen2_kv1" else ()):
        lm = tiny_loaded(seed=13, **overrides)  # LLM re-places the weights by the mesh rules
        llm = LLM(lm, mesh=mesh, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                  block_size=8, num_kv_blocks=40, compilation_cache_dir=None, show_progress=False)
        outs = llm.generate(prompts * 2, sp)   # 6 requests: dp spreads them over its replicas
        attn = llm.loaded.model.layers[0].attn
        wo, wqkv = attn.wo[...], attn.wqkv[...]
        runner = llm.engine.runner
        result[f"{family}/{mesh}"] = {
            "spmd": runner._tp_specs is not None,
            "replica_steps": [e.runner.num_steps for e in getattr(llm.engine, "replicas", [])],
            "tokens": [o.outputs[0].token_ids for o in outs[:3]],
            "tokens_again": [o.outputs[0].token_ids for o in outs[3:]],
            "wo_spec": str(wo.sharding.spec) if hasattr(wo.sharding, "spec") else "single",
            "wqkv_spec": str(wqkv.sharding.spec) if hasattr(wqkv.sharding, "spec") else "single",
            "kv_spec": str(runner.kv[0][0].sharding.spec)
            if hasattr(runner.kv[0][0].sharding, "spec") else "single",
            "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"],
        }
        if mesh == "dp=2,tp=2" and family == "qwen2_kv4":
            dp_llm = llm
        if mesh is None:   # a seeded sample, for the multi-process test to compare against
            result[f"{family}/{mesh}"]["seeded"] = llm.generate(
                prompts[:1], SamplingParams(temperature=0.8, seed=3, max_tokens=8))[0].outputs[0].token_ids
# the serving path over data-parallel replicas: AsyncEngine streams on a DataParallelEngine
import asyncio  # noqa: E402

from jaxserve.engine.async_engine import AsyncEngine  # noqa: E402


async def _streams(eng):
    async def one(p):
        last = None
        async for out in eng.generate(p, sp):
            last = out
        return last.outputs[0].token_ids
    return await asyncio.gather(*[one(p) for p in prompts * 2])


aeng = AsyncEngine(dp_llm.engine)
result["qwen2_kv4/dp=2,tp=2/async"] = {"tokens": asyncio.run(_streams(aeng)),
                                       "blocks_free": aeng.get_stats()["kv_blocks_free"],
                                       "blocks_total": aeng.get_stats()["kv_blocks_total"]}
aeng.shutdown()
# the Pallas decode kernel per shard (shard_map over kv heads; interpret mode on CPU)
llm = LLM(tiny_loaded(seed=13), mesh="tp=2", attention_backend="pallas", max_model_len=64,
          max_num_seqs=4, max_num_batched_tokens=32, block_size=8, num_kv_blocks=40,
          compilation_cache_dir=None, show_progress=False)
result["llama_kv2/tp=2/pallas"] = {
    "tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, sp)],
    # one sequence alone: its decode steps run in the two-row floor bucket under tp
    "single": llm.generate(prompts[2:], sp)[0].outputs[0].token_ids,
    "decode_buckets": llm.engine.runner.decode_buckets,
    "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}
# greedy decode steps picking their tokens per vocab shard (the fused decode executables of the
# Pallas backend): vocab 130 splits over tp=2, not over tp=4 (replicated head); and with the
# logits gathered instead (JAXSERVE_VOCAB_PARALLEL_GREEDY=0). Which paths were traced.
import os  # noqa: E402
import re  # noqa: E402

import jaxserve.runner.model_runner as model_runner  # noqa: E402

real_vpg, vpg_calls = model_runner.greedy_vocab_parallel, []
model_runner.greedy_vocab_parallel = (
    lambda logits, offset, state, t, tp=None: vpg_calls.append(
        [int(logits.shape[-1]), tp is not None]) or real_vpg(logits, offset, state, t, tp))
kv4 = dict(architectures=["Qwen2ForCausalLM"], num_attention_heads=8, num_key_value_heads=4,
           tie_word_embeddings=True, vocab_size=130)
for mesh, flag in (("tp=2", "1"), ("tp=4", "1"), ("tp=2", "0")):
    os.environ["JAXSERVE_VOCAB_PARALLEL_GREEDY"] = flag
    vpg_calls.clear()
    llm = LLM(tiny_loaded(seed=13, **kv4), mesh=mesh, attention_backend="pallas",
              max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=8,
              num_kv_blocks=40, compilation_cache_dir=None, show_progress=False)
    outs = llm.generate(prompts, sp)
    runner = llm.engine.runner
    hlo = runner._exec[("decode_sample", *runner.decode_buckets[0], "greedy")].as_text()
    result[f"qwen2_kv4/{mesh}/pallas/vocab_parallel={flag}"] = {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "cumulative_logprob": [o.outputs[0].cumulative_logprob for o in outs],
        "traced": sorted({tuple(c) for c in vpg_calls}),
        # what the smallest greedy decode executable all-gathers (XLA's collectives: no peer
        # all-reduce on CPU)
        "all_gathers": sorted(set(re.findall(r"= (f32\[[0-9,]+\])\S* all-gather", hlo))),
        "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}
del os.environ["JAXSERVE_VOCAB_PARALLEL_GREEDY"]
model_runner.greedy_vocab_parallel = real_vpg
llm = LLM(tiny_loaded(seed=13, **kv4), attention_backend="pallas", max_model_len=64,
          max_num_seqs=4, max_num_batched_tokens=32, block_size=8, num_kv_blocks=40,
          compilation_cache_dir=None, show_progress=False)
outs = llm.generate(prompts, sp)
result["qwen2_kv4/None/pallas"] = {"tokens": [o.outputs[0].token_ids for o in outs],
                                   "cumulative_logprob": [o.outputs[0].cumulative_logprob
                                                          for o in outs]}
# greedy_vocab_parallel alone over 4 shards of random logits (ties, penalties, logit bias, a
# min_tokens stop mask), against the sampler's greedy mode on the whole logits; and the exchange
# the peer all-reduce would carry (each rank's stats placed in its row, summed) against XLA's
# all-gather
import numpy as np  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from jaxserve.collectives import TensorParallel, stack_by_sum_input  # noqa: E402
from jaxserve.sampling.sampler import (SamplerState, SamplingTensors,  # noqa: E402
                                       greedy_vocab_parallel, sample)

rng = np.random.default_rng(5)
rows, vocab, slots = 6, 48, 8
logits = rng.normal(size=(rows, vocab)).astype(np.float32)
logits[0, [7, 31]] = 9.0            # a tie across shards: the lower id wins
logits[1, [13, 14]] = 9.0           # a tie inside a shard
def _rows(make):   # [slots, vocab] of random values, slot 0 (the rows with ties) neutral
    x = make()
    x[0] = 0
    return jnp.asarray(x)


state = SamplerState(out_counts=_rows(lambda: rng.integers(0, 3, (slots, vocab)).astype(np.int32)),
                     prompt_mask=_rows(lambda: rng.random((slots, vocab)) < 0.2),
                     bias=_rows(lambda: np.where(rng.random((slots, vocab)) < 0.1, 5.0, 0.0)
                                .astype(np.float32)),
                     stop_mask=_rows(lambda: rng.random((slots, vocab)) < 0.05),
                     last_token=jnp.zeros((slots,), jnp.int32))
host = SamplingTensors.host(rows)
host.update(slot=np.arange(rows, dtype=np.int32) + 1, valid=np.ones(rows, bool),
            presence=np.full(rows, 0.3, np.float32), frequency=np.full(rows, 0.2, np.float32),
            repetition=np.full(rows, 1.3, np.float32), block_stop=np.arange(rows) % 2 == 0)
host["slot"][:2] = 0   # the rows with ties, without penalties
t = SamplingTensors(**{k: jnp.asarray(v) for k, v in host.items()})
want_tok, want_lp, *_ = sample(jnp.asarray(logits), state, t, "greedy")
mesh4 = Mesh(np.array(jax.devices()), ("tp",))


def shard_pick(local, state, t):
    tp = TensorParallel("tp", 4)
    return greedy_vocab_parallel(local, tp.index() * local.shape[-1], state, t, tp)


picker = jax.shard_map(shard_pick, mesh=mesh4, in_specs=(P(None, "tp"), P(), P()), out_specs=P(),
                       check_vma=False)
got_tok, got_lp = jax.jit(picker)(jnp.asarray(logits), state, t)
stats = jnp.asarray(rng.normal(size=(4, rows, 4)).astype(np.float32))


def exchange(x):
    tp = TensorParallel("tp", 4)
    return (jax.lax.psum(stack_by_sum_input(x[0], tp.index(), 4), "tp"),
            jax.lax.all_gather(x[0], "tp"))


by_sum, gathered = jax.shard_map(exchange, mesh=mesh4, in_specs=P("tp"), out_specs=P(),
                                 check_vma=False)(stats)
result["greedy_vocab_parallel/unit"] = {
    "tokens": np.asarray(got_tok).tolist(), "want_tokens": np.asarray(want_tok).tolist(),
    "lp": np.asarray(got_lp).tolist(), "want_lp": np.asarray(want_lp).tolist(),
    "exchange_equal": bool(np.array_equal(np.asarray(by_sum), np.asarray(gathered))
                           and np.array_equal(np.asarray(gathered), np.asarray(stats)))}
# the skinny-matmul kernel per shard (forced on; interpret mode on CPU), bf16: tp=2 against one
# device, and one device with XLA's GEMMs; which weight shapes went through the kernel
import pallas_kernels.skinny_matmul as skinny  # noqa: E402

real_skinny, shapes = skinny.skinny_matmul, []
skinny.skinny_matmul = lambda *a, **k: shapes.append(list(a[1].shape)) or real_skinny(*a, **k)
for mesh, flag in ((None, "0"), (None, "1"), ("tp=2", "1")):
    os.environ["JAXSERVE_SKINNY_MATMUL"] = flag
    jax.clear_caches()   # the setting is read when a layer is traced
    shapes.clear()
    llm = LLM(tiny_loaded(seed=13, dtype=jnp.bfloat16, **kv4), mesh=mesh, max_model_len=64,
              max_num_seqs=4, max_num_batched_tokens=32, block_size=8, num_kv_blocks=40,
              compilation_cache_dir=None, show_progress=False)
    result[f"qwen2_kv4_bf16/{mesh}/skinny={flag}"] = {
        "tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, sp)],
        "kernel_weights": sorted({tuple(s) for s in shapes}),
        "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}
del os.environ["JAXSERVE_SKINNY_MATMUL"]
skinny.skinny_matmul = real_skinny
jax.clear_caches()
# the peer all-reduce's plumbing: its kernel is GPU-only, so a stand-in for PeerBuffers gives a
# table of the real shape with capacity 0 (every all-reduce stays XLA's psum) while the table rides
# through every executable as the last entry of the weights argument
from jax.sharding import NamedSharding  # noqa: E402


class _StandInPeer:
    def __init__(self, mesh, capacity_bytes, axis="tp"):
        n = mesh.shape[axis]
        self.capacity_asked = capacity_bytes
        self.table = jax.device_put(np.zeros(n * 2 * (1 + n), np.int32), NamedSharding(mesh, P(axis)))
        self.tp = TensorParallel(axis, n, self.table, capacity_bytes=0)


import jaxserve.collectives as collectives  # noqa: E402

model_runner.PeerBuffers = _StandInPeer
collectives.peer_all_reduce_mode = lambda mesh: "auto"   # (CPU devices: "off" otherwise)
llm = LLM(tiny_loaded(seed=13, architectures=["Qwen2ForCausalLM"], num_attention_heads=8,
                      num_key_value_heads=4, tie_word_embeddings=True, vocab_size=130),
          mesh="tp=2", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=8,
          num_kv_blocks=40, compilation_cache_dir=None, show_progress=False)
runner = llm.engine.runner
result["qwen2_kv4/tp=2/peer_plumbing"] = {
    "tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, sp)],
    "extra_params": len(runner.params) - runner._num_weights,
    "capacity_asked": runner.peer_buffers.capacity_asked,
    "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}
print("RESULT " + json.dumps(result))
