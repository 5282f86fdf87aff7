"""The deployments' line to the app's head-node scheduler (cluster.scheduler_actor).

One scheduler actor per Serve app, named `scheduler_name(app)`, detached and
pinned to the head node. The ingress starts it (or finds the running one and
hands it the app's current settings); replicas only look it up.

`SchedulerLink` makes every call fail the same way: any Ray error, or a
timeout, raises `SchedulerUnavailable`, and the link then stays down for
`retry_s` (calls fail at once, without waiting on Ray) before it looks the
actor up again. Callers read `SchedulerUnavailable` as "go on without it":

- the ingress routes with Serve's power of two choices (router.py) and keeps
  serving;
- a replica drops that report; its next report skips a `seq`, so the
  scheduler sees the gap and asks for a full snapshot of the replica's cache.

Ray restarts a dead scheduler (max_restarts=-1) with its constructor
arguments; it comes back empty and rebuilds its index from the replicas'
snapshots (the resync path of cluster.kv_index). If it was killed for good,
the ingress's link starts a new one at its next look-up.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional

from shardline.cluster.global_queue import QueueLimits
from shardline.cluster.scheduler import ClusterSchedulerConfig
from shardline.cluster.scheduler_actor import DEFAULT_NAMESPACE, get_scheduler, scheduler_name, start_scheduler
from shardline.cluster.tenants import ANONYMOUS_ID, Tenant, TenantRegistry
from shardline.deployments.config import ServeConfig


class SchedulerUnavailable(RuntimeError):
    """The scheduler actor could not be reached (dead, restarting, missing or too slow)."""


def scheduler_config(config: ServeConfig) -> ClusterSchedulerConfig:
    """The scheduler's knobs from the app's ServeConfig.

    The global queue holds what the replicas' own queues held without it:
    `max_queue_len` per replica (at the most replicas autoscaling allows).
    """
    return ClusterSchedulerConfig(
        model=config.model_name,
        policy=config.routing,
        queue=QueueLimits(max_queued=config.global_queue_limit, default_retry_after_s=config.retry_after_s),
    )


def load_tenants(config: ServeConfig) -> TenantRegistry:
    """The tenants file's records, or only the anonymous tenant, queue-limited like the app."""
    if config.tenants_file:
        return TenantRegistry.from_file(config.tenants_file)
    return TenantRegistry(default=Tenant(ANONYMOUS_ID, max_queued=max(1, config.global_queue_limit)))


