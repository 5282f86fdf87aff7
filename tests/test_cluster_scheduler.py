"""The scheduler core: late binding, KV-aware placement, fairness, admission, usage, resync."""

from __future__ import annotations

from collections import Counter

import pytest

from shardline.cluster.global_queue import QueueLimits, Rejection
from shardline.cluster.kv_index import STORED
from shardline.cluster.placement import Priority, ReplicaLoad, RouteRequest
from shardline.cluster.scheduler import (
    Assignment,
    ReplicaReport,
    RequestUsage,
    ClusterScheduler,
    ClusterSchedulerConfig,
    Ticket,
)
from shardline.cluster.tenants import Prices, Tenant, TenantRegistry, UsageKey
from shardline.engine.kv_cache import hash_prompt_blocks

BS = 16


def load(running=0, waiting=0, free=1000, blocks=1000, max_seqs=4, tokens=0, step_tokens=0) -> ReplicaLoad:
    return ReplicaLoad(running, waiting, free, blocks, tokens, max_seqs, step_tokens)


class Cluster:
    """Drives a ClusterScheduler the way replicas would: numbered reports."""

    def __init__(self, sched: ClusterScheduler, replicas=("r0", "r1")):
        self.s = sched
        self.seq = {r: 0 for r in replicas}

    def report(self, rid, ld=None, events=(), admitted=(), now=0.0):
        reply = self.s.on_replica_report(ReplicaReport(rid, self.seq[rid], ld or load(), tuple(events), tuple(admitted)), now)
        self.seq[rid] += 1
        return reply


def prompt(tenant="t", n=320, seed=0, salt=()):
    tokens = [seed * 1000 + i for i in range(n)]
    return tokens, tuple(hash_prompt_blocks(tokens, BS, salt))


def rr(rid, tenant="t", n=320, seed=0, salt=(), priority=Priority.INTERACTIVE, max_tokens=16) -> RouteRequest:
    _, hashes = prompt(tenant, n, seed, salt)
    return RouteRequest(rid, tenant, hashes, BS, n, max_tokens, priority)


def test_a_burst_binds_at_once_while_it_fits_the_replicas_next_step():
    """A replica already queueing requests takes more as long as their prompts fit its next step:
    the burst is prefilled in one step instead of trickling in one report at a time."""
    s = ClusterScheduler()
    c = Cluster(s, replicas=("r0",))
    c.report("r0", load(running=2, waiting=2, max_seqs=64, tokens=640, step_tokens=2048))
    for i in range(8):
        s.submit(rr(f"q{i}", seed=i, n=320), now=0.0)
    bound = s.poll_assignments(now=0.0)
    # 640 queued + 4 x 320 = 1920 <= 2048; the fifth would make 2240.
    assert [a.request_id for a in bound] == ["q0", "q1", "q2", "q3"]
    # Without a reported step budget only the count rule (max_replica_waiting=1) applies: nothing binds.
    s2 = ClusterScheduler()
    Cluster(s2, replicas=("r0",)).report("r0", load(running=2, waiting=2, max_seqs=64, tokens=640))
    s2.submit(rr("q0", n=320), now=0.0)
    assert s2.poll_assignments(now=0.0) == []


def test_nothing_binds_while_no_replica_has_room_then_binds_on_capacity():
    s = ClusterScheduler()
    c = Cluster(s)
    c.report("r0", load(running=4))
    c.report("r1", load(running=2, free=10))  # slots, but no KV room for 21 blocks
    for i in range(3):
        assert isinstance(s.submit(rr(f"q{i}", seed=i), now=0.0), Ticket)
    assert s.poll_assignments(now=0.1) == []
    assert s.stats(0.1).num_queued_interactive == 3
    # r0 finishes one request: exactly one slot frees, exactly one request binds.
    c.report("r0", load(running=3), now=0.2)
    got = s.poll_assignments(now=0.2)
    assert got == [Assignment("q0", "r0", "t", 0, pytest.approx(0.2))]
    # The binding counts against r0 until r0 reports it: nothing more binds.
    assert s.poll_assignments(now=0.3) == []
    c.report("r0", load(running=4), admitted=["q0"], now=0.4)
    assert s.poll_assignments(now=0.4) == []
    c.report("r1", load(running=2, free=500), now=0.5)
    assert [a.request_id for a in s.poll_assignments(now=0.5)] == ["q1", "q2"]


def test_kv_aware_sends_a_request_where_its_prefix_is_cached():
    s = ClusterScheduler()
    c = Cluster(s)
    _, hashes = prompt(seed=7)
    c.report("r0", load(running=1))
    c.report("r1", load(running=2), events=[(STORED, hashes[:15])])
    s.submit(rr("q", seed=7), now=0.0)
    assert s.poll_assignments(now=0.0) == [Assignment("q", "r1", "t", 15 * BS, 0.0)]
    st = s.stats(0.0)
    assert (st.bound_prompt_tokens, st.predicted_cached_tokens) == (320, 240)


