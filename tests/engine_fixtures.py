"""A tiny random Llama (weights with O(1) logits, so greedy choices are well separated)."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.loading import LoadedModel
from jaxserve.models.registry import create_model

TINY_HF = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 512, "rope_theta": 10000.0,
           "rms_norm_eps": 1e-5, "eos_token_id": 1, "bos_token_id": 0}


def tiny_loaded(seed: int = 0, dtype=jnp.float32, **overrides) -> LoadedModel:
    hf = dict(TINY_HF, **overrides)
    cfg = ModelConfig.from_hf_config(hf)
    model = create_model(cfg, dtype=dtype, seed=seed)
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    new = [jax.random.normal(k, x.shape, x.dtype) * 0.15 + (1.0 if x.ndim == 1 else 0.0)
           for k, x in zip(keys, leaves)]
    model = nnx.merge(graphdef, jax.tree.unflatten(tree, new))
    return LoadedModel(model, cfg, hf, None, "tiny-random-llama", dtype)


def greedy_with_env(monkeypatch, var: str, flag: str, dtype=jnp.float32):
    """Greedy tokens and top-3 logprobs of two prompts through the tiny model in a fresh engine,
    with the environment variable `var` (a per-process kernel switch read at trace time) set to
    `flag`: [(token ids, [sorted (token, Logprob) per step])] per prompt."""
    from jaxserve import LLM, SamplingParams

    monkeypatch.setenv(var, flag)
    jax.clear_caches()   # the per-layer jit would otherwise reuse the other setting's trace
    llm = LLM(tiny_loaded(seed=4, dtype=dtype), max_model_len=32, max_num_seqs=2,
              max_num_batched_tokens=16, block_size=8, num_kv_blocks=12,
              compilation_cache_dir=None, show_progress=False)
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (1, 9)]
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    return [(o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs])
            for o in llm.generate(prompts, sp)]
