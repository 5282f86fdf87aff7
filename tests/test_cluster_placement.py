"""Placement policies on crafted loads: exact choices."""

from __future__ import annotations

import numpy as np
import pytest

from shardline.cluster.kv_index import STORED, KVIndex
from shardline.cluster.placement import (
    POLICIES,
    KVAwarePolicy,
    Pow2Policy,
    PrefixApproxPolicy,
    ReplicaLoad,
    ReplicaView,
    RoundRobinPolicy,
    RouteRequest,
    StartLimits,
    TextPrefixTree,
    blocks_needed,
    build_views,
    can_start,
    has_slot,
    make_policy,
    usable_cached_blocks,
)
from shardline.cluster.replica_load import ReplicaTable
from shardline.engine.kv_cache import hash_prompt_blocks

BS = 16


def load(running=0, waiting=0, free=1000, blocks=1000, tokens=0, max_seqs=16, step_tokens=0) -> ReplicaLoad:
    return ReplicaLoad(running, waiting, free, blocks, tokens, max_seqs, step_tokens)


def request(n_tokens=640, cached_hashes=(), text="", rid="q") -> RouteRequest:
    hashes = tuple(cached_hashes) or tuple(i.to_bytes(32, "big") for i in range(n_tokens // BS))
    return RouteRequest(rid, "t", hashes, BS, n_tokens, max_tokens=16, prompt_text=text)


def view(rid, cached=0, start=True, indexed=0, **kw) -> ReplicaView:
    return ReplicaView(rid, load(**kw), cached, start, indexed)


def test_block_arithmetic():
    assert blocks_needed(32, 16, 0) == 3  # 32 prompt + 1 generated token
    assert blocks_needed(31, 16, 0) == 2
    assert blocks_needed(640, 16, 39) == 2
    # The engine always computes one prompt token: a block-aligned full hit gives one block back.
    assert usable_cached_blocks(640, 16, 40) == 39
    assert usable_cached_blocks(641, 16, 40) == 40
    assert usable_cached_blocks(1, 16, 5) == 0


def test_can_start():
    lim = StartLimits(max_replica_waiting=0, kv_watermark=0.01)
    assert can_start(load(running=15), 10, lim)
    assert not can_start(load(running=16), 10, lim)  # no batch slot
    assert not can_start(load(running=1, waiting=1), 10, lim)  # the replica queues already
    assert can_start(load(free=20), 10, lim)
    assert not can_start(load(free=19), 10, lim)  # 19 - 10 < watermark 10
    batch = StartLimits(max_seq_util=0.5, max_kv_util=0.5)
    assert can_start(load(running=7, free=600), 100, batch)
    assert not can_start(load(running=8, free=600), 100, batch)
    assert not can_start(load(running=7, free=599), 100, batch)


def test_a_replica_queues_what_its_next_step_can_take():
    """Past `max_replica_waiting`, a replica still takes prompts that fit its next step's token budget."""
    lim = StartLimits(max_replica_waiting=1)
    busy = dict(running=4, waiting=3, step_tokens=2048)
    assert can_start(load(tokens=384, **busy), 9, lim, new_tokens=128)  # 3 queued prompts + this one: 512
    assert can_start(load(tokens=1920, **busy), 9, lim, new_tokens=128)  # exactly the budget
    assert not can_start(load(tokens=1921, **busy), 9, lim, new_tokens=128)
    assert not can_start(load(tokens=0, running=4, waiting=3), 9, lim, new_tokens=128)  # no budget reported
    assert can_start(load(tokens=5000, running=4, waiting=1, step_tokens=2048), 9, lim, new_tokens=128)  # count rule
    assert not can_start(load(tokens=0, running=16, waiting=0, step_tokens=2048), 9, lim, new_tokens=1)  # no slot
    table = ReplicaTable.of(
        [("a", load(tokens=384, **busy), 0), ("b", load(tokens=1984, **busy), 0), ("c", load(waiting=3), 0)]
    )
    assert has_slot(table, np.array([128, 128, 128]), lim).tolist() == [True, False, False]


def test_request_validation():
    with pytest.raises(ValueError, match="block hashes"):
        RouteRequest("q", "t", (b"x" * 32,) * 3, 16, 40)
    with pytest.raises(ValueError, match="block_size"):
        RouteRequest("q", "t", (), 0, 40)


def test_make_policy_by_name():
    assert set(POLICIES) == {"round_robin", "pow2", "prefix_approx", "kv_aware"}
    assert make_policy("kv_aware", decode_weight=3.0).decode_weight == 3.0
    with pytest.raises(ValueError, match="unknown routing policy 'best'"):
        make_policy("best")


def test_every_policy_returns_none_when_nothing_can_start():
    views = [view("a", start=False), view("b", start=False)]
    for name in POLICIES:
        assert make_policy(name).choose(request(), views) is None, name
        assert make_policy(name).choose(request(), []) is None, name


def test_round_robin_cycles_in_id_order_skipping_full_replicas():
    p = RoundRobinPolicy()
    views = [view("b"), view("a"), view("c")]
    got = []
    for _ in range(4):
        rid = p.choose(request(), views)
        p.on_placed(request(), rid)
        got.append(rid)
    assert got == ["a", "b", "c", "a"]
    views = [view("a"), view("b", start=False), view("c")]
    assert p.choose(request(), views) == "c"


def test_pow2_takes_the_less_active_of_two():
    p = Pow2Policy(seed=3)
    views = [view("a", running=5), view("b", running=1)]
    assert {p.choose(request(), views) for _ in range(20)} == {"b"}
    views = [view("a", running=5), view("b", running=1), view("c", running=0), view("d", start=False)]
    picks = [p.choose(request(), views) for _ in range(300)]
    # "a" loses both pairs it can be in; "d" cannot start.
    assert set(picks) == {"b", "c"}
    assert picks.count("c") > picks.count("b")  # c wins both its pairs, b one of two


def test_kv_aware_picks_the_replica_holding_the_prefix():
    p = KVAwarePolicy()
    req = request(640)
    views = [view("a", cached=0, running=1), view("b", cached=36, running=3), view("c", cached=10, running=0)]
    # costs: a 640+8, b 64+24, c 480+0
    assert p.cost(req, views[1]) == 640 - 36 * 16 + 8 * 3
    assert p.choose(req, views) == "b"


def test_kv_aware_without_prefix_takes_least_load_then_emptier_cache():
    p = KVAwarePolicy()
    req = request(640)
    assert p.choose(req, [view("a", running=3), view("b", running=2, tokens=100), view("c", running=2)]) == "c"
    # Same load, but a's cache is full of other prefixes it would have to evict.
    assert p.choose(req, [view("a", indexed=990), view("b", indexed=100)]) == "b"


def test_kv_aware_spreads_new_prefixes_over_the_caches():
    p = KVAwarePolicy(occupancy_weight=0.25)
    req = request(256)
    # a matches only a chat template's first block and is 75% full; b is empty: b takes the new context.
    assert p.choose(req, [view("a", cached=1, indexed=750), view("b", indexed=0)]) == "b"
    # A real hit (most of the prompt) outweighs any occupancy.
    assert p.choose(req, [view("a", cached=14, indexed=990), view("b", indexed=0)]) == "a"
    assert KVAwarePolicy(occupancy_weight=0.0).choose(req, [view("a", cached=1, indexed=750), view("b")]) == "a"


def test_kv_aware_guard_diverts_a_hot_prefix():
    p = KVAwarePolicy(balance_abs=8, balance_rel=1.5)
    req = request(640)
    # a holds the prefix but is ahead of the least active by 11 > 8 and 12 > 1.5 * 1.
    views = [view("a", cached=39, running=12), view("b", running=1), view("c", running=2)]
    assert p.choose(req, views) == "b"
    # Within the margins, the prefix wins.
    views = [view("a", cached=39, running=9), view("b", running=1), view("c", running=2)]
    assert p.choose(req, views) == "a"
    # Next best by cost among the allowed: c holds part of the prefix.
    views = [view("a", cached=39, running=12), view("b", running=1), view("c", cached=20, running=2)]
    assert p.choose(req, views) == "c"
    # The guard yields when only the hot replica has room.
    views = [view("a", cached=39, running=12), view("b", running=1, start=False)]
    assert p.choose(req, views) == "a"


def test_kv_aware_waits_for_its_cached_replica_a_little():
    p = KVAwarePolicy(affinity_wait_s=0.25, affinity_min_saving=256)
    req = request(640)
    views = [view("a", cached=39, running=4, start=False), view("b", running=3)]
    assert p.choose(req, views, waited_s=0.0) is None
    assert p.choose(req, views, waited_s=0.3) == "b"
    # Not worth waiting for a small saving.
    views = [view("a", cached=5, running=4, start=False), view("b", running=3)]
    assert p.choose(req, views, waited_s=0.0) == "b"


def test_salted_hashes_never_match_another_tenant():
    tokens = list(range(200))
    idx = KVIndex()
    mine = hash_prompt_blocks(tokens, BS, (b"tenant-a-salt",))
    idx.apply("r1", 0, [(STORED, tuple(mine))], now=0.0)
    assert idx.matches(mine) == {"r1": 12}
    theirs = hash_prompt_blocks(tokens, BS, (b"tenant-b-salt",))
    unsalted = hash_prompt_blocks(tokens, BS)
    assert idx.matches(theirs) == {}
    assert idx.matches(unsalted) == {}
    req = RouteRequest("q", "b", tuple(theirs), BS, 200)
    views = build_views(req, {"r1": load(running=3), "r2": load(running=0)}, idx.matches(theirs), StartLimits())
    assert [v.cached_blocks for v in views] == [0, 0]
    assert KVAwarePolicy().choose(req, views) == "r2"


def test_build_views_caps_hits_and_checks_room():
    req = request(640)
    loads = {"a": load(free=3), "b": load(free=50)}
    views = build_views(req, loads, {"a": 40, "b": 0}, StartLimits(kv_watermark=0.0), {"a": 40})
    assert views[0] == ReplicaView("a", loads["a"], 39, True, 40)  # needs 41 - 39 = 2 blocks
    assert views[1] == ReplicaView("b", loads["b"], 0, True, 0)
    views = build_views(req, {"b": load(free=40)}, {}, StartLimits(kv_watermark=0.0))
    assert not views[0].can_start  # needs 41 blocks


def test_text_prefix_tree_match_insert_split():
    t = TextPrefixTree()
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    t.insert("help", "a")
    assert t.match("hello world!") == {"a": 11, "b": 6}
    assert t.match("help me") == {"a": 4, "b": 3}
    assert t.match("xyz") == {}
    assert t.sizes == {"a": len("hello world") + 1, "b": len("hello there")}


def test_text_prefix_tree_evicts_least_recently_used_leaves():
    t = TextPrefixTree()
    t.insert("system prompt A: q1", "a")
    t.insert("system prompt B: q2", "a")
    t.insert("system prompt A: q3", "a")
    t.insert("system prompt A: q1", "b")
    # a holds 14 (stem) + 4 ("A: q") + 1 ("1") + 1 ("3") + 5 ("B: q2") = 25 characters.
    assert t.sizes["a"] == 25
    t.evict("a", max_chars=21)
    # Least recently used leaves go first: "1" (insert 1), then "B: q2" (insert 2).
    assert t.sizes["a"] == 19
    assert t.match("system prompt A: q1") == {"a": 18, "b": 19}
    assert t.match("system prompt B: q2") == {"a": 14, "b": 14}
    assert t.match("system prompt A: q3") == {"a": 19, "b": 18}
    t.remove_replica("a")
    assert t.match("system prompt A: q3") == {"b": 18}
    assert "a" not in t.sizes


def test_prefix_approx_follows_text_and_balances():
    p = PrefixApproxPolicy(cache_threshold=0.5, balance_abs=4, balance_rel=1.5)
    ctx = "You are a helpful assistant for ACME. " * 4
    first = request(text=ctx + "Q1")
    views = [view("a", running=1), view("b", running=0)]
    assert p.choose(first, views) == "b"  # no match: smallest tree, then least active
    p.on_placed(first, "b")
    views = [view("a", running=0), view("b", running=2)]
    assert p.choose(request(text=ctx + "Q2"), views) == "b"  # follows the cached text
    assert p.choose(request(text="unrelated question"), views) == "a"  # smallest tree
    views = [view("a", running=0), view("b", running=6)]
    assert p.choose(request(text=ctx + "Q3"), views) == "a"  # imbalanced: least active


def test_prefix_approx_evicts_by_size():
    p = PrefixApproxPolicy(max_tree_chars=100, evict_to=0.5)
    for i in range(10):
        p.on_placed(request(text=f"{i:02d}" + "x" * 30), "a")
        assert p.tree.sizes["a"] <= 100


def test_kv_blind_policies_bind_on_a_free_slot_alone():
    req = request(640)
    loads = {"a": load(free=5), "b": load(running=16, free=900)}
    views = build_views(req, loads, {}, StartLimits(), check_kv=False)
    assert [v.can_start for v in views] == [True, False]
    assert [v.can_start for v in build_views(req, loads, {}, StartLimits())] == [False, False]
    assert {name for name, cls in POLICIES.items() if cls.uses_kv} == {"kv_aware"}


def test_text_prefix_tree_agrees_with_brute_force():
    import random

    rng = random.Random(0)
    t = TextPrefixTree()
    held: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    for _ in range(200):
        text = "".join(rng.choice("xyz") for _ in range(rng.randrange(1, 30)))
        rid = rng.choice("abc")
        t.insert(text, rid)
        held[rid].append(text)
    for _ in range(200):
        probe = "".join(rng.choice("xyz") for _ in range(rng.randrange(1, 30)))
        want = {}
        for rid, texts in held.items():
            best = max(len(_lcp(probe, s)) for s in texts) if texts else 0
            if best:
                want[rid] = best
        assert t.match(probe) == want
    assert t.sizes == {rid: sum(len(n.text) for n in t._nodes_of(rid)) for rid in held}


def _lcp(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def test_replica_table_rows_follow_loads_and_keep_the_join_order():
    from shardline.cluster.replica_load import ReplicaTable

    table = ReplicaTable(capacity=2)
    for i in range(5):  # grows past its capacity
        table.set_load(f"r{i}", load(running=i, free=100 - i, tokens=10 * i))
        table.set_last_report(f"r{i}", float(i))
    table.set_indexed("r3", 42)
    assert table.ids == ["r0", "r1", "r2", "r3", "r4"] and table.load(2) == load(running=2, free=98, tokens=20)
    table.remove("r1")
    assert table.ids == ["r0", "r2", "r3", "r4"] and table.row("r3") == 2
    assert table.load(2) == load(running=3, free=97, tokens=30) and table.indexed_blocks.tolist() == [0, 0, 42, 0]
    table.set_draining("r2", True)
    # r0 reported 4 s before now=4.0: too long ago with a 3 s timeout.
    assert table.eligible(now=4.0, timeout_s=3.0).tolist() == [False, False, True, True]
    assert table.active.tolist() == [0, 2, 3, 4]


def test_columns_answer_as_one_replica_at_a_time():
    """can_start and kv_aware's cost on a whole table equal the per-replica answers."""
    import random

    from shardline.cluster.placement import start_columns
    from shardline.cluster.replica_load import ReplicaTable

    rng = random.Random(7)
    p = KVAwarePolicy()
    for trial in range(200):
        loads = {
            f"r{i}": load(running=rng.randrange(0, 17), waiting=rng.randrange(0, 2), free=rng.randrange(-5, 300),
                          blocks=300, tokens=rng.randrange(0, 3000))
            for i in range(rng.randrange(1, 9))
        }
        indexed = {rid: rng.randrange(0, 300) for rid in loads}
        matches = {rid: rng.randrange(0, 50) for rid in loads if rng.random() < 0.5}
        req = request(rng.randrange(17, 800))
        limits = rng.choice([StartLimits(), StartLimits(max_replica_waiting=1), StartLimits(max_seq_util=0.75, max_kv_util=0.75)])
        table = ReplicaTable.of((rid, ld, indexed[rid]) for rid, ld in loads.items())
        cached, start = start_columns(req, table, matches, limits)
        costs = p.costs(req, table, cached, table.indexed_blocks)
        for i, (rid, ld) in enumerate(loads.items()):
            hit = usable_cached_blocks(req.num_prompt_tokens, BS, matches.get(rid, 0))
            assert cached[i] == hit
            need = blocks_needed(req.num_prompt_tokens, BS, hit)
            assert start[i] == can_start(ld, need, limits), (trial, rid)
            assert costs[i] == p.cost(req, ReplicaView(rid, ld, hit, bool(start[i]), indexed[rid]))


def test_kv_aware_joins_a_context_being_prefilled_rather_than_copy_it():
    """Recomputing a context another replica holds costs the cluster a copy, not just TTFT."""
    req = request(1040)
    # a holds the context (64 blocks) and is prefilling another 1060 tokens; b is idle and empty.
    views = [view("a", cached=64, running=1, tokens=1060), view("b")]
    assert KVAwarePolicy(duplicate_weight=0.0).choose(req, views) == "b"  # a few tokens faster for this request
    assert KVAwarePolicy().choose(req, views) == "a"


def test_kv_aware_waits_for_its_cache_not_for_a_lighter_load():
    p = KVAwarePolicy(affinity_wait_s=5.0, affinity_min_saving=256)
    req = request(640)
    # a cannot start it and holds nothing of it; it is only less loaded than b: no reason to wait.
    views = [view("a", running=4, start=False), view("b", running=3, tokens=600)]
    assert p.choose(req, views, waited_s=0.0) == "b"
    # a holds the prefix: wait for it, up to affinity_wait_s.
    views = [view("a", cached=39, running=4, start=False), view("b", running=3, tokens=600)]
    assert p.choose(req, views, waited_s=1.0) is None
    assert p.choose(req, views, waited_s=5.0) == "b"