def test_salted_tenant_never_scores_on_another_tenants_blocks():
    s = ClusterScheduler()
    c = Cluster(s)
    _, acme = prompt(seed=1, salt=(b"acme",))
    c.report("r0", load(running=1), events=[(STORED, acme)])
    c.report("r1", load(running=0))
    s.submit(rr("g", tenant="globex", seed=1, salt=(b"globex",)), now=0.0)
    assert s.poll_assignments(now=0.0) == [Assignment("g", "r1", "globex", 0, 0.0)]
    s.submit(rr("a", tenant="acme", seed=1, salt=(b"acme",)), now=0.0)
    assert s.poll_assignments(now=0.0)[0].replica_id == "r0"


def test_a_context_being_prefilled_attracts_the_requests_that_share_it():
    """The index hears of a prompt's blocks after the prefill; a request running there holds them already."""
    s = ClusterScheduler()
    c = Cluster(s)
    _, other_context = prompt(n=1440, seed=9)
    c.report("r0", load(running=0, free=100, blocks=100))
    c.report("r1", load(running=0, free=100, blocks=100), events=[(STORED, other_context)])  # 90 of 100 blocks
    s.submit(rr("first", n=1024, seed=3), now=0.0)
    assert s.poll_assignments(now=0.0) == [Assignment("first", "r0", "t", 0, 0.0)]
    c.report("r0", load(running=1, free=35, blocks=100, tokens=1024), admitted=["first"], now=0.1)  # no KV events yet
    # Same context, another question: it joins the replica computing the context rather than
    # recompute it on r1 and evict what r1 holds.
    tokens, _ = prompt(n=1024, seed=3)
    follow = RouteRequest("follow", "t", tuple(hash_prompt_blocks(tokens + [7] * 40, BS)), BS, 1064, 16)
    s.submit(follow, now=0.2)
    assert s.poll_assignments(now=0.2) == [Assignment("follow", "r0", "t", 1024, pytest.approx(0.0))]
    # Once both finish, with nothing reported stored, no replica scores on that context.
    for rid in ("first", "follow"):
        s.on_request_finished(rid, None, now=1.0)
    c.report("r0", load(running=0, free=100, blocks=100), now=1.0)
    s.submit(rr("later", n=1024, seed=3), now=1.1)
    assert s.poll_assignments(now=1.1)[0].cached_tokens == 0


def test_pending_bindings_spread_a_burst():
    """Between two reports, a burst does not all land on the replica that looked emptiest."""
    s = ClusterScheduler()
    c = Cluster(s)
    c.report("r0", load(running=0))
    c.report("r1", load(running=1))
    for i in range(5):
        s.submit(rr(f"q{i}", seed=i), now=0.0)
    got = Counter(a.replica_id for a in s.poll_assignments(now=0.0))
    # Each binding adds its prefill backlog and an active request to its replica's cost.
    assert got == {"r0": 3, "r1": 2}
    assert s.stats(0.0).num_queued_interactive == 0


def test_hot_prefix_spreads_once_its_replica_runs_ahead():
    s = ClusterScheduler(ClusterSchedulerConfig(policy_knobs={"balance_abs": 2, "balance_rel": 1.5}))
    c = Cluster(s, ["r0", "r1"])
    _, hashes = prompt(seed=3)
    c.report("r0", load(max_seqs=16), events=[(STORED, hashes)])
    c.report("r1", load(max_seqs=16))
    for i in range(6):
        s.submit(rr(f"q{i}", seed=3), now=0.0)
    placed = [a.replica_id for a in s.poll_assignments(now=0.0)]
    # r0 takes the hot prefix until it is 3 ahead of r1, then r1 gets one.
    assert placed == ["r0", "r0", "r0", "r1", "r0", "r1"]


def test_batch_takes_only_idle_capacity():
    s = ClusterScheduler()
    c = Cluster(s)
    c.report("r0", load(running=3, max_seqs=4))  # 75 % of slots used: no batch
    c.report("r1", load(running=0, max_seqs=4, free=200))  # 80 % of KV used: no batch
    s.submit(rr("b0", priority=Priority.BATCH), now=0.0)
    assert s.poll_assignments(now=0.0) == []
    s.submit(rr("i0"), now=0.0)
    assert [a.request_id for a in s.poll_assignments(now=0.0)] == ["i0"]
    c.report("r1", load(running=0, max_seqs=4, free=1000), now=1.0)
    assert [a.request_id for a in s.poll_assignments(now=1.0)] == ["b0"]


