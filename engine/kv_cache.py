"""Paged KV-cache bookkeeping: block pool, prefix hashes and per-request block tables.

Plain Python (no torch): the tensors live in the model runner; this module only
decides which block ids hold which tokens. A block is `block_size` consecutive
token slots of one sequence. Full blocks are identified by a chained SHA-256
hash so that requests sharing a prefix share blocks without copies.

Free blocks keep their contents and hash ("cached") and sit in an LRU free
queue; a prefix hit on a cached free block revives it, and allocation evicts
from the least recently freed end. Every hash stored or evicted is buffered as
a `KVEvent` so that the cluster can keep an exact index (`take_events()`).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NewType, Sequence

BlockHash = NewType("BlockHash", bytes)
BlockId = NewType("BlockId", int)

# The parent hash of a sequence's first block.
ROOT_HASH = BlockHash(b"\x00" * 32)


def hash_block_tokens(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: tuple[bytes, ...] = ()
) -> BlockHash:
    """SHA-256 over (parent hash, block tokens, extra keys).

    A cryptographic hash, not Python's `hash()`: a predictable hash would let
    one tenant forge collisions with another tenant's blocks. A tenant salt or
    an adapter id travels in `extra_keys`.
    """
    h = hashlib.sha256(parent_hash)
    h.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    for key in extra_keys:
        h.update(struct.pack("<I", len(key)))
        h.update(key)
    return BlockHash(h.digest())


def hash_prompt_blocks(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple[bytes, ...] = ()
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, chained from the root."""
    hashes: list[BlockHash] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent)
    return hashes


@dataclass(slots=True, frozen=True)
class BlockStored:
    """Blocks whose contents became reusable under these hashes (in chain order)."""

    block_hashes: tuple[BlockHash, ...]
    # Hash of the block before the first one here; ROOT_HASH at a sequence start.
    parent_hash: BlockHash


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    """Hashes whose blocks were evicted and may no longer be hit."""

    block_hashes: tuple[BlockHash, ...]


KVEvent = BlockStored | BlockRemoved


@dataclass(slots=True)
class KVBlock:
    """One slot of the pool."""

    block_id: BlockId
    # Number of running requests whose block table holds this block.
    ref_cnt: int = 0
    # Set once the block is full and registered for prefix reuse.
    block_hash: BlockHash | None = None


