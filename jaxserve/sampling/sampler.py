"""Batched on-device sampling, each row with its own parameters, inside the jitted step.

Per-request state that would be too large to send every step lives on the device in "slots"
(one row per concurrently running sequence, R = max_num_seqs), set once when a sequence is
(re)admitted and updated in place by every sampled token:
    out_counts  [R, V] int32   how often each token was generated (presence/frequency penalties)
    prompt_mask [R, V] bool    tokens of the prompt (the repetition penalty covers prompt + output)
    bias        [R, V] f32     logit_bias
    stop_mask   [R, V] bool    EOS + stop_token_ids, masked out while min_tokens is not reached
    last_token  [R]    int32   the token each slot sampled last (feeds the next step's placeholder)
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
    last_token: jax.Array   # [R] int32


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
                            jnp.zeros((num_slots, vocab_size), bool),
                            jnp.zeros((num_slots,), jnp.int32))
    return jax.jit(make, out_shardings=sharding)()


# Setting up admitted slots: a step's admissions go to the device as one small sparse update
# (the rows themselves are [V] wide: four dense rows per request cost ~0.9 ms of host time each,
# 0.23 s for 256 admissions on an H200 host). Entries are int32 rows (slot, token, kind, value):
FILL_COUNT, FILL_PROMPT, FILL_STOP, FILL_BIAS = range(4)   # kinds; value = f32 bits for FILL_BIAS
FILL_SIZES = (1024, 16384)   # entries per call (static shapes, compiled at warm-up)


def fill_slots(state: SamplerState, clear: jax.Array, entries: jax.Array) -> SamplerState:
    """Start the slots in `clear` [R] (value R: none) over with empty rows, then scatter
    `entries` [N, 4] into the rows: output-token counts (added), prompt and stop tokens (set),
    logit biases (set). Entries with slot R are padding."""
    r = state.last_token.shape[0]
    slot, tok, kind, bits = (entries[:, i] for i in range(4))

    def rows(k):
        return jnp.where(kind == k, slot, r)   # out of bounds: dropped

    # NOTE: a mask over whole rows, fused in place: scattering [R, V] of zeros by `clear` made
    # XLA stage the zeros (350 MB of temporaries at R=256, V=152k)
    cleared = jnp.zeros((r, 1), bool).at[clear, 0].set(True, mode="drop")

    def start(x, fill):
        return jnp.where(cleared, fill, x)
    counts = start(state.out_counts, 0).at[rows(FILL_COUNT), tok].add(1, mode="drop")
    prompt = start(state.prompt_mask, False).at[rows(FILL_PROMPT), tok].set(True, mode="drop")
    stop = start(state.stop_mask, False).at[rows(FILL_STOP), tok].set(True, mode="drop")
    bias = start(state.bias, 0.0).at[rows(FILL_BIAS), tok].set(
        jax.lax.bitcast_convert_type(bits, jnp.float32), mode="drop")
    return SamplerState(counts, prompt, bias, stop, state.last_token)


@dataclasses.dataclass(frozen=True)
class SlotRow:
    """A request's fixed sampling values in the dtypes of the runner's per-slot rows. Built when
    the request is added (`slot_row`), so a value that does not fit fails that request alone and
    never the engine step that admits it; the runner copies it into the request's slot."""
    values: dict[str, np.generic]   # SamplingTensors' per-slot fields, plus min_tokens and mode
    stop_ids: np.ndarray            # [N] int32  EOS + stop_token_ids, masked until min_tokens
    bias_ids: np.ndarray            # [B] int32  logit_bias keys
    bias_values: np.ndarray         # [B] f32    logit_bias values


def slot_row(params, seed: int, eos_token_ids, vocab_size: int) -> SlotRow:
    """Convert one request's sampling parameters to the slot rows' dtypes; raises OverflowError /
    FloatingPointError (never writes a wrapped or infinite value) when one does not fit."""
    p = params
    top_k = p.top_k if 0 < p.top_k < vocab_size else 0     # >= the vocabulary: no top-k
    stop = [t for t in list(eos_token_ids) + list(p.stop_token_ids) if 0 <= t < vocab_size]
    bias = p.logit_bias or {}
    with np.errstate(over="raise", invalid="raise"):
        values = dict(
            seed=np.uint32(int(seed) & 0xFFFFFFFF), temperature=np.float32(p.temperature),
            top_k=np.int32(top_k), top_p=np.float32(p.top_p), min_p=np.float32(p.min_p),
            presence=np.float32(p.presence_penalty), frequency=np.float32(p.frequency_penalty),
            repetition=np.float32(p.repetition_penalty), min_tokens=np.int32(p.min_tokens),
            mode=np.int8(SAMPLER_MODES.index(sampler_mode(
                [(p.temperature, top_k, p.top_p, p.logprobs is not None)]))))
        for k in ("temperature", "top_p", "min_p", "presence", "frequency", "repetition"):
            if not np.isfinite(values[k]):
                raise FloatingPointError(f"{k} {values[k]} is not finite in float32")
        return SlotRow(values, np.asarray(stop, np.int32),
                       np.fromiter(bias.keys(), np.int32, len(bias)),
                       np.fromiter(bias.values(), np.float32, len(bias)))


