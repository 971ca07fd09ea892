"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections.

`ModelConfig.from_hf_config` sets `qkv_bias` for Qwen2 architectures; the shared weight table then
expects `q_proj.bias`, `k_proj.bias` and `v_proj.bias`.
"""

from jaxserve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2/Qwen2.5 causal LM (qkv bias, large rope theta, usually untied embeddings)."""
