"""A request as the scheduler sees it: token ids, how many are in the KV cache, and its state."""

from __future__ import annotations

import enum
from typing import Any, Sequence

from jaxserve.sampling.params import SamplingParams

PLACEHOLDER = -1   # a token sampled by a step still in flight: the runner fills it in on the device


class KnownTokens(Sequence[int]):
    """A request's prompt followed by its generated tokens, read in place: the scheduler slices a
    step's few tokens out of it every step, and copying the whole context each time cost O(context)
    per sequence per step."""

    __slots__ = ("_prompt", "_output")

    def __init__(self, prompt: list[int], output: list[int]):
        self._prompt, self._output = prompt, output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    def __getitem__(self, i):
        n = len(self._prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return list(self)[i]
            if stop <= n:
                return self._prompt[start:stop]
            if start >= n:
                return self._output[start - n : stop - n]
            return self._prompt[start:] + self._output[: stop - n]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._prompt[i] if i < n else self._output[i - n]

    def __iter__(self):
        yield from self._prompt
        yield from self._output


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 eos_token_ids: tuple[int, ...] = (), arrival: float = 0.0,
                 leader: "Request | None" = None, seed: int = 0, slot_row: Any = None):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival = arrival
        # NOTE: n > 1 siblings wait for their leader's prompt so they can share its cached blocks
        self.leader = leader
        self.seed = seed                   # per-request sampling seed (explicit or drawn)
        self.slot_row = slot_row           # opaque to the scheduler: handed to the runner
        self.num_computed_tokens = 0       # tokens whose K/V are in the cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # tokens this request samples in steps already scheduled but not yet returned
        self.num_placeholders = 0

    @property
    def known_tokens(self) -> KnownTokens:
        """The prompt followed by the generated tokens (a view; `list()` it for a copy)."""
        return KnownTokens(self.prompt_token_ids, self.output_token_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of the known tokens followed by one PLACEHOLDER per token still
        being sampled, copying only those tokens."""
        p, o = self.prompt_token_ids, self.output_token_ids
        k = len(p) + len(o)
        if start >= k:            # a decode feeding the token still in flight
            return [PLACEHOLDER] * (stop - start)
        return KnownTokens(p, o)[start:min(stop, k)] + [PLACEHOLDER] * (stop - max(start, k))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_placeholders

    @property
    def num_generated(self) -> int:
        return len(self.output_token_ids) + self.num_placeholders

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, computed={self.num_computed_tokens}"
                f"/{self.num_tokens})")
