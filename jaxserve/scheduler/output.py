"""The scheduler -> runner contract: plain dataclasses, one comment per field."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxserve.sampling.params import SamplingParams


@dataclasses.dataclass
class NewSequence:
    """A sequence the runner has not seen since it was (re)admitted: it sets up its sampling state."""
    request_id: str
    prompt_token_ids: list[int]     # original prompt (repetition penalty covers it)
    output_token_ids: list[int]     # tokens already generated (non-empty after a preemption)
    params: SamplingParams
    seed: int                       # the request's sampling seed
    eos_token_ids: tuple[int, ...]  # masked out (with stop_token_ids) until min_tokens is reached
    slot_row: Any = None            # its sampling values in the runner's row dtypes, converted
                                    # when it was added (None: the runner converts them)


@dataclasses.dataclass(slots=True)
class ScheduledSequence:
    request_id: str
    token_ids: list[int]            # tokens fed this step: positions num_computed .. +len-1
    num_computed_tokens: int        # tokens already in the KV cache before this step
    block_table: Sequence[int]      # the sequence's pages, in order (int32 array, not a copy)
    sample: bool                    # True when this step reaches the last known token -> sample
    num_generated: int              # output tokens so far (seeded sampling folds this in)


@dataclasses.dataclass
class SchedulerOutput:
    seqs: list[ScheduledSequence]          # in batch order
    new_seqs: list[NewSequence]            # subset of seqs seen for the first time
    released_ids: list[str]                # finished/aborted/preempted since the last step
    num_tokens: int                        # sum of len(token_ids)
    num_preempted: int = 0                 # preemptions performed while building this step

    @property
    def is_empty(self) -> bool:
        return not self.seqs
