"""Full-size configs build abstractly (no memory) with the published parameter counts."""

import jax
import pytest
from flax import nnx

from jaxserve.config import ConfigError, ModelConfig
from jaxserve.models.registry import (UnsupportedModelError, abstract_model, count_params,
                                      get_model_class, preset_config)

# Parameter counts of the Hugging Face checkpoints (sum of numel over model.parameters()).
PUBLISHED = {
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "llama-3.1-8b": 8_030_261_248,
    "mistral-7b": 7_248_023_552,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_eval_shape_full_size(name):
    cfg = preset_config(name)
    model = abstract_model(cfg)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    assert count_params(model) == PUBLISHED[name] == cfg.num_params()


def test_qwen_shapes_have_bias_and_norms():
    q2 = abstract_model(preset_config("qwen2.5-7b"))
    assert q2.layers[0].attn.bqkv.shape == (4, 7 + 2, 128)   # K, G+2, H
    assert q2.layers[0].attn.wqkv.shape == (3584, 4, 7 + 2, 128)
    q3 = abstract_model(preset_config("qwen3-8b"))
    assert q3.layers[0].attn.q_norm.scale.shape == (128,)
    assert not hasattr(q3.layers[0].attn, "bqkv")


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError) as e:
        get_model_class("GPT2LMHeadModel")
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_transformers5_rope_parameters_are_read():
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 32,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope.theta == 500000.0 and cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16


@pytest.mark.parametrize("bad,field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_bad_configs_name_the_field(bad, field):
    hf = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 32, **bad}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(hf)