class SchedulerLink:
    """Calls to one named scheduler actor that fail fast and uniformly.

    Args:
        name, namespace: the actor's name.
        start: returns the actor handle, starting the actor if needed (the
            ingress); None: only look it up (replicas).
        retry_s: how long the link stays down after a failure.
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        start: Optional[Callable[[], Any]] = None,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.namespace = namespace
        self._start = start
        self.retry_s = retry_s
        self._clock = clock
        self._handle: Any = None
        self._down_until = 0.0
        # Failures since the link was created, and the last one (for tests and status).
        self.num_failures = 0
        self.last_error: Optional[str] = None
        # Ops of the current event-loop turn (places with their futures, notices with None).
        self._outbox: list[tuple[tuple[str, tuple], Optional[asyncio.Future]]] = []
        self._flush_scheduled = False
        self._collecting: set[asyncio.Task] = set()

    def available(self) -> bool:
        """False while the link is down after a failure."""
        return self._clock() >= self._down_until

    def actor(self) -> Any:
        """The actor handle; SchedulerUnavailable while down or when there is no actor."""
        if not self.available():
            raise SchedulerUnavailable(f"scheduler {self.name!r} is unreachable; retrying in under {self.retry_s} s")
        if self._handle is None:
            try:
                handle = self._start() if self._start is not None else get_scheduler(self.name, self.namespace)
            except Exception as e:  # the GCS or the actor's creation failed
                raise self._mark_down(f"scheduler {self.name!r}: {type(e).__name__}: {e}") from e
            if handle is None:
                raise self._mark_down(f"no scheduler named {self.name!r} is running")
            self._handle = handle
        return self._handle

    async def call(self, method: str, *args: Any, timeout_s: Optional[float] = None) -> Any:
        """`await actor.method(*args)`; SchedulerUnavailable on any Ray error or past `timeout_s`."""
        from ray.exceptions import RayError

        actor = self.actor()
        try:
            ref = getattr(actor, method).remote(*args)
            return await asyncio.wait_for(_awaitable(ref), timeout_s)
        except (RayError, asyncio.TimeoutError) as e:
            raise self._mark_down(f"scheduler {self.name!r}: {method} failed: {type(e).__name__}: {e}") from e

    async def place(self, request: Any) -> Any:
        """The scheduler's Assignment or Rejection for a RouteRequest; SchedulerUnavailable as `call`.

        Goes in the turn's batch (`apply`); a request the batch leaves waiting
        in the global queue is then collected with its own `wait_placed` call.
        """
        future = asyncio.get_running_loop().create_future()
        self._send(("place", (request,)), future)
        result = await future  # cancelled before the batch left: the batch drops it
        if result is None:
            return await self.call("wait_placed", request.request_id)
        return result

    def notify(self, method: str, *args: Any) -> None:
        """Send without waiting for the answer; failures are ignored.

        finished and cancel go in the turn's batch, after the places queued
        before them; any other method is its own call.
        """
        if method in _BATCHED:
            self._send((method, args), None)
            return
        try:
            getattr(self.actor(), method).remote(*args)
        except Exception:
            pass  # a scheduler that comes back forgets unknown requests anyway

    def _send(self, op: tuple[str, tuple], future: Optional[asyncio.Future]) -> None:
        """Queue one op for this event-loop turn's `apply` call."""
        self._outbox.append((op, future))
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a notice from outside any event loop goes at once
            self._flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send the turn's ops as one `apply` call; its answers resolve the places' futures."""
        self._flush_scheduled = False
        batch = [(op, f) for op, f in self._outbox if f is None or not f.done()]
        self._outbox = []
        if not batch:
            return
        try:
            ref = self.actor().apply.remote([op for op, _ in batch])
        except Exception as e:
            error = e if isinstance(e, SchedulerUnavailable) else self._mark_down(f"scheduler {self.name!r}: apply: {e}")
            _fail(batch, error)
            return
        if any(future is not None for _, future in batch):
            task = asyncio.get_running_loop().create_task(self._collect(ref, batch))
            self._collecting.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._collecting.discard)

    async def _collect(self, ref: Any, batch: list[tuple[tuple, Optional[asyncio.Future]]]) -> None:
        from ray.exceptions import RayError

        try:
            results = await ref
        except RayError as e:
            _fail(batch, self._mark_down(f"scheduler {self.name!r}: apply failed: {type(e).__name__}: {e}"))
            return
        for (_, future), result in zip(batch, results):
            if future is not None and not future.done():
                future.set_result(result)

    def _mark_down(self, error: str) -> SchedulerUnavailable:
        """Take the link down for `retry_s`; returns the error to raise."""
        self.num_failures += 1
        self.last_error = error
        self._handle = None  # look it up again: Ray may have restarted it, or it is gone for good
        self._down_until = self._clock() + self.retry_s
        return SchedulerUnavailable(error)


# Notices that ride in the ingress's per-turn batch (AsyncScheduler.apply).
_BATCHED = ("finished", "cancel")


def _fail(batch: list[tuple[tuple, Optional[asyncio.Future]]], error: Exception) -> None:
    """Fail the places of a batch that could not be sent or answered (their callers route without the scheduler)."""
    for _, future in batch:
        if future is not None and not future.done():
            future.set_exception(error)


async def _awaitable(ref: Any) -> Any:
    return await ref


def ingress_link(
    config: ServeConfig, app_name: str, tenants: Optional[TenantRegistry] = None, retry_s: float = 1.0
) -> SchedulerLink:
    """The ingress's link: starts the app's scheduler if none runs, and hands it this app's settings."""
    sched_config = scheduler_config(config)
    tenants = tenants if tenants is not None else load_tenants(config)
    name = scheduler_name(app_name)

    def start() -> Any:
        actor = start_scheduler(sched_config, tenants, name=name)
        # A scheduler left from an earlier deployment of this app keeps its index
        # but takes the new settings; calls from this process run in this order.
        actor.reconfigure.remote(sched_config, tenants)
        return actor

    return SchedulerLink(name, start=start, retry_s=retry_s)


def replica_link(app_name: str, retry_s: float = 1.0) -> SchedulerLink:
    """A replica's link: looks the app's scheduler up by name (the ingress starts it)."""
    return SchedulerLink(scheduler_name(app_name), retry_s=retry_s)


def stop_scheduler(app_name: str) -> bool:
    """Kill the app's scheduler actor (when its app is deleted); False if none ran."""
    import ray

    actor = get_scheduler(scheduler_name(app_name))
    if actor is None:
        return False
    ray.kill(actor, no_restart=True)
    return True
