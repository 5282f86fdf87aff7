"""The scheduler actor on a real local Ray cluster: named, detached, on the head node."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")

from shardline.cluster.placement import ReplicaLoad, RouteRequest  # noqa: E402
from shardline.cluster.scheduler import ReplicaReport, RequestUsage  # noqa: E402
from shardline.cluster.scheduler_actor import get_scheduler, start_scheduler  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_actor_places_and_restarted_actor_asks_for_a_snapshot(ray_cluster):
    name = "test-scheduler"
    actor = start_scheduler(name=name, namespace="shardline-test")
    try:
        assert ray.get(actor.ping.remote())
        assert get_scheduler(name, "shardline-test") is not None
        assert start_scheduler(name=name, namespace="shardline-test")._actor_id == actor._actor_id
        load = ReplicaLoad(0, 0, 100, 100, 0, 4)
        h = tuple(i.to_bytes(32, "big") for i in range(3))
        assert not ray.get(actor.report.remote(ReplicaReport("r0", 0, load, (("stored", h),)))).resync
        ray.get(actor.report.remote(ReplicaReport("r1", 0, load)))
        a = ray.get(actor.place.remote(RouteRequest("q", "t", h, 16, 60, 4)))
        assert (a.replica_id, a.cached_tokens) == ("r0", 48)
        assert ray.get(actor.finished.remote("q", RequestUsage(60, 48, 4)))
        ray.kill(actor, no_restart=False)
        # Back empty: a replica it has not seen at seq > 0 is asked for a snapshot. The kill
        # is asynchronous, so the old process may still answer the first reports (in sequence).
        resynced = False
        for seq in range(1, 200):
            try:
                if ray.get(actor.report.remote(ReplicaReport("r0", seq, load))).resync:
                    resynced = True
                    break
            except ray.exceptions.RayActorError:
                pass
            time.sleep(0.1)
        assert resynced
    finally:
        ray.kill(actor, no_restart=True)
