"""Embeddings: the served model's final hidden states (after the final norm), pooled per input.

The `Embedder` runs beside the generation engine and shares its weights: it splits the engine's
loaded NNX model into graph + parameter arrays, and those arrays are the very ones the engine's
steps read (no second copy). What it owns is small: a private paged KV cache and one jitted
forward, so it never touches the engine's scheduler, block pool or KV cache, and the engine's
step thread runs on undisturbed (both dispatch to the same device; JAX orders the work).

One call embeds any number of inputs:
  * inputs are sorted longest first and packed into forward calls of at most `max_tokens_per_call`
    tokens and `max_seqs_per_call` sequences, as flat ragged tokens with attention metadata, padded
    to a power-of-two token bucket (`scheduler.buckets`). The jitted forward compiles once per
    bucket, on the bucket's first use (the embedder is built on the first embedding request; a
    generation-only server pays nothing), so a handful of executables ever exist.
  * an input longer than a call is fed in chunks through the KV cache, as the engine's chunked
    prefill does: its earlier chunks' keys/values stay in the cache and the later chunks attend to
    them. Packing keeps such an input alone at the start of its calls (a new call starts when the
    next input does not fit whole), so at most one input spans calls at any time and it always
    sits in row 0.
  * pooling is a weighted sum per sequence on the device, [T, D] -> [S, D]: the host puts the
    weights on the tokens (MEAN: 1/n on each of the input's n tokens; LAST: 1 on its last; CLS: 1
    on its first), so all three are one segment-sum, exact across chunks: row 0 adds the sum its
    earlier chunks left (`carry`, kept on the device). A finished row is then L2-normalized there
    (when asked), and only [S, D] float32 comes back to the host.

Page layout of the private cache: page 0 is the null page; pages 1..M hold the input that spans
calls (M = pages of the longest input allowed, `max_input_len`: max_model_len, capped at
DEFAULT_MAX_INPUT_LEN unless set); the pages after them are handed out per call to the inputs that
fit in it. Size: (max_input_len + max_tokens_per_call) tokens + one page per sequence, allocated on
the first call.

Under a tensor-parallel mesh the forward is one GSPMD program over the sharded weights (XLA
inserts the collectives) with the portable attention; the KV cache is sharded over kv heads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.attention import AttentionBackend, ReferenceBackend, build_metadata, get_backend
from jaxserve.engine.outputs import InvalidRequestError
from jaxserve.kv_cache.cache import allocate_kv_cache
from jaxserve.runner.compile import _LOWERING_EVENT
from jaxserve.scheduler.buckets import make_buckets, pick_bucket

POOLING_TYPES = ("LAST", "MEAN", "CLS")
# The longest input embedded unless configured otherwise (and never above max_model_len): the
# private KV cache holds one such input, so a 128K-token max_model_len would otherwise cost an
# 8B model 16 GiB on the first embedding request. OpenAI's embedding models stop at 8191 tokens.
DEFAULT_MAX_INPUT_LEN = 8192


def input_limit(max_model_len: int, max_input_len: int | None = None) -> tuple[int, str]:
    """(the longest input to embed, what that bound is called in error messages)."""
    n = min(max_input_len or DEFAULT_MAX_INPUT_LEN, max_model_len)
    return n, "max_model_len" if n == max_model_len else "the embedding input limit"


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    """How an input's hidden states become one vector (vLLM's `--pooler-config` names).

    LAST + normalize is vLLM's default when a causal LM serves embeddings: a decoder's last
    position is the only one that has seen the whole input."""
    pooling_type: str = "LAST"     # LAST | MEAN | CLS (first token)
    normalize: bool = True         # L2-normalize the pooled vector

    def __post_init__(self):
        kind = self.pooling_type.upper() if isinstance(self.pooling_type, str) else None
        if kind not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got "
                             f"{self.pooling_type!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be a boolean, got {self.normalize!r}")
        object.__setattr__(self, "pooling_type", kind)

    @classmethod
    def parse(cls, value: "str | dict | PoolerConfig | None") -> "PoolerConfig":
        """From a flag: JSON as vLLM's `--pooler-config '{"pooling_type": "MEAN", "normalize":
        false}'`, a bare pooling type (`mean`), a dict, or None (the defaults)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        if isinstance(value, str):
            text = value.strip()
            if not text.startswith("{"):
                return cls(pooling_type=text)
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"pooler config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("pooler config must be a JSON object")
        unknown = set(value) - {"pooling_type", "normalize"}
        if unknown:
            raise ValueError(f"unknown pooler config keys: {', '.join(sorted(unknown))} "
                             "(known: pooling_type, normalize)")
        return cls(**value)


