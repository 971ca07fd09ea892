"""Random weights of the real shapes from a config alone (vLLM's `--load-format dummy`).

Weights are drawn on the device inside one jitted initializer, so a 7B-shaped model appears in a
second or two without touching host memory. For benchmarks and shape checks, never for answers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxserve.config import ModelConfig
from jaxserve.models.layers import CausalLM
from jaxserve.models.registry import get_model_class


def dummy_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, seed: int = 0,
                out_shardings=None) -> CausalLM:
    cls = get_model_class(cfg.architecture)

    def init():
        return nnx.split(cls(cfg, dtype=dtype, rngs=nnx.Rngs(seed)))[1]

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(seed))))
    state = jax.jit(init, out_shardings=out_shardings)()
    return nnx.merge(graphdef, state)
