"""The asyncio front of the scheduler, with a fake clock; plain asyncio, no Ray."""

from __future__ import annotations

import asyncio

from shardline.cluster.async_scheduler import PARKED_TTL_S, AsyncScheduler
from shardline.cluster.global_queue import Rejection
from shardline.cluster.kv_index import STORED
from shardline.cluster.placement import ReplicaLoad, RouteRequest
from shardline.cluster.scheduler import Assignment, ReplicaReport, RequestUsage, ClusterSchedulerConfig


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def load(running: int) -> ReplicaLoad:
    return ReplicaLoad(running, 0, 1000, 1000, 0, 2)


def req(rid: str, hashes=()) -> RouteRequest:
    return RouteRequest(rid, "t", tuple(hashes), 16, 64, 8)


def test_place_waits_until_a_replica_reports_room():
    async def main():
        clock = Clock()
        s = AsyncScheduler(clock=clock, tick_s=0.001)
        s.report(ReplicaReport("r0", 0, load(2)))
        task = asyncio.create_task(s.place(req("q")))
        await asyncio.sleep(0.01)
        assert not task.done()
        clock.t = 1.0
        s.report(ReplicaReport("r0", 1, load(1)))
        a = await asyncio.wait_for(task, 1.0)
        assert a == Assignment("q", "r0", "t", 0, 1.0)
        assert s.finished("q", RequestUsage(64, 0, 8))
        assert s.stats().num_in_flight == 0

    asyncio.run(main())


def test_place_follows_the_cache_and_the_ticker_ends_an_affinity_wait():
    async def main():
        clock = Clock()
        s = AsyncScheduler(ClusterSchedulerConfig(policy_knobs={"affinity_wait_s": 0.5, "affinity_min_saving": 16}),
                           clock=clock, tick_s=0.001)
        h = [i.to_bytes(32, "big") for i in range(4)]
        s.report(ReplicaReport("r0", 0, load(2), ((STORED, tuple(h)),)))
        s.report(ReplicaReport("r1", 0, load(0)))
        task = asyncio.create_task(s.place(req("q", h)))
        await asyncio.sleep(0.01)
        assert not task.done()  # waits for r0, which holds its prefix
        clock.t = 0.6  # no event: the ticker notices the wait ran out
        a = await asyncio.wait_for(task, 1.0)
        assert a.replica_id == "r1"

    asyncio.run(main())


def test_timeout_and_cancel_leave_the_queue():
    async def main():
        clock = Clock()
        s = AsyncScheduler(clock=clock, tick_s=0.001)
        s.report(ReplicaReport("r0", 0, load(2)))
        r = await s.place(req("late"), timeout_s=0.01)
        assert isinstance(r, Rejection) and (r.status, r.reason) == (503, "timeout")
        task = asyncio.create_task(s.place(req("gone")))
        await asyncio.sleep(0.005)
        assert s.cancel("gone")
        r = await task
        assert (r.status, r.reason) == (499, "cancelled")
        task = asyncio.create_task(s.place(req("dropped")))
        await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert s.stats().num_queued_interactive == 0
        # Capacity frees: nothing binds, nothing leaks.
        s.report(ReplicaReport("r0", 1, load(0)))
        assert s.stats().num_in_flight == 0

    asyncio.run(main())


def test_rejection_comes_back_at_once():
    async def main():
        s = AsyncScheduler(clock=Clock())
        s.report(ReplicaReport("r0", 0, ReplicaLoad(0, 0, 10, 10, 0, 2)))
        r = await s.place(RouteRequest("huge", "t", (), 16, 1000))
        assert (r.status, r.reason) == (400, "too_large")

    asyncio.run(main())


def test_apply_answers_each_op_in_order_and_parks_what_must_wait():
    async def main():
        clock = Clock()
        s = AsyncScheduler(clock=clock, tick_s=0.001)
        s.report(ReplicaReport("r0", 0, load(1)))  # room for one more
        huge = RouteRequest("huge", "t", (), 16, 10**6)  # more blocks than the replica has
        got = s.apply([("place", (req("a"),)), ("place", (req("b"),)), ("place", (huge,))])
        assert isinstance(got[0], Assignment) and got[1] is None and isinstance(got[2], Rejection)
        # a finishes in the next batch, ahead of c: b (queued first) takes its place, c waits.
        got = s.apply([("finished", ("a", RequestUsage(64, 0, 8))), ("place", (req("c"),))])
        assert got == [True, None]
        assert (await s.wait_placed("b")).replica_id == "r0"
        task = asyncio.create_task(s.wait_placed("c"))
        await asyncio.sleep(0.005)
        assert not task.done()
        assert s.apply([("cancel", ("c",))]) == [True]
        assert (await task).status == 499
        assert (await s.wait_placed("never-parked")).status == 499
        assert s.stats().num_in_flight == 1 and s.stats().num_queued_interactive == 0

        # A parked place nobody collects (its ingress died) is dropped after PARKED_TTL_S: queued or bound, it
        # holds nothing any more.
        s.apply([("place", (req("orphan-1"),)), ("place", (req("orphan-2"),))])
        s.apply([("finished", ("b", None))])  # room for one: orphan-1 binds, orphan-2 stays queued
        clock.t += PARKED_TTL_S + 1
        s.apply([])
        assert s.stats().num_in_flight == 0 and s.stats().num_queued_interactive == 0
        assert (await s.wait_placed("orphan-1")).status == 499

    asyncio.run(main())