# -- compiles made by embedding calls ------------------------------------------------------------
# The engine counts every lowering in the process after its warm-up (`compiles_after_warmup`,
# which steady serving keeps at 0). The embedder's buckets compile on first use by design; they are
# counted here, per embedder, by marking the thread that runs an embedding call, so the server can
# report them apart.

_active = threading.local()
_listener_lock = threading.Lock()
_listener_installed = False


def _on_event(event: str, duration: float, **kwargs) -> None:
    owner = getattr(_active, "embedder", None)
    if owner is not None and event == _LOWERING_EVENT:
        owner.lowerings += 1


def _install_listener() -> None:
    global _listener_installed
    with _listener_lock:
        if not _listener_installed:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listener_installed = True


def check_token_inputs(inputs: Sequence[Sequence[int]], vocab_size: int, max_len: int,
                       field: str = "input", limit: str = "max_model_len") -> None:
    """Every input non-empty, at most `max_len` tokens (`limit` names that bound), every id in
    [0, vocab_size); else InvalidRequestError naming `field` and the input's index."""
    for i, ids in enumerate(inputs):
        n = len(ids)
        if n == 0:
            raise InvalidRequestError(field, f"input {i} is empty")
        if n > max_len:
            raise InvalidRequestError(field, f"input {i} has {n} tokens, more than the {max_len} "
                                             f"this server embeds ({limit})")
        arr = ids if isinstance(ids, np.ndarray) else None
        if arr is not None and arr.dtype.kind in "iu":
            bad = arr[(arr < 0) | (arr >= vocab_size)].tolist()
        else:
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError(field, f"input {i} must be token ids (integers)")
            bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(field, f"token id {int(bad[0])} is outside the vocabulary "
                                             f"[0, {vocab_size})")


@dataclasses.dataclass(frozen=True)
class _Chunk:
    index: int    # which input
    start: int    # its first token fed in this call
    take: int     # tokens fed in this call


