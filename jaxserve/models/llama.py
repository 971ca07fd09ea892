"""Llama family: Llama 2/3/3.1 (llama3 rope scaling), SmolLM2 (tied embeddings), and the shared
Hugging Face weight-name table that Mistral and Qwen reuse.

`hf_weight_map(cfg)` maps every checkpoint tensor name to where it lands in our parameter tree, the
shape the checkpoint must have, and the layout change applied once at load time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models.layers import CausalLM


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: tuple[str | int, ...]            # where the tensor goes in the model's parameter tree
    hf_shape: tuple[int, ...]              # the shape the checkpoint must have
    convert: Callable[[np.ndarray], np.ndarray]   # HF layout -> our layout
    # for a fused parameter (several checkpoint tensors in one array): where this part goes
    index: tuple | None = None


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _heads_in(*heads: int) -> Callable[[np.ndarray], np.ndarray]:
    # [prod(heads), D] (out, in) -> [D, *heads], e.g. q [K*G*H, D] -> [D, K, G, H]
    return lambda x: np.ascontiguousarray(
        x.reshape(*heads, x.shape[-1]).transpose(len(heads), *range(len(heads))))


def _heads_out(n: int, h: int) -> Callable[[np.ndarray], np.ndarray]:
    # [D, n*h] (out, in) -> [n, h, D]
    return lambda x: np.ascontiguousarray(x.reshape(x.shape[0], n, h).transpose(1, 2, 0))


def _bias(*heads: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x.reshape(*heads)


def hf_weight_map(cfg: ModelConfig) -> dict[str, WeightSpec]:
    d, f, n, k, h, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.vocab_size)
    g = n // k
    every = slice(None)
    m: dict[str, WeightSpec] = {
        "model.embed_tokens.weight": WeightSpec(("embed",), (v, d), _identity),
        "model.norm.weight": WeightSpec(("norm", "scale"), (d,), _identity),
    }
    if not cfg.tie_word_embeddings:
        m["lm_head.weight"] = WeightSpec(("lm_head",), (v, d), _identity)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer: tuple[str | int, ...] = ("layers", i)
        m[p + "input_layernorm.weight"] = WeightSpec(layer + ("input_norm", "scale"), (d,), _identity)
        m[p + "post_attention_layernorm.weight"] = WeightSpec(
            layer + ("post_attn_norm", "scale"), (d,), _identity)
        a = p + "self_attn."
        # q/k/v fused as [D, K, G+2, H]: query head k*G + j at [:, k, j], key k at [:, k, G],
        # value k at [:, k, G+1] (the biases likewise without D)
        wqkv = layer + ("attn", "wqkv")
        m[a + "q_proj.weight"] = WeightSpec(wqkv, (n * h, d), _heads_in(k, g, h),
                                            (every, every, slice(0, g)))
        m[a + "k_proj.weight"] = WeightSpec(wqkv, (k * h, d), _heads_in(k, h), (every, every, g))
        m[a + "v_proj.weight"] = WeightSpec(wqkv, (k * h, d), _heads_in(k, h), (every, every, g + 1))
        m[a + "o_proj.weight"] = WeightSpec(layer + ("attn", "wo"), (d, n * h), _heads_out(n, h))
        if cfg.qkv_bias:
            bqkv = layer + ("attn", "bqkv")
            m[a + "q_proj.bias"] = WeightSpec(bqkv, (n * h,), _bias(k, g, h), (every, slice(0, g)))
            m[a + "k_proj.bias"] = WeightSpec(bqkv, (k * h,), _bias(k, h), (every, g))
            m[a + "v_proj.bias"] = WeightSpec(bqkv, (k * h,), _bias(k, h), (every, g + 1))
        if cfg.qk_norm:
            m[a + "q_norm.weight"] = WeightSpec(layer + ("attn", "q_norm", "scale"), (h,), _identity)
            m[a + "k_norm.weight"] = WeightSpec(layer + ("attn", "k_norm", "scale"), (h,), _identity)
        mlp = p + "mlp."
        gate_up = layer + ("mlp", "w_gate_up")    # [D, 2, F]: gate at [:, 0], up at [:, 1]
        m[mlp + "gate_proj.weight"] = WeightSpec(gate_up, (f, d), _transpose, (every, 0))
        m[mlp + "up_proj.weight"] = WeightSpec(gate_up, (f, d), _transpose, (every, 1))
        m[mlp + "down_proj.weight"] = WeightSpec(layer + ("mlp", "w_down"), (d, f), _transpose)
    return m


def hf_ignored(name: str, cfg: ModelConfig) -> bool:
    """Checkpoint tensors that carry no information for us (computed buffers, tied copies)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return cfg.tie_word_embeddings and name == "lm_head.weight"


class LlamaForCausalLM(CausalLM):
    """Llama 2/3/3.1 and SmolLM2; everything is in `CausalLM`, selected by the config."""

    hf_weight_map = staticmethod(hf_weight_map)
    hf_ignored = staticmethod(hf_ignored)
