"""The exact KV index: events applied per replica, gaps, resync, and no drift from the engine."""

from __future__ import annotations

import random

from shardline.cluster.kv_index import REMOVED, STORED, ApplyResult, KVIndex, to_wire
from shardline.engine.kv_cache import ROOT_HASH, BlockRemoved, BlockStored, KVCacheManager, hash_prompt_blocks


def h(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_stored_then_match_per_replica():
    idx = KVIndex()
    assert idx.apply("a", 0, [(STORED, (h(1), h(2), h(3)))], now=0.0) is ApplyResult.APPLIED
    assert idx.apply("b", 0, [(STORED, (h(1),))], now=0.0) is ApplyResult.APPLIED
    assert idx.match([h(1), h(2), h(3), h(4)], "a") == 3
    assert idx.match([h(1), h(2), h(3), h(4)], "b") == 1
    assert idx.match([h(9)], "a") == 0
    assert idx.match([h(1)], "unknown") == 0
    assert idx.matches([h(1), h(2), h(3), h(4)]) == {"a": 3, "b": 1}
    assert idx.matches([h(5)]) == {}
    assert idx.matches([]) == {}


def test_removed_in_the_middle_stops_the_prefix():
    idx = KVIndex()
    idx.apply("a", 0, [(STORED, (h(1), h(2), h(3)))], now=0.0)
    idx.apply("a", 1, [(REMOVED, (h(2),))], now=0.0)
    assert idx.match([h(1), h(2), h(3)], "a") == 1
    assert idx.matches([h(1), h(2), h(3)]) == {"a": 1}
    assert idx.hashes_of("a") == {h(1), h(3)}
    assert idx.stats().num_hashes == 2


def test_matches_agrees_with_match_on_random_states():
    rng = random.Random(0)
    idx = KVIndex()
    chain = [h(i) for i in range(12)]
    for r in range(5):
        held = tuple(x for x in chain if rng.random() < 0.8)
        idx.apply(f"r{r}", 0, [(STORED, held)], now=0.0)
    got = idx.matches(chain)
    for r in range(5):
        n = idx.match(chain, f"r{r}")
        assert got.get(f"r{r}", 0) == n


def test_engine_dataclasses_are_accepted():
    stored = BlockStored((h(1), h(2)), ROOT_HASH)
    removed = BlockRemoved((h(2),))
    assert to_wire(stored) == (STORED, (h(1), h(2)))
    assert to_wire(removed) == (REMOVED, (h(2),))
    idx = KVIndex()
    idx.apply("a", 0, [stored, removed], now=0.0)
    assert idx.hashes_of("a") == {h(1)}


def test_duplicate_seq_is_ignored():
    idx = KVIndex()
    idx.apply("a", 0, [(STORED, (h(1),))], now=0.0)
    idx.apply("a", 1, [(REMOVED, (h(1),))], now=0.0)
    assert idx.apply("a", 1, [(REMOVED, (h(1),))], now=0.0) is ApplyResult.DUPLICATE
    assert idx.apply("a", 0, [(STORED, (h(1),))], now=0.0) is ApplyResult.DUPLICATE
    assert idx.hashes_of("a") == frozenset()


def test_gap_marks_stale_asks_once_then_snapshot_and_replay():
    idx = KVIndex(resync_retry_s=5.0)
    idx.apply("a", 0, [(STORED, (h(1), h(2)))], now=0.0)
    # seq 1 is lost; seq 2 reveals the gap.
    assert idx.apply("a", 2, [(STORED, (h(7),))], now=1.0) is ApplyResult.RESYNC
    assert idx.is_stale("a")
    assert idx.hashes_of("a") == frozenset()  # stale scores nothing, never wrong
    assert idx.match([h(1)], "a") == 0
    # While the snapshot is on its way, later batches are kept, not re-asked.
    assert idx.apply("a", 3, [(STORED, (h(8),))], now=2.0) is ApplyResult.STALE
    assert idx.apply("a", 4, [(REMOVED, (h(1),))], now=6.5) is ApplyResult.RESYNC  # asked again after 5 s
    # The snapshot as of seq 2 (after the lost seq 1 removed h(2) and stored h(3)).
    assert idx.replace_replica("a", [h(1), h(3), h(7)], seq=2) is ApplyResult.APPLIED
    assert not idx.is_stale("a")
    assert idx.hashes_of("a") == {h(3), h(7), h(8)}  # seq 3 and 4 replayed
    assert idx.apply("a", 5, [(STORED, (h(9),))], now=7.0) is ApplyResult.APPLIED
    assert idx.stats().num_gaps == 1


def test_unknown_replica_past_seq_zero_asks_for_a_snapshot():
    """A restarted scheduler rebuilds its index from the replicas."""
    idx = KVIndex()
    assert idx.apply("a", 41, [(STORED, (h(1),))], now=0.0) is ApplyResult.RESYNC
    assert idx.replace_replica("a", [h(1), h(2)], seq=41) is ApplyResult.APPLIED
    assert idx.match([h(1), h(2)], "a") == 2
    assert idx.apply("a", 42, [], now=0.0) is ApplyResult.APPLIED


def test_snapshot_with_a_gap_in_the_buffer_stays_stale():
    idx = KVIndex()
    idx.apply("a", 3, [], now=0.0)  # stale, buffers seq 3
    idx.apply("a", 5, [(STORED, (h(5),))], now=0.0)  # seq 4 lost too
    assert idx.replace_replica("a", [h(1)], seq=2) is ApplyResult.STALE
    assert idx.is_stale("a")
    assert idx.hashes_of("a") == frozenset()
    assert idx.replace_replica("a", [h(1), h(5)], seq=5) is ApplyResult.APPLIED
    assert idx.hashes_of("a") == {h(1), h(5)}


def test_remove_replica_and_stats():
    idx = KVIndex()
    idx.apply("a", 0, [(STORED, (h(1), h(2)))], now=0.0)
    idx.apply("b", 0, [(STORED, (h(1),))], now=0.0)
    st = idx.stats()
    assert (st.num_hashes, st.blocks_per_replica, st.stale_replicas) == (2, {"a": 2, "b": 1}, ())
    idx.remove_replica("a")
    assert idx.matches([h(1), h(2)]) == {"b": 1}
    assert idx.stats().num_hashes == 1
    assert idx.replicas() == ["b"]
    # A new replica reuses a's slot in the holder masks, not its hashes.
    idx.apply("c", 0, [(STORED, (h(3),))], now=0.0)
    assert idx.matches([h(1), h(2)]) == {"b": 1}
    assert idx.matches([h(3)]) == {"c": 1}


def test_index_follows_a_real_block_pool_without_drift():
    """Feed a real engine KV manager's events through the index: the index holds exactly
    the pool's cached hashes, and its prefix match equals the engine's own hit count."""
    rng = random.Random(1)
    bs = 4
    kv = KVCacheManager(num_blocks=24, block_size=bs)
    idx = KVIndex()
    prefixes = [[rng.randrange(100) for _ in range(12)] for _ in range(4)]
    live: list[str] = []
    seq = 0
    num_removed = 0
    for step in range(300):
        if live and (rng.random() < 0.45 or len(live) > 3):
            kv.free(live.pop(rng.randrange(len(live))))
        else:
            tokens = rng.choice(prefixes) + [rng.randrange(100) for _ in range(rng.randrange(0, 9))]
            hashes = hash_prompt_blocks(tokens, bs)
            hits = kv.get_computed_blocks(hashes, len(tokens))
            assert idx.match(hashes[: (len(tokens) - 1) // bs], "r") == len(hits)
            rid = f"q{step}"
            if kv.allocate_slots(rid, len(hits) * bs, len(tokens) - len(hits) * bs, hashes, hits):
                live.append(rid)
        events = kv.take_events()
        num_removed += sum(isinstance(e, BlockRemoved) for e in events)
        idx.apply("r", seq, events, now=float(step))
        seq += 1
        assert idx.hashes_of("r") == set(kv.pool._cached)
    assert num_removed > 10  # the pool was small enough to evict


def test_common_prefix_blocks_of_chained_hashes():
    from shardline.cluster.kv_index import common_prefix_blocks

    ctx = hash_prompt_blocks(list(range(160)), 16)  # 10 blocks
    other = hash_prompt_blocks(list(range(96)) + [7] * 64, 16)  # diverges at block 6
    assert common_prefix_blocks(ctx, other) == 6
    assert common_prefix_blocks(ctx, ctx[:4]) == 4
    assert common_prefix_blocks(ctx, hash_prompt_blocks([9] * 160, 16)) == 0
    assert common_prefix_blocks(ctx, ()) == 0


def test_running_prompts_match_the_longest_held_prefix_per_replica():
    from shardline.cluster.kv_index import RunningPrompts

    ctx = list(range(128))
    a = tuple(hash_prompt_blocks(ctx + [1] * 32, 16))  # 10 blocks
    b = tuple(hash_prompt_blocks(ctx + [2] * 16, 16))  # 9 blocks, 8 shared with a
    running = RunningPrompts()
    running.hold("r1", a)
    running.hold("r1", a)
    running.hold("r2", b)
    question = tuple(hash_prompt_blocks(ctx + [3] * 16, 16))
    assert running.matches(question) == {"r1": 8, "r2": 8}
    assert running.matches(a) == {"r1": 10, "r2": 8}
    running.release("r1", a)
    assert running.matches(a) == {"r1": 10, "r2": 8}  # held twice, released once
    running.release("r1", a)
    running.forget_replica("r2")
    assert running.matches(a) == {} and running._by_first == {}
