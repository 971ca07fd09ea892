"""Load a GGUF file (llama.cpp's format): config, weights (dequantized) and tokenizer, without torch.

* Config: the `{arch}.*` metadata keys are turned into an HF-style config dict, so the rest of
  jaxserve sees the same `ModelConfig` as for a safetensors checkpoint.
* Weights: tensor names are mapped to Hugging Face names and then go through the same weight table
  as safetensors. Quantized blocks (Q4_0, Q4_1, Q8_0, K-quants, ...) are dequantized with gguf-py's
  reference numpy code, one tensor at a time. llama.cpp stores the q/k projections of `llama`
  models permuted for its interleaved RoPE; we undo that permutation so the rotate-half RoPE applies.
* Tokenizer: byte-level BPE vocab + merges from `tokenizer.ggml.*`, the pre-tokenizer named by
  `tokenizer.ggml.pre`, control tokens as special tokens, and `tokenizer.chat_template`.
"""

from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np

from jaxserve.loading.errors import WeightLoadError

GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


class GGUFCheckpoint:
    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise WeightLoadError("GGUF file not found", file=self.path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError/struct.error on bad files
            raise WeightLoadError(f"not a readable GGUF file ({type(e).__name__})",
                                  file=self.path) from None
        self.arch = self.field("general.architecture")
        if self.arch not in GGUF_ARCHS:
            from jaxserve.models.registry import UnsupportedModelError
            raise UnsupportedModelError(
                f"GGUF architecture {self.arch!r} is not supported; supported: "
                f"{', '.join(sorted(GGUF_ARCHS))}")

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    # -- config ------------------------------------------------------------------------------
    def hf_config(self) -> dict:
        a = self.arch
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise WeightLoadError("GGUF files with precomputed `rope_freqs` (Llama 3.1 rope "
                                  "scaling) are not supported yet; use the safetensors checkpoint",
                                  file=self.path, tensor="rope_freqs.weight")
        heads = int(self.field(f"{a}.attention.head_count"))
        hidden = int(self.field(f"{a}.embedding_length"))
        tokens = self.field("tokenizer.ggml.tokens") or []
        cfg = {
            "architectures": [GGUF_ARCHS[a]],
            "hidden_size": hidden,
            "intermediate_size": int(self.field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(self.field(f"{a}.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.field(f"{a}.attention.head_count_kv", heads)),
            "head_dim": int(self.field(f"{a}.attention.key_length", hidden // heads)),
            "vocab_size": int(self.field(f"{a}.vocab_size", len(tokens))),
            "rms_norm_eps": float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.field(f"{a}.context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "bfloat16",
        }
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling and scaling != "none":
            cfg["rope_scaling"] = {"rope_type": scaling,
                                   "factor": float(self.field(f"{a}.rope.scaling.factor", 1.0))}
        window = self.field(f"{a}.attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
        return cfg

    # -- weights -----------------------------------------------------------------------------
    def tensors(self, cfg: dict) -> Iterator[tuple[str, str, np.ndarray]]:
        from gguf import GGMLQuantizationType, quants

        permute = self.arch in ("llama", "mistral")
        heads = cfg["num_attention_heads"]
        kv_heads = cfg["num_key_value_heads"]
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                raise WeightLoadError(f"unknown GGUF tensor for architecture {self.arch!r}",
                                      file=self.path, tensor=t.name)
            try:
                if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                    arr = np.asarray(t.data)
                else:
                    arr = quants.dequantize(t.data, t.tensor_type)
                arr = arr.reshape(tuple(int(s) for s in reversed(t.shape)))
            except (NotImplementedError, ValueError) as e:
                raise WeightLoadError(f"cannot dequantize {t.tensor_type.name} ({e})",
                                      file=self.path, tensor=t.name) from None
            if permute and name.endswith("q_proj.weight"):
                arr = unpermute_qk(arr, heads)
            elif permute and name.endswith("k_proj.weight"):
                arr = unpermute_qk(arr, kv_heads)
            yield self.path, name, arr

    # -- tokenizer ---------------------------------------------------------------------------
    def tokenizer(self):
        from jaxserve.tokenizer import tokenizer_from_gguf_fields
        return tokenizer_from_gguf_fields(self.field, source=os.path.basename(self.path))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head (pairs -> halves) row permutation of a q/k projection [n*h, D]."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
