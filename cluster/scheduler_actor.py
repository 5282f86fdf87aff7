"""The head-node scheduler as a Ray actor: one per app, named, detached, on the head node.

The only module of `cluster` that imports ray. The actor is `AsyncScheduler`
as is (an async actor: every method runs on its one event loop, so the core
needs no locks). Ray restarts it if it dies; it comes back empty, and the
replicas' next reports (an unknown replica at `seq > 0`) make it ask each one
for an index snapshot, so the index rebuilds itself. Callers that cannot
reach it fall back to Serve's own routing.
"""

from __future__ import annotations

from pathlib import Path

import ray

from shardline.cluster.async_scheduler import AsyncScheduler
from shardline.cluster.scheduler import ClusterSchedulerConfig
from shardline.cluster.tenants import TenantRegistry

DEFAULT_NAME = "shardline-scheduler"
DEFAULT_NAMESPACE = "shardline"


class SchedulerActor(AsyncScheduler):
    """`AsyncScheduler` as a Ray actor (see `start_scheduler`)."""

    def ping(self) -> bool:
        return True


def scheduler_name(app_name: str) -> str:
    """The actor name of one Serve app's scheduler (one scheduler per app)."""
    return f"{DEFAULT_NAME}-{app_name}"


def start_scheduler(
    config: ClusterSchedulerConfig = ClusterSchedulerConfig(),
    tenants: TenantRegistry | str | Path | None = None,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    pin_to_head: bool = True,
) -> "ray.actor.ActorHandle":
    """Start the scheduler actor, or return the running one with that name."""
    options = dict(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
        # place() and wait_placed() calls wait in the actor's event loop: allow many at once.
        max_concurrency=100_000,
    )
    if pin_to_head:
        options["resources"] = {"node:__internal_head__": 0.001}
    return ray.remote(SchedulerActor).options(**options).remote(config, tenants)


def get_scheduler(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> "ray.actor.ActorHandle | None":
    """The running scheduler actor, or None."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
