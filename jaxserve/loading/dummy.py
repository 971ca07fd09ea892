"""Random weights of the real shapes from a config alone (vLLM's `--load-format dummy`).

Each parameter is drawn on its device by a small jitted function per distinct (shape, dtype)
(a handful for a whole model, so compiling is quick), from a key folded with the parameter's index.
Norm scales are 1, everything else N(0, 0.02). For benchmarks and shape checks, never for answers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.layers import CausalLM
from jaxserve.models.registry import abstract_model


@functools.lru_cache(maxsize=None)
def _drawer(shape: tuple[int, ...], dtype, sharding):
    def draw(key):
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(draw, out_shardings=sharding)


def dummy_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, seed: int = 0,
                shardings=None) -> CausalLM:
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype))
    pure = nnx.to_pure_dict(state)
    base = jax.random.key(seed)
    counter = iter(range(1 << 30))

    def fill(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        sharding = shardings(keys, leaf.shape) if shardings else None
        if keys[-1] == "scale":  # RMSNorm weights
            ones = jnp.ones(leaf.shape, leaf.dtype)
            return jax.device_put(ones, sharding) if sharding is not None else ones
        return _drawer(tuple(leaf.shape), leaf.dtype, sharding)(jax.random.fold_in(base, next(counter)))

    pure = jax.tree_util.tree_map_with_path(fill, pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
