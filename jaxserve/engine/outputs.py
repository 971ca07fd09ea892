"""What generation returns (vLLM-compatible names): `RequestOutput` with one `CompletionOutput`
per sample (`n`). Outputs are cumulative: each update carries the text and tokens so far."""

from __future__ import annotations

import dataclasses


class InvalidRequestError(ValueError):
    """A request that cannot be served as given (names the field and the numbers)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class RequestFailedError(RuntimeError):
    """The engine failed one request while running it (the cause is in the server log under its
    request id); the engine itself and every other request carry on."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"{request_id}: {message}")
        self.request_id = request_id


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None          # 1 = most likely; None when outside the computed top-k
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None   # per generated token, when requested
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error" | None
    stop_reason: int | str | None = None        # the stop token id or stop string that matched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    # why the engine failed this request (its samples end with finish_reason "error"); None if not
    error: str | None = None
