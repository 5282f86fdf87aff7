"""The global queue: fair shares, priorities, skipping, admission with Retry-After."""

from __future__ import annotations

from collections import Counter

from shardline.cluster.global_queue import GlobalQueue, QueuedRequest, QueueLimits, Rejection
from shardline.cluster.placement import Priority, RouteRequest


def req(rid: str, tenant: str, priority=Priority.INTERACTIVE, tokens=100) -> RouteRequest:
    return RouteRequest(rid, tenant, (), 16, tokens, max_tokens=0, priority=priority)


def take(q: GlobalQueue, n: int, now: float = 0.0, accept=lambda item: True) -> list[QueuedRequest]:
    """Dispatch with room for `n` binds."""
    got: list[QueuedRequest] = []

    def try_place(item):
        if len(got) < n and accept(item):
            got.append(item)
            return "r"
        return None

    q.dispatch(try_place, now, has_room=lambda: len(got) < n)
    return got


def test_flooding_tenant_does_not_starve_another():
    q = GlobalQueue(QueueLimits(max_queued=10_000))
    for i in range(1000):
        q.submit(req(f"a{i}", "flood"), 1.0, 10_000, now=0.0)
    for i in range(100):
        q.submit(req(f"b{i}", "calm"), 1.0, 10_000, now=0.0)
    served = Counter()
    for _ in range(200):
        for item in take(q, 1):
            served[item.request.tenant_id] += 1
    assert served == {"flood": 100, "calm": 100}
    # FIFO within a tenant.
    assert [i.request.request_id for i in take(q, 3)] == ["a100", "a101", "a102"]


def test_weighted_shares():
    q = GlobalQueue(QueueLimits(max_queued=10_000))
    for i in range(300):
        q.submit(req(f"g{i}", "gold"), 3.0, 10_000, now=0.0)
        q.submit(req(f"s{i}", "silver"), 1.0, 10_000, now=0.0)
    served = Counter(item.request.tenant_id for item in take(q, 200))
    assert served == {"gold": 150, "silver": 50}


def test_cost_counts_tokens_not_requests():
    q = GlobalQueue(QueueLimits(max_queued=10_000))
    for i in range(100):
        q.submit(req(f"l{i}", "long", tokens=400), 1.0, 10_000, now=0.0)
        q.submit(req(f"s{i}", "short", tokens=100), 1.0, 10_000, now=0.0)
    served = Counter(item.request.tenant_id for item in take(q, 50))
    assert served == {"short": 40, "long": 10}


def test_returning_tenant_banks_no_credit():
    q = GlobalQueue(QueueLimits(max_queued=10_000))
    for i in range(500):
        q.submit(req(f"a{i}", "a"), 1.0, 10_000, now=0.0)
    take(q, 100)
    for i in range(100):
        q.submit(req(f"b{i}", "b"), 1.0, 10_000, now=1.0)
    served = Counter(item.request.tenant_id for item in take(q, 40))
    assert served == {"a": 20, "b": 20}  # b did not get 100 in a row for having been away


def test_interactive_before_batch_and_batch_only_when_none_waits():
    q = GlobalQueue()
    for i in range(3):
        q.submit(req(f"batch{i}", "t", Priority.BATCH), 1.0, 100, now=0.0)
    q.submit(req("chat0", "u"), 1.0, 100, now=0.0)
    q.submit(req("chat1", "u"), 1.0, 100, now=0.0)
    assert [i.request.request_id for i in take(q, 3)] == ["chat0", "chat1", "batch0"]
    # An interactive request that cannot be placed holds every batch request back.
    q.submit(req("chat2", "u"), 1.0, 100, now=0.0)
    assert take(q, 5, accept=lambda item: item.request.priority is Priority.BATCH) == []
    assert q.num_queued(Priority.BATCH) == 2
    assert [i.request.request_id for i in take(q, 5)] == ["chat2", "batch1", "batch2"]


def test_a_head_that_cannot_be_placed_skips_only_its_tenant():
    q = GlobalQueue()
    q.submit(req("big", "a", tokens=5000), 1.0, 100, now=0.0)
    q.submit(req("a2", "a"), 1.0, 100, now=0.0)
    q.submit(req("b1", "b"), 1.0, 100, now=0.0)
    q.submit(req("b2", "b"), 1.0, 100, now=0.0)
    got = take(q, 10, accept=lambda item: item.request.num_prompt_tokens < 1000)
    assert [i.request.request_id for i in got] == ["b1", "b2"]  # a2 stays behind a's head
    assert len(q) == 2


def test_cancel():
    q = GlobalQueue()
    q.submit(req("x", "a"), 1.0, 100, now=0.0)
    q.submit(req("y", "a"), 1.0, 100, now=0.0)
    assert q.cancel("x").request.request_id == "x"
    assert q.cancel("x") is None
    assert "x" not in q and "y" in q
    assert [i.request.request_id for i in take(q, 5)] == ["y"]


def test_queue_limit_rejects_with_retry_after_from_drain_rate():
    q = GlobalQueue(QueueLimits(max_queued=10, rate_window_s=10.0))
    for i in range(10):
        q.submit(req(f"w{i}", f"t{i % 5}"), 1.0, 100, now=0.0)
    take(q, 5, now=1.0)  # 5 dispatched in the last 10 s: 0.5 req/s
    for i in range(10, 15):
        assert isinstance(q.submit(req(f"w{i}", f"t{i % 5}"), 1.0, 100, now=1.0), QueuedRequest)
    assert len(q) == 10
    r = q.submit(req("late", "t0"), 1.0, 100, now=2.0)
    assert r == Rejection(
        "late", "t0", 429, "queue_full", "the server queue is full (10 requests waiting); retry in 2 s", 2
    )
    # Nothing dispatched within the window: the default.
    assert q.submit(req("later", "t0"), 1.0, 100, now=20.0).retry_after_s == 5


def test_tenant_limit_rejects_with_the_tenants_own_rate():
    q = GlobalQueue(QueueLimits(max_queued=100, rate_window_s=10.0))
    for i in range(5):
        q.submit(req(f"a{i}", "a"), 1.0, 5, now=0.0)
    take(q, 2, now=0.0)  # a drains at 0.2 req/s
    for i in range(5, 7):
        assert isinstance(q.submit(req(f"a{i}", "a"), 1.0, 5, now=1.0), QueuedRequest)
    r = q.submit(req("a7", "a"), 1.0, 5, now=1.0)
    assert (r.status, r.reason, r.retry_after_s) == (429, "tenant_queue_full", 5)
    assert isinstance(q.submit(req("b0", "b"), 1.0, 5, now=1.0), QueuedRequest)  # others unaffected


def test_duplicate_id_is_rejected():
    q = GlobalQueue()
    q.submit(req("x", "a"), 1.0, 100, now=0.0)
    r = q.submit(req("x", "a"), 1.0, 100, now=0.0)
    assert (r.status, r.reason) == (400, "duplicate")
