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
    slot = np.zeros(num_tokens, np.int32)
    seq_ids = np.full(num_tokens, max(num_seqs - 1, 0), np.int32)
    positions = np.zeros(num_tokens, np.int32)
    tables = np.zeros((num_seqs, max_blocks_per_seq), np.int32)
    seq_lens = np.zeros(num_seqs, np.int32)
    qsl = np.zeros(num_seqs + 1, np.int32)
    t = 0
    for s, (table, computed, new) in enumerate(seqs):
        if len(table) > max_blocks_per_seq:
            raise ValueError(f"sequence {s} needs {len(table)} pages > max {max_blocks_per_seq}")
        tables[s, : len(table)] = table
        pos = np.arange(computed, computed + new, dtype=np.int32)
        tbl = np.asarray(table, np.int32)
        slot[t : t + new] = tbl[pos // block_size] * block_size + pos % block_size
        positions[t : t + new] = pos
        seq_ids[t : t + new] = s
        seq_lens[s] = computed + new
        t += new
        qsl[s + 1] = t
    if t > num_tokens:
        raise ValueError(f"{t} tokens do not fit the {num_tokens}-token bucket")
    qsl[len(seqs) + 1 :] = t
    meta = AttentionMetadata(slot, seq_ids, tables, seq_lens, qsl)
    return meta, positions
