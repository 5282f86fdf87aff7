"""Block pool and KV cache manager: exact block ids, free-queue order, hashes and events."""

from __future__ import annotations

import pytest

from shardline.engine.kv_cache import (
    ROOT_HASH,
    BlockPool,
    BlockRemoved,
    BlockStored,
    KVCacheManager,
    hash_block_tokens,
    hash_prompt_blocks,
)


def test_hash_is_chained_and_salted():
    a = hash_block_tokens(ROOT_HASH, [1, 2, 3, 4])
    assert a == hash_block_tokens(ROOT_HASH, [1, 2, 3, 4])
    assert len(a) == 32
    assert a != hash_block_tokens(ROOT_HASH, [1, 2, 3, 5])
    assert hash_block_tokens(a, [5, 6]) != hash_block_tokens(ROOT_HASH, [5, 6])
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], (b"tenant-a",)) != a
    assert hash_block_tokens(ROOT_HASH, [1, 2, 3, 4], (b"tenant-a",)) != hash_block_tokens(
        ROOT_HASH, [1, 2, 3, 4], (b"tenant-b",)
    )
    # no ambiguity between a token list and a salt that spells the same bytes
    assert hash_block_tokens(ROOT_HASH, [1], (b"",)) != hash_block_tokens(ROOT_HASH, [1])


def test_hash_prompt_blocks_covers_full_blocks_only():
    hashes = hash_prompt_blocks(list(range(10)), 4)
    assert len(hashes) == 2
    assert hashes[1] == hash_block_tokens(hashes[0], [4, 5, 6, 7])


def test_pool_allocates_in_lru_order_and_evicts_cached():
    pool = BlockPool(4)
    assert pool.get_new_blocks(2) == [0, 1]
    h0, h1 = hash_block_tokens(ROOT_HASH, [1]), hash_block_tokens(ROOT_HASH, [2])
    pool.cache_blocks([0, 1], [h0, h1], ROOT_HASH)
    assert pool.take_events() == [BlockStored((h0, h1), ROOT_HASH)]
    pool.free_blocks([1, 0])  # tail first
    assert pool.num_free_blocks == 4
    assert pool.lookup(h0) == 0  # still cached while free
    # free queue: 2, 3 (never used), then 1, 0 (freed in that order)
    assert pool.get_new_blocks(3) == [2, 3, 1]
    assert pool.take_events() == [BlockRemoved((h1,))]
    assert pool.lookup(h1) is None and pool.lookup(h0) == 0


def test_touch_revives_a_free_cached_block():
    pool = BlockPool(3)
    [b] = pool.get_new_blocks(1)
    h = hash_block_tokens(ROOT_HASH, [9])
    pool.cache_blocks([b], [h], ROOT_HASH)
    pool.free_blocks([b])
    pool.touch([b])
    assert pool.blocks[b].ref_cnt == 1
    assert pool.num_free_blocks == 2
    assert pool.get_new_blocks(2) == [1, 2]


def test_double_free_is_caught():
    pool = BlockPool(2)
    [b] = pool.get_new_blocks(1)
    pool.free_blocks([b])
    with pytest.raises(AssertionError):
        pool.free_blocks([b])


def test_manager_shares_prefix_blocks_without_copies():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    hashes = hash_prompt_blocks(prompt, 4)
    assert kv.get_computed_blocks(hashes, len(prompt)) == []
    assert kv.allocate_slots("a", 0, 10, hashes)
    assert kv.block_ids("a") == [0, 1, 2]
    hits = kv.get_computed_blocks(hashes, len(prompt))
    assert hits == [0, 1]
    assert kv.allocate_slots("b", 8, 2, hashes, hits)
    assert kv.block_ids("b") == [0, 1, 3]
    assert kv.pool.blocks[0].ref_cnt == 2
    kv.free("a")
    kv.free("b")
    assert kv.pool.num_free_blocks == 10
    # a later request still hits the freed prefix
    assert kv.get_computed_blocks(hashes, len(prompt)) == [0, 1]


def test_full_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(8))
    hashes = hash_prompt_blocks(prompt, 4)
    assert kv.allocate_slots("a", 0, 8, hashes)
    kv.free("a")
    # both blocks are cached, but the last token must be recomputed for its logits
    assert kv.get_computed_blocks(hashes, 8) == [0]


def test_allocation_fails_cleanly_when_short():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots("a", 0, 8, [])
    assert not kv.allocate_slots("b", 0, 8, [])
    assert kv.block_ids("b") == []
    assert kv.pool.num_free_blocks == 1
    # growing "a" by one token needs a third block
    assert kv.allocate_slots("a", 8, 1, [])
    assert kv.block_ids("a") == [0, 1, 2]


def test_revived_hits_count_against_free_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    hashes = hash_prompt_blocks(prompt, 2)
    assert kv.allocate_slots("a", 0, 5, hashes)
    kv.free("a")
    hits = kv.get_computed_blocks(hashes, 5)
    assert hits == [0, 1]
    assert kv.allocate_slots("b", 4, 1, hashes, hits)
    assert kv.pool.num_free_blocks == 0


def test_salted_requests_do_not_share():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(9))
    ha = hash_prompt_blocks(prompt, 4, (b"a",))
    hb = hash_prompt_blocks(prompt, 4, (b"b",))
    assert kv.allocate_slots("a", 0, 9, ha)
    assert kv.get_computed_blocks(hb, 9) == []
    assert kv.get_computed_blocks(ha, 9) == [0, 1]


def test_prefix_caching_disabled_emits_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=False)
    hashes = hash_prompt_blocks([1, 2, 3], 2)
    assert kv.allocate_slots("a", 0, 3, hashes)
    kv.free("a")
    assert kv.get_computed_blocks(hashes, 3) == []
    assert kv.take_events() == []


def test_cached_hashes_snapshot_tracks_store_and_evict():
    pool = BlockPool(2)
    h = [hash_block_tokens(ROOT_HASH, [i]) for i in range(3)]
    pool.cache_blocks(pool.get_new_blocks(2), h[:2], ROOT_HASH)
    assert set(pool.cached_hashes()) == {h[0], h[1]}
    pool.free_blocks([1, 0])
    pool.get_new_blocks(1)  # evicts block 1 (freed first)
    assert pool.cached_hashes() == [h[0]]
