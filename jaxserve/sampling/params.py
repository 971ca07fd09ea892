"""`SamplingParams` with vLLM's field names, and their validation.

Pure Python: the scheduler and the server import it. `validate()` raises `SamplingParamsError`
(a `ValueError`) naming the offending field; bounds follow vLLM's OpenAI server.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 1024


class SamplingParamsError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16        # None: up to the model's context
    min_tokens: int = 0
    logprobs: int | None = None        # number of top logprobs per token (0: just the chosen one)
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            try:
                self.logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise SamplingParamsError("logit_bias", "keys must be token ids (integers)") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        def num(field: str, value: Any, *, integer: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    integer and not isinstance(value, int)):
                raise SamplingParamsError(field, f"must be {'an integer' if integer else 'a number'}, "
                                                 f"got {type(value).__name__}")
            if not math.isfinite(value):
                raise SamplingParamsError(field, f"must be finite, got {value}")

        num("n", self.n, integer=True)
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError("n", f"must be in [1, {MAX_N}], got {self.n}")
        num("temperature", self.temperature)
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        if self.greedy and self.n > 1:
            raise SamplingParamsError("n", "n > 1 with temperature 0 would return n identical "
                                           "greedy completions; set temperature > 0")
        num("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        num("top_k", self.top_k, integer=True)
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"must be -1, 0 (off) or positive, got {self.top_k}")
        num("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        for f in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, f)
            num(f, v)
            if not -2 <= v <= 2:
                raise SamplingParamsError(f, f"must be in [-2, 2], got {v}")
        num("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.seed is not None:
            num("seed", self.seed, integer=True)
        if self.max_tokens is not None:
            num("max_tokens", self.max_tokens, integer=True)
            if self.max_tokens < 1:
                raise SamplingParamsError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        num("min_tokens", self.min_tokens, integer=True)
        if self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"({self.min_tokens}) must be <= max_tokens "
                                                    f"({self.max_tokens})")
        if self.logprobs is not None:
            num("logprobs", self.logprobs, integer=True)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise SamplingParamsError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", "stop strings must be non-empty strings")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (
                    vocab_size is not None and t >= vocab_size):
                raise SamplingParamsError("stop_token_ids", f"{t!r} is not a token id of this model")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise SamplingParamsError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
            for t, b in self.logit_bias.items():
                if t < 0 or (vocab_size is not None and t >= vocab_size):
                    raise SamplingParamsError("logit_bias", f"{t} is not a token id of this model")
                num("logit_bias", b)
                if not -100 <= b <= 100:
                    raise SamplingParamsError("logit_bias", f"bias {b} for token {t} not in [-100, 100]")
        return self
