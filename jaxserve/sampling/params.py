"""`SamplingParams` with vLLM's field names, and their validation.

Pure Python: the scheduler and the server import it. `validate()` is the one place that bounds
every field; it raises `SamplingParamsError` (a `ValueError`) naming the offending field. The
bounds follow vLLM's OpenAI server, narrowed to what the device rows can hold (the runner keeps
each request's values in fixed-width rows: int32 for counts and top_k, float32 for the floats):

    n                          1 .. 128
    temperature                0 (greedy) or 0.01 .. 1000; values in (0, 0.01) are raised to 0.01
                               (as vLLM does: smaller ones overflow float32 logits)
    top_p                      (0, 1]
    top_k                      -1 or 0 (off), or 1 .. 2**31 - 1 (above the vocabulary: off)
    min_p                      0 .. 1
    presence/frequency penalty -2 .. 2
    repetition_penalty         0.01 .. 100
    seed                       a 64-bit signed integer
    max_tokens                 1 .. 2**31 - 1 (and within max_model_len, checked by the engine)
    min_tokens                 0 .. max_tokens (or 2**31 - 1)
    logprobs                   0 .. 20
    stop                       at most 64 non-empty strings of at most 1024 characters
    stop_token_ids             at most 64 ids of the vocabulary
    logit_bias                 at most 1024 entries, ids of the vocabulary, biases -100 .. 100
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_LOGIT_BIAS = 1024
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MIN_TEMPERATURE = 1e-2        # smaller positive temperatures are raised to this
MAX_TEMPERATURE = 1e3
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


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
            if isinstance(value, float) and not math.isfinite(value):
                raise SamplingParamsError(field, f"must be finite, got {value}")

        def within(field: str, value: float, lo: float, hi: float) -> None:
            if not lo <= value <= hi:
                shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}..."
                raise SamplingParamsError(field, f"must be in [{lo:g}, {hi:g}], got {shown}"
                                          if isinstance(lo, float) or isinstance(hi, float) else
                                          f"must be in [{lo}, {hi}], got {shown}")

        num("n", self.n, integer=True)
        within("n", self.n, 1, MAX_N)
        num("temperature", self.temperature)
        within("temperature", self.temperature, 0, MAX_TEMPERATURE)
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = MIN_TEMPERATURE
        if self.greedy and self.n > 1:
            raise SamplingParamsError("n", "n > 1 with temperature 0 would return n identical "
                                           "greedy completions; set temperature > 0")
        num("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        num("top_k", self.top_k, integer=True)
        if not -1 <= self.top_k <= INT32_MAX:
            raise SamplingParamsError("top_k", f"must be -1 or 0 (off) or in [1, {INT32_MAX}], "
                                               f"got {self.top_k}")
        num("min_p", self.min_p)
        within("min_p", self.min_p, 0, 1)
        for f in ("presence_penalty", "frequency_penalty"):
            num(f, getattr(self, f))
            within(f, getattr(self, f), -2, 2)
        num("repetition_penalty", self.repetition_penalty)
        within("repetition_penalty", self.repetition_penalty, *REPETITION_PENALTY_RANGE)
        if self.seed is not None:
            num("seed", self.seed, integer=True)
            within("seed", self.seed, INT64_MIN, INT64_MAX)
        if self.max_tokens is not None:
            num("max_tokens", self.max_tokens, integer=True)
            within("max_tokens", self.max_tokens, 1, INT32_MAX)
        num("min_tokens", self.min_tokens, integer=True)
        within("min_tokens", self.min_tokens, 0, INT32_MAX)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"({self.min_tokens}) must be <= max_tokens "
                                                    f"({self.max_tokens})")
        if self.logprobs is not None:
            num("logprobs", self.logprobs, integer=True)
            within("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if len(self.stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", "stop strings must be non-empty strings")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise SamplingParamsError("stop", f"stop strings must be at most "
                                                  f"{MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise SamplingParamsError("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t > INT32_MAX or (
                    vocab_size is not None and t >= vocab_size):
                raise SamplingParamsError("stop_token_ids", f"{t!r} is not a token id of this model")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise SamplingParamsError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
            for t, b in self.logit_bias.items():
                if t < 0 or t > INT32_MAX or (vocab_size is not None and t >= vocab_size):
                    raise SamplingParamsError("logit_bias", f"{t} is not a token id of this model")
                num("logit_bias", b)
                if not -100 <= b <= 100:
                    raise SamplingParamsError("logit_bias", f"bias {b} for token {t} not in [-100, 100]")
        return self
