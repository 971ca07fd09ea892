"""Run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4: greedy tokens of
tiny Llama and Qwen2 models under several meshes, printed as JSON."""

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
}.items():
    for mesh in (None, "tp=2", "tp=4"):
        lm = tiny_loaded(seed=13, **overrides)  # LLM re-places the weights by the mesh rules
        llm = LLM(lm, mesh=mesh, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                  block_size=8, num_kv_blocks=40, compilation_cache_dir=None, show_progress=False)
        outs = llm.generate(prompts, sp)
        wq = llm.loaded.model.layers[0].attn.wq[...]
        result[f"{family}/{mesh}"] = {
            "tokens": [o.outputs[0].token_ids for o in outs],
            "wq_spec": str(wq.sharding.spec) if hasattr(wq.sharding, "spec") else "single",
            "kv_spec": str(llm.engine.runner.kv[0][0].sharding.spec)
            if hasattr(llm.engine.runner.kv[0][0].sharding, "spec") else "single",
            "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"],
        }
# the Pallas decode kernel per shard (shard_map over kv heads; interpret mode on CPU)
llm = LLM(tiny_loaded(seed=13), mesh="tp=2", attention_backend="pallas", max_model_len=64,
          max_num_seqs=4, max_num_batched_tokens=32, block_size=8, num_kv_blocks=40,
          compilation_cache_dir=None, show_progress=False)
result["llama_kv2/tp=2/pallas"] = {"tokens": [o.outputs[0].token_ids for o in llm.generate(prompts, sp)],
                                   "compiles_after_warmup": llm.get_stats()["compiles_after_warmup"]}
print("RESULT " + json.dumps(result))
