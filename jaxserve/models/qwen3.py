"""Qwen3: no qkv bias, but an RMSNorm over head_dim on q and k before RoPE (`qk_norm`).

The config sets `qk_norm`; the shared weight table then expects `q_norm.weight` / `k_norm.weight`.
"""

from jaxserve.models.qwen2 import Qwen2ForCausalLM


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen3 dense causal LM (explicit head_dim, q/k RMSNorm)."""