class SlotFills:
    """Host side of `fill_slots`: collects the admissions of a step, then cuts them into calls of
    the compiled sizes (the first call clears every admitted slot, so a long prompt can span
    several calls)."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._clear: list[int] = []
        self._parts: list[np.ndarray] = []

    def add(self, slot: int, prompt, output, stop, bias: dict[int, float] | None) -> None:
        bias = bias or {}
        self.add_row(slot, prompt, output, np.asarray(stop, np.int32),
                     np.fromiter(bias.keys(), np.int32, len(bias)),
                     np.fromiter(bias.values(), np.float32, len(bias)))

    def add_row(self, slot: int, prompt, output, stop: np.ndarray, bias_ids: np.ndarray,
                bias_values: np.ndarray) -> None:
        # the token lists are converted before anything is recorded: a failure leaves no trace
        parts = []
        for kind, toks in ((FILL_PROMPT, prompt), (FILL_COUNT, output), (FILL_STOP, stop)):
            toks = np.asarray(toks, np.int32)
            if toks.size:
                part = np.empty((toks.size, 4), np.int32)
                part[:, 0], part[:, 1], part[:, 2], part[:, 3] = slot, toks, kind, 0
                parts.append(part)
        if bias_ids.size:
            part = np.empty((bias_ids.size, 4), np.int32)
            part[:, 0], part[:, 2] = slot, FILL_BIAS
            part[:, 1], part[:, 3] = bias_ids, bias_values.view(np.int32)
            parts.append(part)
        self._clear.append(slot)
        self._parts.extend(parts)

    def take(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(clear [R], entries [size, 4]) per call, in order; empties the collection."""
        if not self._clear:
            return []
        clear = np.full(self.num_slots, self.num_slots, np.int32)
        clear[:len(self._clear)] = self._clear
        entries = (np.concatenate(self._parts) if self._parts else np.empty((0, 4), np.int32))
        self._clear, self._parts = [], []
        calls, big = [], FILL_SIZES[-1]
        for start in range(0, max(len(entries), 1), big):
            chunk = entries[start:start + big]
            size = next(n for n in FILL_SIZES if n >= len(chunk))
            padded = np.zeros((size, 4), np.int32)
            padded[:, 0] = self.num_slots
            padded[:len(chunk)] = chunk
            calls.append((clear, padded))
            clear = np.full(self.num_slots, self.num_slots, np.int32)
        return calls


def apply_penalties_and_bias(logits: jax.Array, state: SamplerState, t: SamplingTensors,
                             offset=0) -> jax.Array:
    """logits [S, W] of the vocab ids [offset, offset + W) (W = V: the whole vocab)."""
    width = logits.shape[-1]

    def rows(x):   # [R, V] -> the batch's rows, these logits' columns: [S, W]
        x = x[t.slot]
        return x if width == x.shape[-1] else jax.lax.dynamic_slice_in_dim(x, offset, width, 1)
    counts = rows(state.out_counts)
    seen = (counts > 0) | rows(state.prompt_mask)
    rep = t.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - t.frequency[:, None] * counts - t.presence[:, None] * (counts > 0)
    logits = logits + rows(state.bias)
    return jnp.where(rows(state.stop_mask) & t.block_stop[:, None], _NEG, logits)


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


SAMPLER_MODES = ("greedy", "random", "full")


def sampler_mode(rows: list[tuple[float, int, float, bool]]) -> str:
    """The cheapest sampler variant that serves every row: rows are (temperature, top_k, top_p,
    wants_logprobs). "greedy" draws no noise, "random" adds the Gumbel draw and min-p, "full" adds
    the top-k/top-p sort and the top-20 logprobs."""
    mode = "greedy"
    for temperature, top_k, top_p, wants_logprobs in rows:
        if wants_logprobs or (temperature > 0 and (top_k > 0 or top_p < 1.0)):
            return "full"
        if temperature > 0:
            mode = "random"
    return mode


