"""Model registry: Hugging Face `architectures` name -> model class, and model construction.

Unknown architectures fail loudly with the list of supported ones; nothing falls back silently.
Named presets (`configs` of well-known models in `presets/*.json`, in HF config.json form) let
benchmarks and shape checks build full-size models without downloading anything.
"""

from __future__ import annotations

import json
from importlib import resources

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.layers import CausalLM
from jaxserve.models.llama import LlamaForCausalLM
from jaxserve.models.mistral import MistralForCausalLM
from jaxserve.models.qwen2 import Qwen2ForCausalLM
from jaxserve.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture has no jaxserve implementation."""


def get_model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"model architecture {architecture!r} is not supported by jaxserve; supported "
            f"architectures: {', '.join(sorted(MODEL_REGISTRY))}") from None


def create_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, seed: int = 0) -> CausalLM:
    """Build a model with random weights of the real shapes (concrete arrays)."""
    return get_model_class(cfg.architecture)(cfg, dtype=dtype, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.bfloat16) -> CausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes, no memory."""
    cls = get_model_class(cfg.architecture)
    return nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def count_params(model: CausalLM) -> int:
    state = nnx.state(model, nnx.Param)
    return sum(int(x.size) for x in jax.tree.leaves(state))


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("jaxserve.models").joinpath("presets").iterdir()
                  if p.name.endswith(".json"))


def preset_hf_config(name: str) -> dict:
    path = resources.files("jaxserve.models").joinpath("presets", f"{name}.json")
    if not path.is_file():
        raise UnsupportedModelError(f"no preset named {name!r}; presets: {', '.join(list_presets())}")
    return json.loads(path.read_text())


def preset_config(name: str) -> ModelConfig:
    return ModelConfig.from_hf_config(preset_hf_config(name))
