"""Step shape buckets: every step is padded to one (token count, sequence count) pair from this
table, so all shapes are known, and compiled, before serving starts.

Powers of two from a floor, looked up with `bisect`. A pair needs seqs <= tokens (each scheduled
sequence feeds at least one token).
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
                 token_floor: int = 1, seq_floor: int = 1) -> tuple[list[int], list[int]]:
    seqs = powers_of_two(seq_floor, max_num_seqs)
    tokens = powers_of_two(token_floor, max_num_batched_tokens)
    return tokens, seqs


def bucket_pairs(token_buckets: list[int], seq_buckets: list[int]) -> list[tuple[int, int]]:
    pairs = []
    for t in token_buckets:
        for s in seq_buckets:
            if s <= t:
                pairs.append((t, s))
    return pairs


def pick_bucket(n: int, buckets: list[int]) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
