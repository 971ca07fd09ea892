"""Save loaded parameters as an orbax checkpoint once, restore them later (sharded) fast.

Layout of a converted directory:
    config.json              the HF config the parameters belong to
    jaxserve_checkpoint.json marker: {"format": "orbax", "dtype": ...}
    params/                  orbax StandardCheckpointer tree (our layout, target dtype)
    tokenizer files          when the source had a tokenizer
Restoring reads straight into the target shardings (each device reads only its shard).
"""

from __future__ import annotations

import json
import os

import jax
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.loading.errors import WeightLoadError
from jaxserve.models.layers import CausalLM
from jaxserve.models.registry import abstract_model

MARKER = "jaxserve_checkpoint.json"
# parameter layout version written into the marker; 2 = fused q/k/v and gate/up weights
LAYOUT = 2


def is_orbax_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_orbax(model: CausalLM, hf_config: dict, out_dir: str, *, tokenizer=None) -> str:
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    params_dir = os.path.join(out_dir, "params")
    if os.path.exists(params_dir):
        raise FileExistsError(f"{params_dir} already exists; choose an empty output directory")
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(state)
    dtype = str(leaves[0].dtype)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, state)
        ckptr.wait_until_finished()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": "orbax", "dtype": dtype, "layout": LAYOUT}, f)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def restore_orbax(path: str, cfg: ModelConfig, *, dtype, shardings=None) -> CausalLM:
    import orbax.checkpoint as ocp

    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    saved_dtype = marker["dtype"]
    if marker.get("layout", 1) != LAYOUT:
        raise WeightLoadError(f"this checkpoint has parameter layout {marker.get('layout', 1)} "
                              f"(written by an older jaxserve); this version reads layout {LAYOUT}: "
                              f"convert the original checkpoint again with `jaxserve convert`",
                              file=os.path.join(path, MARKER))
    graphdef, state = nnx.split(abstract_model(cfg, dtype=saved_dtype))
    target = nnx.to_pure_dict(state)

    def abstract(path_keys, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path_keys)
        sharding = shardings(keys, leaf.shape) if shardings else None
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    target = jax.tree_util.tree_map_with_path(abstract, target)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(path, "params"), target)
    except Exception as e:
        raise WeightLoadError(f"could not restore orbax parameters ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})", file=os.path.join(path, "params")) from None
    restored = jax.tree.map(lambda x: x.astype(dtype) if x.dtype != dtype else x, restored)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