def test_batch_waits_while_interactive_is_queued():
    s = ClusterScheduler()
    c = Cluster(s)
    c.report("r0", load(running=0, max_seqs=4, free=30, blocks=40))  # room for a small prompt only
    c.report("r1", load(running=4, max_seqs=4))
    s.submit(rr("big", n=600), now=0.0)  # needs 38 blocks: waits
    s.submit(rr("b0", n=32, priority=Priority.BATCH), now=0.0)
    assert s.poll_assignments(now=0.0) == []
    s.cancel("big")
    assert [a.request_id for a in s.poll_assignments(now=0.1)] == ["b0"]


def test_flooding_tenant_does_not_starve_another_through_the_scheduler():
    s = ClusterScheduler(ClusterSchedulerConfig(queue=QueueLimits(max_queued=10_000)),
                  TenantRegistry([Tenant("flood", max_queued=10_000), Tenant("calm", max_queued=10_000)]))
    c = Cluster(s)
    for i in range(400):
        s.submit(rr(f"f{i}", tenant="flood", seed=i), now=0.0)
    for i in range(40):
        s.submit(rr(f"c{i}", tenant="calm", seed=1000 + i), now=0.0)
    order: list[str] = []
    running: dict[str, list[str]] = {"r0": [], "r1": []}
    now = 0.0
    for step in range(40):
        now += 0.1
        for rid in running:  # each replica finishes its oldest request every step
            if running[rid]:
                s.on_request_finished(running[rid].pop(0), None, now)
            c.report(rid, load(running=len(running[rid])), admitted=running[rid], now=now)
        for a in s.poll_assignments(now):
            running[a.replica_id].append(a.request_id)
            order.append(a.tenant_id)
    # 8 slots at first, then 2 a step: the binds alternate while both are backlogged.
    assert len(order) == 86
    assert Counter(order[:80]) == {"flood": 40, "calm": 40}
    assert order[80:] == ["flood"] * 6


def test_admission_rejects_with_429_and_retry_after():
    reg = TenantRegistry([Tenant("a", max_queued=2)])
    s = ClusterScheduler(ClusterSchedulerConfig(queue=QueueLimits(max_queued=3)), reg)
    Cluster(s).report("r0", load(running=4))
    assert isinstance(s.submit(rr("a0", tenant="a"), 0.0), Ticket)
    assert isinstance(s.submit(rr("a1", tenant="a"), 0.0), Ticket)
    r = s.submit(rr("a2", tenant="a"), 0.0)
    assert isinstance(r, Rejection)
    assert (r.status, r.reason, r.retry_after_s) == (429, "tenant_queue_full", 5)
    assert isinstance(s.submit(rr("b0", tenant="b"), 0.0), Ticket)
    r = s.submit(rr("b1", tenant="b"), 0.0)
    assert (r.status, r.reason) == (429, "queue_full")
    assert s.stats(0.0).num_rejected == 2


def test_prompt_no_replica_can_hold_is_rejected_400():
    s = ClusterScheduler()
    Cluster(s).report("r0", load(blocks=100, free=100))
    r = s.submit(rr("huge", n=2000), now=0.0)
    assert (r.status, r.reason) == (400, "too_large")
    assert "126 KV blocks" in r.message


