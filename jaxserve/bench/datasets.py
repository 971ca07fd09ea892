"""Benchmark workloads, as `vllm bench` builds them: random token prompts or a ShareGPT JSON file.

A `BenchRequest` carries the prompt both as token ids (offline benchmarks feed them directly) and,
when a tokenizer is known, as text (the HTTP benchmark sends text for ShareGPT, token ids for the
random dataset so the server sees exactly `input_len` tokens).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np


@dataclasses.dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int
    prompt_text: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab_size: int, *,
                    range_ratio: float = 0.0, seed: int = 0,
                    special_ids: tuple[int, ...] = ()) -> list[BenchRequest]:
    """Uniform random token ids. `range_ratio` r draws each length from [len*(1-r), len*(1+r)]."""
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, input_len and output_len must be >= 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)

    def lengths(n: int) -> np.ndarray:
        lo, hi = max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio)))
        return rng.integers(lo, hi + 1, num_prompts)

    ins, outs = lengths(input_len), lengths(output_len)
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, np.int64))
    return [BenchRequest(rng.choice(allowed, int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]


def sharegpt_requests(path: str, num_prompts: int, tokenizer: Any, *, seed: int = 0,
                      output_len: int | None = None, max_prompt_len: int = 1024,
                      max_total_len: int = 2048) -> list[BenchRequest]:
    """First human turn as the prompt, the first reply's token count as the output length (or
    `output_len`), with vLLM's filters: prompt and reply >= 4 tokens, prompt <= 1024, sum <= 2048."""
    if tokenizer is None:
        raise ValueError("the ShareGPT dataset needs a tokenizer; this model has none")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    out: list[BenchRequest] = []
    for i in order:
        conv = data[i].get("conversations") if isinstance(data[i], dict) else None
        if not conv or len(conv) < 2:
            continue
        prompt, reply = conv[0].get("value"), conv[1].get("value")
        if not isinstance(prompt, str) or not isinstance(reply, str):
            continue
        ids = tokenizer.encode(prompt)
        n_out = output_len or len(tokenizer.encode(reply))
        if len(ids) < 4 or n_out < 4 or len(ids) > max_prompt_len or len(ids) + n_out > max_total_len:
            continue
        out.append(BenchRequest(ids, n_out, prompt))
        if len(out) == num_prompts:
            break
    if not out:
        raise ValueError(f"{path}: no conversation passed the length filters")
    return out
