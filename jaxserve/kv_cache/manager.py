"""Per-request block tables on top of the `BlockPool`, with prefix caching.

A request's block table only grows (append-only) until the request finishes or is preempted; then
all its blocks are released at once, tail first. Blocks become prefix-cache entries as soon as
every token in them is known and scheduled, so later requests (and a request's own siblings when
`n > 1`) reuse them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from jaxserve.kv_cache.block_pool import Block, BlockPool, hash_full_blocks


class _BlockIds:
    """A request's block ids as a growing int32 buffer. `view()` is a copy-free array of the ids so
    far, which later growth never changes (it writes past the view, or into a new buffer): the
    scheduler hands each step's tables to the runner without copying them."""

    __slots__ = ("buf", "n", "_view")

    def __init__(self):
        self.buf = np.empty(16, np.int32)
        self.n = 0
        self._view = None

    def extend(self, ids: Iterable[int]) -> None:
        ids = np.fromiter(ids, np.int32)
        end = self.n + len(ids)
        if end > len(self.buf):
            grown = np.empty(max(2 * len(self.buf), end), np.int32)
            grown[:self.n] = self.buf[:self.n]
            self.buf = grown
        self.buf[self.n:end] = ids
        self.n = end
        self._view = None

    def view(self) -> np.ndarray:
        if self._view is None:
            self._view = self.buf[:self.n]
        return self._view


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[Block]] = {}
        self._ids: dict[str, _BlockIds] = {}     # the same tables as block ids, kept in step
        self._hashes: dict[str, list[bytes]] = {}
        self._num_cached: dict[str, int] = {}
        self.prefix_cache_queries = 0   # prompt tokens looked up
        self.prefix_cache_hits = 0      # of which found in the cache

    # -- prefix cache ---------------------------------------------------------------------------
    def _hashes_for(self, req_id: str, token_ids: Sequence[int], upto_blocks: int) -> list[bytes]:
        hashes = self._hashes.setdefault(req_id, [])
        if len(hashes) < upto_blocks:
            # only the new blocks' tokens: the chain continues from the last known hash
            bs = self.block_size
            hashes.extend(hash_full_blocks(token_ids[len(hashes) * bs : upto_blocks * bs], bs,
                                           parent=hashes[-1] if hashes else None))
        return hashes

    def find_cached_prefix(self, req_id: str, token_ids: Sequence[int]) -> list[Block]:
        """Longest run of cached full blocks at the start of `token_ids`. The last token is never
        served from the cache: its logits are needed to sample."""
        if not self.enable_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits = []
        for h in self._hashes_for(req_id, token_ids, max_blocks)[:max_blocks]:
            blk = self.pool.lookup(h)
            if blk is None:
                break
            hits.append(blk)
        return hits

    # -- allocation -----------------------------------------------------------------------------
    def allocate_slots(self, req_id: str, token_ids: Sequence[int], num_computed: int,
                       num_new: int, cached_prefix: Sequence[Block] = (), *,
                       num_known: int | None = None) -> bool:
        """Make room for `num_new` more tokens after `num_computed` (which counts `cached_prefix`,
        the prefix hits being attached now). False, with nothing changed, if blocks run out.
        `num_known`: len(token_ids), when the caller has it."""
        total = num_computed + num_new
        if num_known is None:
            num_known = len(token_ids)
        blocks = self._blocks.setdefault(req_id, [])
        ids = self._ids.setdefault(req_id, _BlockIds())
        need = -(-total // self.block_size) - len(blocks) - len(cached_prefix)
        # hits sitting in the free queue
        reserved = sum(1 for b in cached_prefix if b.ref_cnt == 0) if cached_prefix else 0
        if need > self.pool.num_free_blocks - reserved:
            if not blocks:
                self._blocks.pop(req_id, None)
                self._ids.pop(req_id, None)
            return False
        if cached_prefix:
            self.pool.touch(cached_prefix)
            blocks.extend(cached_prefix)
            ids.extend(b.block_id for b in cached_prefix)
        if need > 0:
            fresh = self.pool.allocate(need)
            blocks.extend(fresh)
            ids.extend(b.block_id for b in fresh)
        if self.enable_caching:
            full = self._full_blocks(total, num_known)
            start = self._num_cached.get(req_id, 0)
            if full > start:
                hashes = self._hashes_for(req_id, token_ids, full)
                for i in range(start, full):
                    self.pool.cache_block(blocks[i], hashes[i])
                self._num_cached[req_id] = full
        return True

    def has_room(self, req_id: str, total: int, num_known: int) -> bool:
        """True when the request's blocks already hold `total` tokens and no block has become
        full of known tokens since it was last cached: `allocate_slots` would change nothing (the
        usual decode step; the scheduler skips it then)."""
        blocks = self._blocks.get(req_id)
        if blocks is None or total > len(blocks) * self.block_size:
            return False
        return (not self.enable_caching
                or self._full_blocks(total, num_known) <= self._num_cached.get(req_id, 0))

    def _full_blocks(self, total: int, num_known: int) -> int:
        """Blocks full of known tokens once `total` tokens are allocated: the ones to be cached."""
        return min(total, num_known) // self.block_size

    def record_prefix_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_prompt_tokens
        self.prefix_cache_hits += num_hit_tokens

    def free(self, req_id: str) -> None:
        blocks = self._blocks.pop(req_id, [])
        self._ids.pop(req_id, None)
        self.pool.free(reversed(blocks))
        self._hashes.pop(req_id, None)
        self._num_cached.pop(req_id, None)

    def block_ids(self, req_id: str) -> np.ndarray:
        """The request's block ids so far, int32, without a copy (see `_BlockIds`)."""
        ids = self._ids.get(req_id)
        return ids.view() if ids is not None else np.empty(0, np.int32)

    def num_blocks_of(self, req_id: str) -> int:
        return len(self._blocks.get(req_id, []))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_usable_blocks

    def usage(self) -> float:
        return self.pool.usage()
