"""Turn a stream of named checkpoint tensors into a model, one tensor at a time.

The model skeleton comes from `nnx.eval_shape` (no memory). Each incoming tensor is looked up in the
family's `hf_weight_map`, shape-checked, converted to our layout on the host, placed on its device
(or its shards) and cast there to the target dtype; then the host copy is dropped. A fused
parameter (q/k/v, gate/up) is assembled on the host from its parts and placed once its last part
arrives. Unknown names, duplicates, shape mismatches and missing tensors raise `WeightLoadError`
naming file and tensor.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.loading.errors import WeightLoadError
from jaxserve.models.layers import CausalLM
from jaxserve.models.registry import abstract_model, get_model_class

# (path in the param tree, global shape) -> the sharding the array should get
ShardingFn = Callable[[tuple, tuple[int, ...]], jax.sharding.Sharding | None]

TensorStream = Iterable[tuple[str, str, np.ndarray]]  # (file, tensor name, array)


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def place(host: np.ndarray, dtype, sharding: jax.sharding.Sharding | None) -> jax.Array:
    arr = jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)
    return arr.astype(dtype) if arr.dtype != dtype else arr


def model_from_tensors(cfg: ModelConfig, tensors: TensorStream, *, dtype=jnp.bfloat16,
                       shardings: ShardingFn | None = None, source: str = "checkpoint",
                       progress: bool = False) -> CausalLM:
    cls = get_model_class(cfg.architecture)
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype))
    pure = nnx.to_pure_dict(state)
    wmap = cls.hf_weight_map(cfg)
    done: dict[str, str] = {}
    parts_left: dict[tuple, int] = {}
    for spec in wmap.values():
        if spec.index is not None:
            parts_left[spec.path] = parts_left.get(spec.path, 0) + 1
    assembling: dict[tuple, np.ndarray] = {}   # fused parameter -> host buffer being filled
    bar = None
    if progress:
        import sys

        from tqdm import tqdm
        bar = tqdm(total=len(wmap), desc="loading weights", unit="tensor", file=sys.stderr)
    for file, name, arr in tensors:
        spec = wmap.get(name)
        if spec is None:
            if cls.hf_ignored(name, cfg):
                continue
            raise WeightLoadError(f"unknown tensor name for {cfg.architecture}", file=file, tensor=name)
        if name in done:
            raise WeightLoadError(f"tensor appears twice (also in {done[name]!r})", file=file, tensor=name)
        if tuple(arr.shape) != spec.hf_shape:
            raise WeightLoadError(f"shape {tuple(arr.shape)} does not match the config's "
                                  f"{spec.hf_shape}", file=file, tensor=name)
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
            if "bfloat16" not in str(arr.dtype) and "float8" not in str(arr.dtype):
                raise WeightLoadError(f"unexpected dtype {arr.dtype}", file=file, tensor=name)
        target = _get(pure, spec.path)
        host = spec.convert(np.asarray(arr))
        done[name] = file
        if bar is not None:
            bar.update(1)
        if spec.index is not None:
            buf = assembling.get(spec.path)
            if buf is None:
                buf = assembling[spec.path] = np.zeros(target.shape, host.dtype)
            assert buf[spec.index].shape == host.shape, (name, host.shape, buf[spec.index].shape)
            buf[spec.index] = host
            parts_left[spec.path] -= 1
            if parts_left[spec.path]:
                continue
            host = assembling.pop(spec.path)
        assert host.shape == target.shape, (name, host.shape, target.shape)
        sharding = shardings(spec.path, target.shape) if shardings else None
        _set(pure, spec.path, place(host, dtype, sharding))
    if bar is not None:
        bar.close()
    missing = [n for n in wmap if n not in done]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise WeightLoadError(f"{source} is missing {len(missing)} tensor(s) the config requires: "
                              f"{shown}{more}")
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