def sample(logits: jax.Array, state: SamplerState, t: SamplingTensors, mode: str = "full"):
    """logits [S, V] f32 -> (tokens [S], chosen logprob [S], top ids [S, K], top logprobs [S, K],
    updated state). `mode` (static, see `sampler_mode`) drops work no row needs: the top-K
    outputs are zeros unless mode is "full"."""
    if mode not in SAMPLER_MODES:
        raise ValueError(f"unknown sampler mode {mode!r}")
    raw_logprobs = jax.nn.log_softmax(logits, axis=-1)
    logits = apply_penalties_and_bias(logits, state, t)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    if mode != "greedy":
        scaled = logits / jnp.maximum(t.temperature, 1e-6)[:, None]
        if mode == "full":
            wants = ((t.top_k > 0) | (t.top_p < 1.0))[:, None]
            scaled = jnp.where(wants, _filter_top_k_top_p(scaled, t), scaled)
        probs = jax.nn.softmax(scaled, axis=-1)
        scaled = jnp.where(probs >= t.min_p[:, None] * probs.max(-1, keepdims=True), scaled, _NEG)

        def gumbel(seed, step, v=logits.shape[-1]):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed), step)
            return jax.random.gumbel(key, (v,), jnp.float32)

        noise = jax.vmap(gumbel)(t.seed, t.num_generated)
        drawn = jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)
        tokens = jnp.where(t.temperature > 0, drawn, tokens)

    chosen_lp = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
    if mode == "full":
        top_lp, top_ids = jax.lax.top_k(raw_logprobs, min(NUM_TOP_LOGPROBS, logits.shape[-1]))
        return tokens, chosen_lp, top_ids.astype(jnp.int32), top_lp, record(tokens, state, t)
    return finish_without_top(tokens, chosen_lp, state, t)


def record(tokens: jax.Array, state: SamplerState, t: SamplingTensors) -> SamplerState:
    """The state after the rows sampled `tokens` [S]: output counts and last tokens."""
    counts = state.out_counts.at[t.slot, tokens].add(t.valid.astype(jnp.int32))
    # padding rows share slot 0 with a real row: send their writes out of bounds (dropped)
    rows = jnp.where(t.valid, t.slot, state.last_token.shape[0])
    last = state.last_token.at[rows].set(tokens, mode="drop")
    return dataclasses.replace(state, out_counts=counts, last_token=last)


def finish_without_top(tokens: jax.Array, chosen_lp: jax.Array, state: SamplerState,
                       t: SamplingTensors):
    """`sample`'s outputs for a mode without top-K logprobs (zeros there)."""
    k = min(NUM_TOP_LOGPROBS, state.out_counts.shape[-1])
    zeros = jnp.zeros((tokens.shape[0], k), jnp.float32)
    return tokens, chosen_lp, zeros.astype(jnp.int32), zeros, record(tokens, state, t)


def greedy_vocab_parallel(logits: jax.Array, offset, state: SamplerState, t: SamplingTensors,
                          tp=None) -> tuple[jax.Array, jax.Array]:
    """`sample`'s greedy tokens [S] and their raw logprobs [S] from a vocab-split LM head, called
    per shard inside `shard_map` with this shard's logits [S, V / tp] of the ids from `offset`.
    Each shard reduces its slice to four numbers per row (penalised max, its id, the raw
    log-sum-exp, the raw logit at that id); the shards exchange those ([tp, S, 4],
    `TensorParallel.gather_small`) and all pick the same token, the one the whole vocab's
    argmax gives (ties to the lower id: shards hold consecutive ids, and the first shard with
    the max wins). The [S, V] logits are never gathered. tp None: an unsplit head."""
    if tp is not None and state.out_counts.shape[-1] >= 1 << 24:
        raise ValueError("greedy_vocab_parallel: ids are exchanged as float32 (vocab < 2**24)")
    pen = apply_penalties_and_bias(logits, state, t, offset)
    j = jnp.argmax(pen, axis=-1)
    mx = jnp.max(logits, axis=-1)
    lse = mx + jnp.log(jnp.sum(jnp.exp(logits - mx[:, None]), axis=-1))
    stats = jnp.stack([jnp.take_along_axis(pen, j[:, None], axis=-1)[:, 0],
                       (offset + j).astype(jnp.float32), lse,
                       jnp.take_along_axis(logits, j[:, None], axis=-1)[:, 0]], axis=-1)
    every = stats[None] if tp is None else tp.gather_small(stats)        # [tp, S, 4]
    win = jnp.argmax(every[..., 0], axis=0)                               # [S]
    pick = jnp.take_along_axis(every, win[None, :, None], axis=0)[0]      # [S, 4]
    lses = every[..., 2]
    top = lses.max(axis=0)
    total = top + jnp.log(jnp.sum(jnp.exp(lses - top), axis=0))
    return pick[:, 1].astype(jnp.int32), pick[:, 3] - total
