"""Greedy single-sequence generation over the engine's own step (paged cache, trivial page table).

Used by `jaxserve generate`, the parity tests and anyone who wants one answer without the engine.
Prefill runs the whole prompt in one step (token count padded to a power-of-two bucket so repeated
calls reuse compilations); each decode step feeds one token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.attention import build_metadata, get_backend
from jaxserve.kv_cache.cache import allocate_kv_cache
from jaxserve.models.layers import CausalLM
from jaxserve.runner.step import make_step


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class GreedyResult:
    token_ids: list[int]                     # generated tokens (stop token included if hit)
    finish_reason: str                       # "stop" | "length"
    prompt_logits: np.ndarray | None = None  # [prompt_len, V] when requested
    step_logits: list[np.ndarray] | None = None  # logits that chose each generated token


class GreedyGenerator:
    def __init__(self, model: CausalLM, *, page_size: int = 16, backend: str = "reference",
                 kv_dtype=None):
        self.cfg = model.config
        self.graphdef, self.state = nnx.split(model)
        self.page_size = page_size
        self.kv_dtype = kv_dtype or jax.tree.leaves(self.state)[0].dtype
        self.step = make_step(self.graphdef, get_backend(backend))

    def generate(self, prompt_ids: list[int], max_new_tokens: int, *,
                 stop_token_ids: Iterable[int] = (), return_logits: bool = False,
                 on_token: Callable[[int], None] | None = None) -> GreedyResult:
        if not prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if max(prompt_ids) >= self.cfg.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        total = len(prompt_ids) + max_new_tokens
        pages_needed = -(-total // self.page_size)
        max_pages = _pow2_at_least(pages_needed, 4)
        kv = allocate_kv_cache(self.cfg, max_pages + 1, self.page_size, self.kv_dtype)
        table = list(range(1, pages_needed + 1))  # page 0 is the null page
        stops = set(stop_token_ids)

        def run(tokens: list[int], computed: int, all_logits: bool):
            nonlocal kv
            n = len(tokens)
            bucket = 1 if n == 1 else _pow2_at_least(n, 16)
            meta, pos = build_metadata([(table, computed, n)], block_size=self.page_size,
                                       num_tokens=bucket, num_seqs=1, max_blocks_per_seq=max_pages)
            ids = np.zeros(bucket, np.int32)
            ids[:n] = tokens
            rows = np.arange(bucket, dtype=np.int32) if all_logits else np.array([n - 1], np.int32)
            logits, kv = self.step(self.state, kv, ids, pos, meta, rows)
            return logits[:n] if all_logits else logits

        logits = run(list(prompt_ids), 0, return_logits)
        prompt_logits = np.asarray(logits) if return_logits else None
        last = logits[-1]
        out: list[int] = []
        step_logits: list[np.ndarray] = []
        finish = "length"
        for i in range(max_new_tokens):
            tok = int(jnp.argmax(last))
            if return_logits:
                step_logits.append(np.asarray(last))
            out.append(tok)
            if on_token is not None:
                on_token(tok)
            if tok in stops:
                finish = "stop"
                break
            if i + 1 < max_new_tokens:
                last = run([tok], len(prompt_ids) + i, False)[0]
        return GreedyResult(out, finish, prompt_logits, step_logits if return_logits else None)
