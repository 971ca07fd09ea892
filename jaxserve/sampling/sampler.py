"""Batched on-device sampling, each row with its own parameters, inside the jitted step.

Per-request state that would be too large to send every step lives on the device in "slots"
(one row per concurrently running sequence, R = max_num_seqs), set once when a sequence is
(re)admitted and updated in place by every sampled token:
    out_counts  [R, V] int32   how often each token was generated (presence/frequency penalties)
    prompt_mask [R, V] bool    tokens of the prompt (the repetition penalty covers prompt + output)
    bias        [R, V] f32     logit_bias
    stop_mask   [R, V] bool    EOS + stop_token_ids, masked out while min_tokens is not reached
Per step, small [S] arrays carry the scalar parameters of each row.

Order of operations (as vLLM): penalties -> logit bias -> min_tokens mask -> greedy argmax, or
temperature -> top-k -> top-p -> min-p -> Gumbel-max draw. Logprobs are those of the raw model
distribution. Randomness for row i is `fold_in(fold_in(key0, seed_i), num_generated_i)`, so a
seeded request draws the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NUM_TOP_LOGPROBS = 20  # static: top-k logprobs computed for every row (max a request may ask)
_NEG = -1e30


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    out_counts: jax.Array   # [R, V] int32
    prompt_mask: jax.Array  # [R, V] bool
    bias: jax.Array         # [R, V] float32
    stop_mask: jax.Array    # [R, V] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingTensors:
    slot: jax.Array          # [S] int32  state row of each batch row
    valid: jax.Array         # [S] bool   row samples a real token this step
    temperature: jax.Array   # [S] f32    0 = greedy
    top_k: jax.Array         # [S] int32  0 = off
    top_p: jax.Array         # [S] f32
    min_p: jax.Array         # [S] f32
    presence: jax.Array      # [S] f32
    frequency: jax.Array     # [S] f32
    repetition: jax.Array    # [S] f32
    seed: jax.Array          # [S] uint32
    num_generated: jax.Array  # [S] int32
    block_stop: jax.Array    # [S] bool   min_tokens not reached: EOS/stop ids forbidden

    @staticmethod
    def host(num_rows: int) -> dict[str, np.ndarray]:
        """Neutral numpy rows (padding: greedy, no penalties) for the runner to fill."""
        return dict(slot=np.zeros(num_rows, np.int32), valid=np.zeros(num_rows, bool),
                    temperature=np.zeros(num_rows, np.float32), top_k=np.zeros(num_rows, np.int32),
                    top_p=np.ones(num_rows, np.float32), min_p=np.zeros(num_rows, np.float32),
                    presence=np.zeros(num_rows, np.float32), frequency=np.zeros(num_rows, np.float32),
                    repetition=np.ones(num_rows, np.float32), seed=np.zeros(num_rows, np.uint32),
                    num_generated=np.zeros(num_rows, np.int32), block_stop=np.zeros(num_rows, bool))


def init_sampler_state(num_slots: int, vocab_size: int, sharding=None) -> SamplerState:
    def make():
        return SamplerState(jnp.zeros((num_slots, vocab_size), jnp.int32),
                            jnp.zeros((num_slots, vocab_size), bool),
                            jnp.zeros((num_slots, vocab_size), jnp.float32),
                            jnp.zeros((num_slots, vocab_size), bool))
    return jax.jit(make, out_shardings=sharding)()


def _set_slot(state: SamplerState, slot, counts, prompt, bias, stop) -> SamplerState:
    return SamplerState(state.out_counts.at[slot].set(counts), state.prompt_mask.at[slot].set(prompt),
                        state.bias.at[slot].set(bias), state.stop_mask.at[slot].set(stop))


set_slot = jax.jit(_set_slot, donate_argnums=(0,))


def apply_penalties_and_bias(logits: jax.Array, state: SamplerState, t: SamplingTensors) -> jax.Array:
    counts = state.out_counts[t.slot]                         # [S, V]
    seen = (counts > 0) | state.prompt_mask[t.slot]
    rep = t.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0)
    logits = logits + state.bias[t.slot]
    return jnp.where(state.stop_mask[t.slot] & t.block_stop[:, None], _NEG, logits)


def _filter_top_k_top_p(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    v = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)                # [S, V]
    k = jnp.where(t.top_k > 0, jnp.minimum(t.top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)   # [S, 1]
    ranks = jnp.arange(v)[None, :]
    sorted_desc = jnp.where(ranks < k[:, None], sorted_desc, _NEG)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs               # mass strictly above each rank
    keep = (before < t.top_p[:, None]) & (ranks < k[:, None])
    n_keep = jnp.maximum(keep.sum(-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where((logits >= kth) & (logits >= pth), logits, _NEG)


def sample(logits: jax.Array, state: SamplerState, t: SamplingTensors):
    """logits [S, V] f32 -> (tokens [S], chosen logprob [S], top ids [S, K], top logprobs [S, K],
    updated state)."""
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    logits = apply_penalties_and_bias(logits, state, t)
    greedy_tok = jnp.argmax(logits, axis=-1)

    scaled = logits / jnp.maximum(t.temperature, 1e-6)[:, None]
    needs_sort = jnp.any(((t.top_k > 0) | (t.top_p < 1.0)) & (t.temperature > 0))
    scaled = jax.lax.cond(needs_sort, lambda x: _filter_top_k_top_p(x, t), lambda x: x, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    scaled = jnp.where(probs >= t.min_p[:, None] * probs.max(-1, keepdims=True), scaled, _NEG)

    def gumbel(seed, step, v=logits.shape[-1]):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed), step)
        return jax.random.gumbel(key, (v,), jnp.float32)

    noise = jax.vmap(gumbel)(t.seed, t.num_generated)
    drawn = jnp.argmax(scaled + noise, axis=-1)
    tokens = jnp.where(t.temperature > 0, drawn, greedy_tok).astype(jnp.int32)

    chosen_lp = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(raw_logprobs, min(NUM_TOP_LOGPROBS, logits.shape[-1]))
    counts = state.out_counts.at[t.slot, tokens].add(t.valid.astype(jnp.int32))
    state = dataclasses.replace(state, out_counts=counts)
    return tokens, chosen_lp, top_ids.astype(jnp.int32), top_lp, state
