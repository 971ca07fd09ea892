"""A request as the scheduler sees it: token ids, how many are in the KV cache, and its state."""

from __future__ import annotations

import enum

from jaxserve.sampling.params import SamplingParams

PLACEHOLDER = -1   # a token sampled by a step still in flight: the runner fills it in on the device


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 eos_token_ids: tuple[int, ...] = (), arrival: float = 0.0,
                 leader: "Request | None" = None, seed: int = 0):
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.eos_token_ids = tuple(eos_token_ids)
        self.arrival = arrival
        # NOTE: n > 1 siblings wait for their leader's prompt so they can share its cached blocks
        self.leader = leader
        self.seed = seed                   # per-request sampling seed (explicit or drawn)
        self.num_computed_tokens = 0       # tokens whose K/V are in the cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # tokens this request samples in steps already scheduled but not yet returned
        self.num_placeholders = 0

    @property
    def known_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        """Known tokens followed by one PLACEHOLDER per token still being sampled."""
        return self.known_token_ids + [PLACEHOLDER] * self.num_placeholders

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