class Embedder:
    def __init__(self, model, *, max_model_len: int, block_size: int = 16,
                 max_tokens_per_call: int = 2048, max_seqs_per_call: int = 256,
                 max_input_len: int | None = None,
                 backend: str | AttentionBackend = "auto", kv_dtype=None, mesh=None):
        self.cfg = model.config
        self.hidden_size = self.cfg.hidden_size
        self.vocab_size = self.cfg.vocab_size
        if max_input_len is not None and max_input_len > max_model_len:
            raise ValueError(f"max_input_len ({max_input_len}) exceeds max_model_len "
                             f"({max_model_len})")
        self.max_input_len, self.limit_name = input_limit(max_model_len, max_input_len)
        self.block_size = block_size
        self.max_tokens = int(max_tokens_per_call)
        self.max_seqs = max(1, min(int(max_seqs_per_call), self.max_tokens))
        self.buckets = make_buckets(self.max_tokens, self.max_seqs,
                                    token_floor=min(16, self.max_tokens))
        # NOTE: the arrays are the model's own (nnx.split does not copy): the weights are shared
        # with whatever else holds this model, e.g. the generation engine's runner.
        self.graphdef, state = nnx.split(model)
        self.params, self.param_tree = jax.tree.flatten(state)
        self.kv_dtype = kv_dtype or model.embed[...].dtype
        self.span_pages = -(-self.max_input_len // block_size)          # M: the spanning input
        self.num_pages = 1 + self.span_pages + -(-self.max_tokens // block_size) + self.max_seqs
        self.mesh = mesh
        self._kv_sharding = None
        if mesh is not None:
            from jaxserve.sharding import kv_cache_sharding
            self._kv_sharding = kv_cache_sharding(mesh, self.cfg.num_kv_heads)
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self._forward = jax.jit(functools.partial(self._forward_fn, backend=self.backend),
                                donate_argnums=(1,))
        self.kv = None        # allocated by the first call
        self._zero_carry = None
        self._lock = threading.Lock()
        self.lowerings = 0    # lowerings (compiles) made by this embedder's calls
        self.num_calls = 0    # forward calls run
        _install_listener()

    @classmethod
    def for_engine(cls, engine, *, max_input_len: int | None = None) -> "Embedder":
        """An embedder over the weights of a built engine (`EngineCore`, or the data-parallel
        engine, whose replica 0 is used), with calls as large as the engine's steps. Inputs up to
        `max_input_len` tokens (default: max_model_len, at most DEFAULT_MAX_INPUT_LEN)."""
        if jax.process_count() > 1:
            raise RuntimeError("embeddings are not supported when the engine spans several "
                               "processes")
        runner = engine.runner
        max_tokens, max_seqs = runner.buckets[-1]
        backend: AttentionBackend = runner.backend
        if runner.mesh is not None and runner.mesh.devices.size > 1:
            backend = ReferenceBackend()   # one GSPMD program: kernels are not partitioned
        return cls(engine.lm.model, max_model_len=engine.max_model_len,
                   block_size=runner.block_size, max_tokens_per_call=max_tokens,
                   max_seqs_per_call=max_seqs, max_input_len=max_input_len, backend=backend,
                   kv_dtype=runner.kv_dtype, mesh=runner.mesh)

    # -- the jitted forward ----------------------------------------------------------------------
    def _forward_fn(self, params, kv, ids, positions, meta, weights, carry, normalize, *,
                    backend: AttentionBackend):
        """ids, positions [T] int32; weights [T] float32 (each token's share of its sequence's
        vector; 0 on padding); carry [D] float32 (row 0's sum from earlier calls); normalize [S]
        bool. -> (vectors [S, D] float32, row 0's raw sum [D], KV cache)."""
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self.param_tree, params))
        hidden, kv = model(ids, positions, kv, meta, backend)               # [T, D], final norm
        s = meta.seq_lens.shape[0]
        contrib = jnp.where(weights[:, None] != 0, hidden.astype(jnp.float32) * weights[:, None], 0.0)
        pooled = jax.ops.segment_sum(contrib, meta.seq_ids, num_segments=s)   # [S, D]
        pooled = pooled.at[0].add(carry)
        norm = jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True))
        out = jnp.where(normalize[:, None], pooled / jnp.maximum(norm, 1e-12), pooled)
        if self._kv_sharding is not None:
            # NOTE: pin the donated cache's layout so the next call sees the same input sharding
            kv = jax.lax.with_sharding_constraint(kv, [(self._kv_sharding,) * 2 for _ in kv])
        return out, pooled[0], kv

    # -- API -------------------------------------------------------------------------------------
    def check(self, inputs: Sequence[Sequence[int]], field: str = "input") -> None:
        """Raise InvalidRequestError (naming `field`) for an input that cannot be embedded."""
        check_token_inputs(inputs, self.vocab_size, self.max_input_len, field, self.limit_name)

    def embed(self, inputs: Sequence[Sequence[int]], *, pooling_type: str = "LAST",
              normalize: bool | Sequence[bool] = True) -> list[np.ndarray]:
        """One float32 vector [D] per input (token ids). `normalize`: one flag, or one per input.
        Thread-safe: calls run one at a time."""
        pooler = PoolerConfig(pooling_type)   # validates the name
        self.check(inputs)
        inputs = [np.asarray(x, np.int32).reshape(-1) for x in inputs]
        flags = ([bool(normalize)] * len(inputs) if isinstance(normalize, (bool, np.bool_))
                 else [bool(f) for f in normalize])
        if len(flags) != len(inputs):
            raise ValueError(f"{len(inputs)} inputs but {len(flags)} normalize flags")
        if not inputs:
            return []
        with self._lock:
            _active.embedder = self
            try:
                return self._embed(inputs, pooler.pooling_type, flags)
            finally:
                _active.embedder = None

    def plan(self, lengths: Sequence[int]) -> list[list[_Chunk]]:
        """The forward calls for inputs of these lengths, longest first (see the module doc)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        calls: list[list[_Chunk]] = []
        cur: list[_Chunk] = []
        used = 0
        for i in order:
            n = int(lengths[i])
            if cur and (used + n > self.max_tokens or len(cur) == self.max_seqs):
                calls.append(cur)
                cur, used = [], 0
            start = 0
            while n - start > self.max_tokens:     # only ever at the start of a call
                calls.append([_Chunk(i, start, self.max_tokens)])
                start += self.max_tokens
            cur.append(_Chunk(i, start, n - start))
            used += n - start
        if cur:
            calls.append(cur)
        return calls

    def _embed(self, inputs: list[np.ndarray], pooling: str, flags: list[bool]) -> list[np.ndarray]:
        if self.kv is None:
            self.kv = allocate_kv_cache(self.cfg, self.num_pages, self.block_size, self.kv_dtype,
                                        sharding=self._kv_sharding)
            self._zero_carry = jnp.zeros((self.hidden_size,), jnp.float32)
        lengths = [len(x) for x in inputs]
        pending: list[tuple[list[_Chunk], jax.Array]] = []
        carry = self._zero_carry
        for chunks in self.plan(lengths):
            out, raw0, self.kv = self._call(chunks, inputs, lengths, pooling, flags, carry)
            # row 0 continues in the next call when it did not finish here
            first = chunks[0]
            carry = raw0 if first.start + first.take < lengths[first.index] else self._zero_carry
            pending.append((chunks, out))
        result: list[np.ndarray | None] = [None] * len(inputs)
        for chunks, out in pending:
            host = np.asarray(out)
            for row, c in enumerate(chunks):
                if c.start + c.take == lengths[c.index]:
                    result[c.index] = host[row].copy()
        return result   # type: ignore[return-value]

    def _call(self, chunks: list[_Chunk], inputs, lengths, pooling: str, flags, carry):
        b = self.block_size
        total = sum(c.take for c in chunks)
        t, s = pick_bucket(total, len(chunks), self.buckets)
        seqs, next_page = [], 1 + self.span_pages
        ids = np.zeros(t, np.int32)
        weights = np.zeros(t, np.float32)
        normalize = np.zeros(s, bool)
        o = 0
        for row, c in enumerate(chunks):
            n = lengths[c.index]
            spans = c.start > 0 or c.start + c.take < n
            assert not spans or row == 0, "an input that spans calls is always row 0"
            need = -(-(c.start + c.take) // b)
            if spans:
                pages = list(range(1, 1 + need))
            else:
                pages = list(range(next_page, next_page + need))
                next_page += need
            seqs.append((pages, c.start, c.take))
            ids[o:o + c.take] = inputs[c.index][c.start:c.start + c.take]
            w = weights[o:o + c.take]
            if pooling == "MEAN":
                w[:] = 1.0 / n
            elif pooling == "LAST" and c.start + c.take == n:
                w[-1] = 1.0
            elif pooling == "CLS" and c.start == 0:
                w[0] = 1.0
            normalize[row] = flags[c.index] and c.start + c.take == n
            o += c.take
        meta, positions = build_metadata(seqs, block_size=b, num_tokens=t, num_seqs=s,
                                         max_blocks_per_seq=self.span_pages)
        self.num_calls += 1
        return self._forward(self.params, self.kv, ids, positions, meta, weights, carry, normalize)


def as_token_lists(prompts: Any, tokenizer, *, add_special_tokens: bool = True) -> list[list[int]]:
    """Library prompts (a string, {"prompt_token_ids": [...]}, or a list of those) -> token ids."""
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
                continue
            p = p.get("prompt")
        if not isinstance(p, str):
            raise InvalidRequestError("prompt", "must be a string or {'prompt_token_ids': [...]}")
        if tokenizer is None:
            raise InvalidRequestError("prompt", "this model has no tokenizer; pass prompt_token_ids")
        out.append(tokenizer.encode(p, add_special_tokens=add_special_tokens))
    return out


__all__ = ["DEFAULT_MAX_INPUT_LEN", "Embedder", "POOLING_TYPES", "PoolerConfig", "as_token_lists",
           "check_token_inputs", "input_limit"]