class BlockPool:
    """Fixed set of KV blocks with reference counts, an LRU free queue and a hash map.

    NOTE: a free block may still be cached (`block_hash` set): it is evicted
    only when `get_new_blocks` takes it, so freeing never loses a prefix early.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(BlockId(i)) for i in range(num_blocks)]
        # Free block ids, least recently freed first (insertion order).
        self._free: OrderedDict[BlockId, None] = OrderedDict((b.block_id, None) for b in self.blocks)
        self._cached: dict[BlockHash, BlockId] = {}
        self._events: list[KVEvent] = []

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (cached free blocks included)."""
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks held by running requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> BlockId | None:
        """The block caching `block_hash`, if any."""
        return self._cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[BlockId]:
        """Take `n` blocks from the LRU end of the free queue, evicting their hashes."""
        assert n <= len(self._free), f"asked for {n} blocks, {len(self._free)} free"
        taken: list[BlockId] = []
        evicted: list[BlockHash] = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            taken.append(block_id)
        if evicted:
            self._events.append(BlockRemoved(tuple(evicted)))
        return taken

    def touch(self, block_ids: Sequence[BlockId]) -> None:
        """Take a reference on prefix-hit blocks, reviving any that were free."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def free_blocks(self, block_ids: Sequence[BlockId]) -> None:
        """Drop one reference from each block; blocks reaching zero join the free queue.

        Callers pass a request's blocks tail first, so that a prefix's last
        blocks are evicted before its first ones.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"block {block_id} freed twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def cache_blocks(
        self, block_ids: Sequence[BlockId], block_hashes: Sequence[BlockHash], parent_hash: BlockHash
    ) -> None:
        """Register full blocks under their hashes (chain order) and emit one event."""
        if not self.enable_caching or not block_ids:
            return
        stored: list[BlockHash] = []
        for block_id, block_hash in zip(block_ids, block_hashes, strict=True):
            block = self.blocks[block_id]
            if block.block_hash is not None:
                continue  # a prefix hit: already cached
            if block_hash in self._cached:
                continue  # computed twice concurrently: keep the first copy
            block.block_hash = block_hash
            self._cached[block_hash] = block_id
            stored.append(block_hash)
        if stored:
            self._events.append(BlockStored(tuple(stored), parent_hash))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; possible only while no block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        if self._cached:
            self._events.append(BlockRemoved(tuple(self._cached)))
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash that can be hit now: a full snapshot for an index that lost events."""
        return list(self._cached)

    def take_events(self) -> list[KVEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events


@dataclass(slots=True)
class RequestBlocks:
    """The block table of one request and how much of it is registered for reuse."""

    block_ids: list[BlockId] = field(default_factory=list)
    # Leading blocks already registered in the pool's hash map (or hit from it).
    num_cached_blocks: int = 0


class KVCacheManager:
    """Allocates block tables for requests on top of a `BlockPool`.

    Requests are described by what the manager needs and nothing else: an id,
    the hashes of their full blocks, and token counts.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self._tables: dict[str, RequestBlocks] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` token slots."""
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, block_hashes: Sequence[BlockHash], num_tokens: int) -> list[BlockId]:
        """Longest run of cached blocks matching the request's leading hashes.

        At least one token is always left to compute, since sampling needs its
        logits: a hit on every full block of a block-aligned prompt gives back
        one block less.
        """
        if not self.pool.enable_caching:
            return []
        max_blocks = (num_tokens - 1) // self.block_size
        hits: list[BlockId] = []
        for block_hash in block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def block_ids(self, request_id: str) -> list[BlockId]:
        """The request's block table (empty when it holds none)."""
        table = self._tables.get(request_id)
        return table.block_ids if table else []

    def can_fit_alone(self, num_tokens: int) -> bool:
        """Whether `num_tokens` could fit in the pool if nothing else ran."""
        return self.blocks_for_tokens(num_tokens) <= self.pool.num_blocks

    def allocate_slots(
        self,
        request_id: str,
        num_computed_tokens: int,
        num_new_tokens: int,
        block_hashes: Sequence[BlockHash],
        new_computed_blocks: Sequence[BlockId] = (),
    ) -> bool:
        """Grow a request's table to hold `num_computed_tokens + num_new_tokens` slots.

        `new_computed_blocks` are prefix hits found by `get_computed_blocks`
        for a request that holds no blocks yet; `num_computed_tokens` already
        counts their tokens. Returns False (and changes nothing) when the pool
        is short. Blocks that will be full once this step's tokens are written
        are registered for reuse at once.
        """
        table = self._tables.get(request_id)
        if table is None:
            table = RequestBlocks()
        assert not new_computed_blocks or not table.block_ids
        total_tokens = num_computed_tokens + num_new_tokens
        num_needed = self.blocks_for_tokens(total_tokens) - len(table.block_ids) - len(new_computed_blocks)
        # Hits on free blocks take them out of the free queue too.
        num_revived = sum(1 for b in new_computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_needed + num_revived > self.pool.num_free_blocks:
            return False
        self._tables[request_id] = table
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            table.block_ids.extend(new_computed_blocks)
            table.num_cached_blocks = len(new_computed_blocks)
        if num_needed > 0:
            table.block_ids.extend(self.pool.get_new_blocks(num_needed))
        self._cache_full_blocks(table, total_tokens, block_hashes)
        return True

    def _cache_full_blocks(self, table: RequestBlocks, num_tokens: int, block_hashes: Sequence[BlockHash]) -> None:
        num_full = min(num_tokens // self.block_size, len(block_hashes))
        start = table.num_cached_blocks
        if num_full <= start:
            return
        parent = block_hashes[start - 1] if start > 0 else ROOT_HASH
        self.pool.cache_blocks(table.block_ids[start:num_full], block_hashes[start:num_full], parent)
        table.num_cached_blocks = num_full

    def free(self, request_id: str) -> None:
        """Release a request's blocks (tail first); cached ones stay reusable."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            self.pool.free_blocks(table.block_ids[::-1])

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call (see `BlockPool.take_events`)."""
        return self.pool.take_events()
