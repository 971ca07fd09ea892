"""Per-step attention inputs shared by every attention backend.

The runner builds these arrays in numpy on the host (int32) once per step; they reach the device as
a registered pytree so that changing values never triggers a recompile (only shapes do, and shapes
come from the bucket table).

Layout of the paged KV cache, one `(k, v)` pair per layer:
    k_cache, v_cache: [P, B, K, H]   P pages ("blocks"), B tokens per page, K kv heads, H head dim
NOTE: page 0 is the null page. Padding tokens write their K/V there and padded block-table entries
point there; nothing valid is ever read from it.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array      # [T] int32  flat cache slot (page * B + offset) each token's K/V goes to
    seq_ids: jax.Array           # [T] int32  which sequence (row of block_tables) each token belongs to
    block_tables: jax.Array      # [S, M] int32  pages of each sequence, in order; padding -> page 0
    seq_lens: jax.Array          # [S] int32  KV length of each sequence after this step (0 = padding)
    query_start_loc: jax.Array   # [S+1] int32  offsets of each sequence's query tokens in the flat batch


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Static (compile-time) attention settings of one model."""
    scale: float
    sliding_window: int | None = None   # a key is visible when q_pos - k_pos < sliding_window
    soft_cap: float | None = None


def build_metadata(
    seqs: list[tuple[list[int], int, int]],
    *,
    block_size: int,
    num_tokens: int,
    num_seqs: int,
    max_blocks_per_seq: int,
) -> tuple[AttentionMetadata, np.ndarray]:
    """Build padded numpy metadata for a ragged batch.

    seqs: one `(block_table, num_computed, num_new)` per sequence: its page list, how many of its
    tokens are already in the cache, and how many new tokens this step feeds.
    Returns the metadata and `positions` [num_tokens] (padding tokens get position 0).
    """
    # NOTE: vectorised over the batch (one numpy call per field, not several per sequence): at
    # 64-256 sequences the per-sequence loop took 0.5-3.6 ms of host time per step (CPU).
    n = len(seqs)
    if n > num_seqs:
        raise ValueError(f"{n} sequences do not fit the {num_seqs}-sequence bucket")
    computed = np.fromiter((c for _, c, _ in seqs), np.int64, n)
    new = np.fromiter((m for _, _, m in seqs), np.int64, n)
    pages = np.fromiter((len(tb) for tb, _, _ in seqs), np.int64, n)
    if n and pages.max() > max_blocks_per_seq:
        s = int(np.argmax(pages))
        raise ValueError(f"sequence {s} needs {pages[s]} pages > max {max_blocks_per_seq}")
    t = int(new.sum())
    if t > num_tokens:
        raise ValueError(f"{t} tokens do not fit the {num_tokens}-token bucket")
    tables = np.zeros((num_seqs, max_blocks_per_seq), np.int32)
    if n:
        tables[:n][np.arange(max_blocks_per_seq) < pages[:, None]] = np.concatenate(
            [np.asarray(tb, np.int32) for tb, _, _ in seqs])
    seq_lens = np.zeros(num_seqs, np.int32)
    seq_lens[:n] = computed + new
    qsl = np.zeros(num_seqs + 1, np.int32)
    qsl[1 : n + 1] = np.cumsum(new)
    qsl[n + 1 :] = t
    seq_ids = np.full(num_tokens, max(num_seqs - 1, 0), np.int32)
    seq_ids[:t] = np.repeat(np.arange(n, dtype=np.int32), new)
    positions = np.zeros(num_tokens, np.int32)
    pos = np.arange(t, dtype=np.int64) + np.repeat(computed - qsl[:n], new)
    page = pos // block_size
    if t and (page >= pages[seq_ids[:t]]).any():
        s = int(seq_ids[:t][np.argmax(page >= pages[seq_ids[:t]])])
        raise ValueError(f"sequence {s} has {pages[s]} pages, too few for its "
                         f"{computed[s] + new[s]} tokens")
    positions[:t] = pos
    slot = np.zeros(num_tokens, np.int32)
    slot[:t] = tables[seq_ids[:t], page] * block_size + pos % block_size
    meta = AttentionMetadata(slot, seq_ids, tables, seq_lens, qsl)
    return meta, positions