def test_usage_is_charged_to_tenant_model_and_replica():
    reg = TenantRegistry([Tenant("a", prices=Prices(prompt=1.0, cached=0.1, completion=2.0))])
    s = ClusterScheduler(ClusterSchedulerConfig(model="smol"), reg)
    Cluster(s).report("r0", load())
    s.submit(rr("q", tenant="a"), now=0.0)
    s.poll_assignments(now=1.0)
    assert s.on_request_finished("q", RequestUsage(320, 240, 10), now=3.5)
    assert not s.on_request_finished("q", RequestUsage(320, 240, 10), now=3.5)
    usage = s.take_usage()[UsageKey("a", "smol", "r0")]
    assert (usage.requests, usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (1, 320, 240, 10)
    assert usage.seconds == 2.5
    assert usage.cost == pytest.approx((80 * 1.0 + 240 * 0.1 + 10 * 2.0) / 1e6)
    assert s.take_usage() == {}
    st = s.stats(3.5)
    assert (st.finished_prompt_tokens, st.finished_cached_tokens, st.num_in_flight) == (320, 240, 0)


def test_report_gap_asks_for_resync_and_snapshot_restores_hits():
    s = ClusterScheduler()
    _, hashes = prompt(seed=5)
    assert not s.on_replica_report(ReplicaReport("r0", 0, load(), ((STORED, hashes[:4]),)), 0.0).resync
    reply = s.on_replica_report(ReplicaReport("r0", 2, load(), ()), 0.1)  # seq 1 lost
    assert reply.resync
    assert s.stats(0.1).replicas[0].stale_index
    assert not s.replace_replica_index("r0", hashes, seq=2).resync
    s.submit(rr("q", seed=5), now=0.2)
    assert s.poll_assignments(now=0.2)[0].cached_tokens == 19 * BS


def test_silent_draining_and_removed_replicas_get_nothing():
    s = ClusterScheduler(ClusterSchedulerConfig(replica_timeout_s=5.0))
    c = Cluster(s, ["r0", "r1", "r2"])
    c.report("r0", load(), now=0.0)
    c.report("r1", load(), now=10.0)
    c.report("r2", load(), now=10.0)
    s.set_draining("r2")
    with pytest.raises(ValueError, match="unknown replica 'r9'"):
        s.set_draining("r9")
    for i in range(3):
        s.submit(rr(f"q{i}", seed=i), now=10.0)
    assert {a.replica_id for a in s.poll_assignments(now=10.0)} == {"r1"}
    assert sorted(s.remove_replica("r1")) == ["q0", "q1", "q2"]
    assert s.replica_ids() == ["r0", "r2"]


def test_pending_binding_expires_when_the_replica_never_reports_it():
    s = ClusterScheduler(ClusterSchedulerConfig(pending_ttl_s=2.0))
    c = Cluster(s, ["r0"])
    c.report("r0", load(running=3))
    s.submit(rr("q0", seed=0), now=0.0)
    s.submit(rr("q1", seed=1), now=0.0)
    assert [a.request_id for a in s.poll_assignments(now=0.0)] == ["q0"]
    c.report("r0", load(running=3), now=1.0)
    assert s.poll_assignments(now=1.0) == []  # q0 still pending
    c.report("r0", load(running=3), now=2.5)
    assert [a.request_id for a in s.poll_assignments(now=2.5)] == ["q1"]  # q0 was lost


def test_request_waits_for_its_cached_replica_briefly():
    s = ClusterScheduler(ClusterSchedulerConfig(policy_knobs={"affinity_wait_s": 0.25}))
    c = Cluster(s)
    _, hashes = prompt(n=640, seed=9)
    c.report("r0", load(running=4), events=[(STORED, hashes)])
    c.report("r1", load(running=0))
    s.submit(rr("q", n=640, seed=9), now=0.0)
    assert s.poll_assignments(now=0.1) == []
    c.report("r0", load(running=3), now=0.2)
    assert s.poll_assignments(now=0.2)[0].replica_id == "r0"
    s.submit(rr("q2", n=640, seed=9), now=0.2)
    c.report("r0", load(running=4), admitted=["q"], now=0.3)
    assert s.poll_assignments(now=0.3) == []
    assert s.poll_assignments(now=0.5)[0].replica_id == "r1"  # waited long enough


@pytest.mark.parametrize("policy", ["round_robin", "pow2", "prefix_approx", "kv_aware"])
def test_every_policy_runs_through_the_scheduler(policy):
    s = ClusterScheduler(ClusterSchedulerConfig(policy=policy))
    c = Cluster(s, ["r0", "r1", "r2"])
    for r in c.seq:
        c.report(r, load(max_seqs=8))
    for i in range(12):
        req = RouteRequest(f"q{i}", "t", (), BS, 10, 4, prompt_text=f"context {i % 3} question {i}")
        assert isinstance(s.submit(req, now=0.0), Ticket)
    got = s.poll_assignments(now=0.0)
    assert len(got) == 12 and all(a.replica_id in c.seq for a in got)
    assert s.stats(0.0).policy == policy
    with pytest.raises(ValueError, match="unknown routing policy"):
        ClusterScheduler(ClusterSchedulerConfig(policy="random"))


def test_reconfigure_swaps_policy_limits_and_tenants_and_keeps_the_index():
    s = ClusterScheduler(ClusterSchedulerConfig(policy="round_robin"))
    c = Cluster(s)
    h = tuple(hash_prompt_blocks(list(range(64)), BS))
    c.report("r0", events=[(STORED, h)])
    c.report("r1")
    policy = s.policy
    s.reconfigure(ClusterSchedulerConfig(policy="round_robin"))
    assert s.policy is policy  # unchanged settings keep a stateful policy's state
    tenants = TenantRegistry([Tenant("t", max_queued=1)])
    s.reconfigure(ClusterSchedulerConfig(policy="kv_aware", queue=QueueLimits(max_queued=7)), tenants)
    assert s.policy.name == "kv_aware" and s.queue.limits.max_queued == 7 and s.tenants is tenants
    s.submit(RouteRequest("q", "t", h, BS, 70, 4), 0.0)
    (a,) = s.poll_assignments(0.0)
    assert (a.replica_id, a.cached_tokens) == ("r0", 64)  # the index survived
    assert isinstance(s.submit(RouteRequest("q2", "t", h, BS, 70, 4), 0.0), Ticket)
    assert isinstance(s.submit(RouteRequest("q3", "t", h, BS, 70, 4), 0.0), Rejection)  # the tenant's new limit
