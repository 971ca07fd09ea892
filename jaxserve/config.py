"""Frozen configuration dataclasses.

`ModelConfig` is read from a Hugging Face `config.json` dict (`ModelConfig.from_hf_config`). It keeps
only what the forward pass needs, normalised across transformers 4.x (`rope_theta`, `rope_scaling`)
and 5.x (`rope_parameters`) spellings. Unknown or unsupported settings raise `ConfigError` naming the
field instead of being silently ignored.

`default_sampling` turns a model's `generation_config.json` into the server's default sampling
parameters (vLLM's `--generation-config auto`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypedDict


class ConfigError(ValueError):
    """A model configuration jaxserve cannot serve, with the offending field named."""


# NOTE: rope scaling types we implement exactly as transformers does. Anything else is refused.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str          # HF `architectures[0]`, the registry key
    vocab_size: int            # V
    hidden_size: int           # D
    intermediate_size: int     # F
    num_layers: int            # L
    num_heads: int             # N (query heads)
    num_kv_heads: int          # K (key/value heads, GQA)
    head_dim: int              # H
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False     # Qwen2
    qk_norm: bool = False      # Qwen3
    sliding_window: int | None = None
    dtype: str = "bfloat16"    # checkpoint dtype (HF `torch_dtype` / `dtype`)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    # -- helpers used by benchmarks ----------------------------------------------------------
    def num_params(self) -> int:
        d, f, n, k, h, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                            self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attn += n * h + 2 * k * h
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + 2 * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def flops_per_token(self, context_len: int = 0) -> int:
        """Forward FLOPs for one token: 2 x matmul params + attention over `context_len` keys."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size * (
            0 if self.tie_word_embeddings else 1)
        attn = 4 * self.num_layers * self.num_heads * self.head_dim * context_len
        return 2 * matmul_params + attn

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no `architectures` field; cannot pick a model class")
        arch = archs[0]

        def req(name: str) -> Any:
            if hf.get(name) is None:
                raise ConfigError(f"config.json for {arch} is missing required field `{name}`")
            return hf[name]

        hidden = int(req("hidden_size"))
        heads = int(req("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads={heads} is not a multiple of "
                              f"num_key_value_heads={kv_heads}")
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu)")

        rope = _rope_from_hf(hf, arch)
        sliding = hf.get("sliding_window")
        if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
            sliding = None  # Qwen2/3 carry a sliding_window value but do not use it by default
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
        return cls(
            architecture=arch,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=int(req("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch.startswith("Qwen2") or bool(hf.get("attention_bias", False)),
            qk_norm=arch.startswith("Qwen3"),
            sliding_window=int(sliding) if sliding else None,
            dtype=str(dtype),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf_config(json.load(f))

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def _rope_from_hf(hf: dict[str, Any], arch: str) -> RopeConfig:
    # transformers >= 5 nests everything under `rope_parameters`; 4.x uses rope_theta + rope_scaling.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if scaling:
        params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} of {arch} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


# -- a model's recommended sampling (generation_config.json) --------------------------------------

# The sampling fields of a Hugging Face `generation_config.json` that become a server's default
# sampling parameters, with transformers' own defaults for them. NOTE: a field equal to its
# transformers default says nothing about the model and is dropped (as `GenerationConfig.
# to_diff_dict` drops it): `"top_k": 50` in a file is not a recommendation. `do_sample` is not read.
GENERATION_SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0, "top_p": 1.0, "top_k": 50, "min_p": None, "repetition_penalty": 1.0,
    "max_new_tokens": None,
}


class DefaultSampling(TypedDict, total=False):
    """Server-wide defaults for the sampling fields a request leaves out (`max_tokens` is HF's
    `max_new_tokens`)."""
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    max_tokens: int


def read_generation_config(folder: str) -> dict[str, Any] | None:
    """`folder/generation_config.json` as a dict; None when the folder has none."""
    path = os.path.join(folder, "generation_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return values


def default_sampling(generation_config: dict[str, Any] | None,
                     overrides: dict[str, Any] | None = None) -> DefaultSampling:
    """The default sampling parameters a generation config recommends, then `overrides` (kept
    even where they equal a transformers default). Values are type-checked here; their ranges are
    checked by `SamplingParams.validate` where the model is known."""
    chosen = {k: v for k, v in (generation_config or {}).items()
              if k in GENERATION_SAMPLING_DEFAULTS and v is not None
              and v != GENERATION_SAMPLING_DEFAULTS[k]}
    for k, v in (overrides or {}).items():
        if k not in GENERATION_SAMPLING_DEFAULTS:
            raise ConfigError(f"generation config override {k!r} is not a sampling field "
                              f"({', '.join(GENERATION_SAMPLING_DEFAULTS)})")
        if v is not None:
            chosen[k] = v
    out: DefaultSampling = {}
    for k, v in chosen.items():
        integer = k in ("top_k", "max_new_tokens")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                integer and not float(v).is_integer()):
            raise ConfigError(f"generation config field {k!r} must be "
                              f"{'an integer' if integer else 'a number'}, got {v!r}")
        out["max_tokens" if k == "max_new_tokens" else k] = int(v) if integer else float(v)
    return out
