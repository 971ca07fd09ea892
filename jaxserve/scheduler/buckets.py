"""Step shape buckets: every step is padded to one (token count T, sequence count S) pair from this
table, so all shapes are known, and compiled, before serving starts.

T runs over powers of two (capped at `max_num_batched_tokens`). S is tied to T: S = min(T,
max_num_seqs), which always fits (a step never has more sequences than tokens) and keeps the table
one-dimensional, so start-up compiles ~log2(max_num_batched_tokens) shapes, not a grid. The extra
padded rows cost little: the LM head and sampler are memory-bound at these row counts.
"""

from __future__ import annotations

import bisect


def powers_of_two(floor: int, cap: int) -> list[int]:
    out, b = [], max(1, floor)
    while b < cap:
        out.append(b)
        b *= 2
    out.append(cap)
    return sorted(set(out))


def make_buckets(max_num_batched_tokens: int, max_num_seqs: int,
                 token_floor: int = 1) -> list[tuple[int, int]]:
    """All (T, S) step shapes, smallest first."""
    if max_num_seqs > max_num_batched_tokens:
        raise ValueError(f"max_num_seqs ({max_num_seqs}) must be <= max_num_batched_tokens "
                         f"({max_num_batched_tokens})")
    return [(t, min(t, max_num_seqs)) for t in powers_of_two(token_floor, max_num_batched_tokens)]


def pick_bucket(num_tokens: int, num_seqs: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    i = bisect.bisect_left(buckets, (num_tokens, 0))
    if i == len(buckets):
        raise ValueError(f"{num_tokens} tokens exceed the largest bucket {buckets[-1][0]}")
    t, s = buckets[i]
    if num_seqs > s:
        raise ValueError(f"{num_seqs} sequences exceed the bucket's {s}")
    return t, s
