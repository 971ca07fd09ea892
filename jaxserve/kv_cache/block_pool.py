"""The pool of KV-cache pages ("blocks"): free list, reference counts, prefix-cache hashes.

Pure Python (no JAX): the scheduler runs it every step and tests exercise it in milliseconds.

NOTE: block 0 is the null block. It is never handed out; padding in the device batch points at it.
NOTE: a block whose reference count drops to 0 keeps its contents and its hash. It goes to the
back of the free queue (least-recently-used order) and stays findable in the prefix cache until
it is handed out again, at which point its hash is dropped.

Prefix-cache keys are chained sha256 digests: hash(block i) = sha256(hash(block i-1) || token ids
of block i || extra keys), so equal keys mean equal whole prefixes. Python's `hash()` is never
used (it is randomised per process and collides by design).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import Iterable, Sequence

NULL_BLOCK = 0
_ROOT = b"jaxserve-prefix-root-v1"


def hash_block_tokens(parent: bytes | None, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    h = hashlib.sha256()
    h.update(parent if parent is not None else _ROOT)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra:
        h.update(extra)
    return h.digest()


def hash_full_blocks(token_ids: Sequence[int], block_size: int, *, start: int = 0,
                     parent: bytes | None = None, extra: bytes = b"") -> list[bytes]:
    """Hashes of every full block of `token_ids`, continuing a chain of `start` known blocks."""
    out = []
    for i in range(start, len(token_ids) // block_size):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], extra)
        out.append(parent)
    return out


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref={self.ref_cnt})"


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (1 is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # LRU free queue: first = evicted first. The null block is never in it.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, int] = {}

    # -- queries -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def lookup(self, block_hash: bytes) -> Block | None:
        bid = self._cached.get(block_hash)
        return None if bid is None else self.blocks[bid]

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:  # evict its stale prefix-cache entry
                if self._cached.get(blk.block_hash) == bid:
                    del self._cached[blk.block_hash]
                blk.block_hash = None
            blk.ref_cnt = 1
            out.append(blk)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on cached blocks (prefix hits), pulling free ones out of the queue."""
        for blk in blocks:
            if blk.ref_cnt == 0:
                del self._free[blk.block_id]
            blk.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each. Pass a request's blocks tail-first so that its last blocks
        (least likely to be shared) are evicted first."""
        for blk in blocks:
            if blk.block_id == NULL_BLOCK:
                continue
            if blk.ref_cnt <= 0:
                raise RuntimeError(f"double free of block {blk.block_id}")
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self._free[blk.block_id] = None

    def cache_block(self, blk: Block, block_hash: bytes) -> None:
        if not self.enable_caching or blk.block_hash is not None:
            return
        blk.block_hash = block_hash
        self._cached.setdefault(block_hash, blk.block_id)

    def reset_prefix_cache(self) -> None:
        for bid in list(self._cached.values()):
            self.blocks[bid].block_hash = None
        self._cached.clear()
