"""The jitted model step: forward over flat tokens + paged-KV write + logits at chosen rows.

`make_step(graphdef, backend)` returns
    step(state, kv_caches, input_ids [T], positions [T], meta, logits_indices [S])
        -> (logits [S, V] float32, kv_caches)
with the KV cache donated, so XLA updates it in place. The model's parameters are passed as a
state pytree (not closed over) so one compiled executable serves any weights of the same shapes.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from jaxserve.attention import AttentionBackend, AttentionMetadata


def make_step(graphdef: nnx.GraphDef, backend: AttentionBackend) -> Callable:
    def step(state, kv_caches, input_ids: jax.Array, positions: jax.Array,
             meta: AttentionMetadata, logits_indices: jax.Array):
        model = nnx.merge(graphdef, state)
        hidden, kv_caches = model(input_ids, positions, kv_caches, meta, backend)
        logits = model.compute_logits(hidden[logits_indices])
        return logits, kv_caches

    return jax.jit(step, donate_argnums=(1,))
