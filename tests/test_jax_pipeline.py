"""The documented way to use a jaxserve model inside your own jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.attention import build_metadata
from jaxserve.kv_cache.cache import allocate_kv_cache
from jaxserve.runner.generate import GreedyGenerator
from tests.engine_fixtures import tiny_loaded


def test_forward_inside_user_jit():
    lm = tiny_loaded(seed=11)
    from flax import nnx
    from jaxserve.attention import get_backend

    graphdef, params = nnx.split(lm.model)
    backend = get_backend("gather")  # the differentiable backend (the default one uses while_loop)

    @jax.jit
    def score(params, kv, ids, pos, meta):  # e.g. log-likelihood of a sequence, in user code
        model = nnx.merge(graphdef, params)
        hidden, kv = model(ids, pos, kv, meta, backend)
        logp = jax.nn.log_softmax(model.compute_logits(hidden), axis=-1)
        return jnp.sum(jnp.take_along_axis(logp[:-1], ids[1:, None], axis=-1)), kv

    ids = np.array([5, 9, 17, 33, 2, 8], np.int32)
    kv = allocate_kv_cache(lm.config, 4, 16, jnp.float32)
    meta, pos = build_metadata([([1], 0, len(ids))], block_size=16, num_tokens=len(ids), num_seqs=1,
                               max_blocks_per_seq=2)
    total, _ = score(params, kv, ids, pos, meta)
    # the same numbers through the library's own path
    gen = GreedyGenerator(lm.model).generate(ids.tolist(), 1, return_logits=True)
    logp = jax.nn.log_softmax(jnp.asarray(gen.prompt_logits), axis=-1)
    want = float(np.sum(np.take_along_axis(np.asarray(logp)[:-1], ids[1:, None], axis=-1)))
    assert np.isclose(float(total), want, rtol=1e-5)
    # grads flow through the params too (e.g. for fine-tuning experiments)
    g = jax.grad(lambda p: score(p, kv, ids, pos, meta)[0])(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
