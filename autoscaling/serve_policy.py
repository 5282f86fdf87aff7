"""The queue-depth policy behind Ray Serve's custom autoscaling API (Ray 2.60).

Serve's controller calls a deployment's policy every control-loop tick (0.1 s)
with an `AutoscalingContext`; the policy returns `(num_replicas, policy_state)`.
This module turns the context into `policy.ClusterLoad`, calls the pure
`policy.decide`, and keeps its `PolicyState` under one key of Serve's
`policy_state`:

- Per replica, `num_waiting`, `num_running` and `kv_usage` come from the
  replica's `record_autoscaling_stats()` (deployments' ModelReplica returns
  them; `replica_autoscaling_stats` shows the shape). The latest raw sample is
  used, not the window mean, so that a burst counts within one push interval.
  Where a replica also reports `num_inflight` (requests it accepted and has
  not finished), waiting is at least inflight minus running: the engine's
  counts are one step old, and a burst that arrived during a long step
  already counts.
- The global queue is what the head-node scheduler holds, bound to no replica:
  an optional `global_queue` metric some replica forwards (the largest report
  wins, it is one number), plus requests queued in Serve handles
  (`ctx.total_queued_requests`: where they wait when the scheduler is away),
  plus, when `scheduler_name` is given, the scheduler actor's own count read
  without blocking (`SchedulerQueueReader`). A scheduler that is not running
  counts as an empty queue: then replica metrics are all there is.
- A replica that has not reported yet counts as empty; a deployment whose
  replicas report no custom metrics at all falls back to Serve's
  `total_num_requests` as the demand.

Draining: when a replica leaves `ctx.running_replicas` (Serve picked it for
removal and set it STOPPING, or it died), the policy tells the scheduler
(`set_draining`), so that late binding sends it nothing more; Serve's own
router already dropped it from its replica set. Serve then waits for the
replica's ongoing requests up to the deployment's graceful_shutdown_timeout_s
before it kills it (deployments/app.py sets that above the request timeout).

Serve wraps every custom policy in its own delays and factors
(`_apply_autoscaling_config`) and clips to min/max afterwards; with
`serve_autoscaling_config()` those are neutral (delays 0, factors 1), so this
policy's delays are the only ones. Its cold-start path (0 running replicas and
a request in a handle) scales to one replica at once, as this policy would.

Use it in a deployment:

    from shardline.autoscaling.policy import QueueDepthConfig
    from shardline.autoscaling.serve_policy import serve_autoscaling_config
    options["autoscaling_config"] = serve_autoscaling_config(QueueDepthConfig(min_replicas=1, max_replicas=4))
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Mapping

from shardline.autoscaling.policy import ClusterLoad, PolicyState, QueueDepthConfig, ReplicaMetrics, decide

# The key of this policy's state inside Serve's policy_state dict.
STATE_KEY = "shardline"
# Custom metric names a replica's record_autoscaling_stats() returns.
WAITING, RUNNING, KV_USAGE, GLOBAL_QUEUE = "num_waiting", "num_running", "kv_usage", "global_queue"
INFLIGHT = "num_inflight"
POLICY_PATH = "shardline.autoscaling.serve_policy:QueueDepthPolicy"


def replica_autoscaling_stats(engine_stats: Mapping[str, float], global_queue: float | None = None) -> dict[str, float]:
    """What a replica's `record_autoscaling_stats()` returns, from the engine's `stats()`.

    `num_pending` (requests handed to the async engine, not yet in its
    scheduler) counts as waiting. `global_queue` is the head-node scheduler's
    queue length if the replica learned it (e.g. from its last report's reply).
    """
    out = {
        WAITING: float(engine_stats.get("num_waiting", 0)) + float(engine_stats.get("num_pending", 0)),
        RUNNING: float(engine_stats.get("num_running", 0)),
        KV_USAGE: float(engine_stats.get("kv_usage", 0.0)),
    }
    if global_queue is not None:
        out[GLOBAL_QUEUE] = float(global_queue)
    return out


def _latest(ctx: Any, name: str) -> dict[Any, float]:
    """replica id -> the metric's latest raw sample, else its window aggregate."""
    raw = (ctx.raw_metrics or {}).get(name) or {}
    agg = (ctx.aggregated_metrics or {}).get(name) or {}
    out: dict[Any, float] = {}
    for rid in set(raw) | set(agg):
        series = raw.get(rid)
        if series:
            out[rid] = float(series[-1].value)
        elif agg.get(rid) is not None:
            out[rid] = float(agg[rid])
    return out


def load_from_context(ctx: Any, global_queue: float = 0.0) -> ClusterLoad:
    """The policy's input from a Serve `AutoscalingContext` (see the module doc)."""
    waiting, running, kv = _latest(ctx, WAITING), _latest(ctx, RUNNING), _latest(ctx, KV_USAGE)
    inflight = _latest(ctx, INFLIGHT)
    forwarded = _latest(ctx, GLOBAL_QUEUE)
    handle_queued = float(ctx.total_queued_requests or 0.0)
    queue = max(0.0, global_queue) + max(forwarded.values(), default=0.0) + handle_queued
    running_ids = list(ctx.running_replicas or [])
    if not (waiting or running):
        # No replica reports custom metrics: Serve's ongoing-request count is all there is.
        return ClusterLoad((), max(queue, float(ctx.total_num_requests or 0.0)), ctx.current_num_replicas, ctx.target_num_replicas)
    replicas = tuple(
        ReplicaMetrics(
            num_waiting=int(round(max(waiting.get(rid, 0.0), inflight.get(rid, 0.0) - running.get(rid, 0.0)))),
            num_running=int(round(running.get(rid, 0.0))),
            kv_usage=min(1.0, max(0.0, kv.get(rid, 0.0))),
        )
        for rid in running_ids
    )
    return ClusterLoad(replicas, queue, ctx.current_num_replicas, ctx.target_num_replicas)


def decide_from_context(config: QueueDepthConfig, ctx: Any, global_queue: float = 0.0) -> tuple[int, dict[str, Any]]:
    """One Serve tick: (num_replicas, policy_state). Pure given the context."""
    config = dataclasses.replace(
        config,
        min_replicas=ctx.capacity_adjusted_min_replicas,
        max_replicas=max(1, ctx.capacity_adjusted_max_replicas, ctx.capacity_adjusted_min_replicas),
    )
    now = ctx.current_time if ctx.current_time is not None else time.time()
    state = PolicyState.from_dict((ctx.policy_state or {}).get(STATE_KEY))
    decision = decide(config, load_from_context(ctx, global_queue), state, now)
    new_state = dict(ctx.policy_state or {})
    new_state[STATE_KEY] = decision.state.to_dict()
    return decision.num_replicas, new_state


class SchedulerQueueReader:
    """The head-node scheduler's queue length, read without ever blocking the controller.

    At most one request is in flight; each call returns the last value that
    arrived and, once the previous request is answered and `interval_s` has
    passed, sends the next. The three callables keep Ray out of the logic
    (tests pass stubs): `submit()` starts a request, `ready(ref)` says if it is
    answered, `fetch(ref)` reads the answer (raising if it failed).
    """

    def __init__(self, submit: Callable[[], Any], ready: Callable[[Any], bool], fetch: Callable[[Any], float], interval_s: float = 1.0):
        self._submit, self._ready, self._fetch = submit, ready, fetch
        self.interval_s = interval_s
        self.value = 0.0
        self._ref: Any = None
        self._sent_at = -math.inf

    def read(self, now: float) -> float:
        if self._ref is not None and self._ready(self._ref):
            try:
                self.value = float(self._fetch(self._ref))
            except Exception:  # noqa: BLE001 - an unreachable scheduler means "no queue known"
                self.value = 0.0
            self._ref = None
        if self._ref is None and now - self._sent_at >= self.interval_s:
            try:
                self._ref = self._submit()
                self._sent_at = now
            except Exception:  # noqa: BLE001 - not there (yet): try again next interval
                self._ref, self._sent_at = None, now
        return self.value

    @classmethod
    def for_actor(cls, actor: "NamedActor", interval_s: float = 1.0) -> "SchedulerQueueReader":
        """Poll the scheduler actor's stats() for its queued interactive requests."""
        import ray

        def submit():
            return actor.get().stats.remote()

        def ready(ref) -> bool:
            done, _ = ray.wait([ref], timeout=0)
            return bool(done)

        def fetch(ref) -> float:
            try:
                return float(ray.get(ref, timeout=0).num_queued_interactive)
            except Exception:
                actor.forget()  # dead, or replaced by a new actor of that name: look it up again
                raise

        return cls(submit, ready, fetch, interval_s)


class DrainMarker:
    """Tells the scheduler, once each, which replicas left Serve's running set.

    Serve decides which replica a scale-down stops; the policy only sees it go:
    a replica id in the previous tick's running set and not in this one is
    STOPPING (draining its requests) or dead. Either way the scheduler must
    bind nothing more to it. `mark(replica_id)` sends that; it must not block,
    and its failures are ignored (no scheduler, or one that never knew the replica).
    """

    def __init__(self, mark: Callable[[str], None]):
        self._mark = mark
        self._running: set[str] | None = None

    def update(self, running: Iterable[str]) -> list[str]:
        """Mark the replicas that left since the last call; returns their ids."""
        now = set(running)
        gone = sorted(self._running - now) if self._running is not None else []
        for replica_id in gone:
            try:
                self._mark(replica_id)
            except Exception:  # noqa: BLE001 - no scheduler: Serve's router already dropped the replica
                pass
        self._running = now
        return gone

    @classmethod
    def for_actor(cls, actor: "NamedActor") -> "DrainMarker":
        def mark(replica_id: str) -> None:
            actor.get().set_draining.remote(replica_id, True)

        return cls(mark)


class NamedActor:
    """A named actor's handle, looked up on first use and again after `forget()`.

    `get()` raises ValueError while no actor has that name.
    """

    def __init__(self, name: str, namespace: str):
        self.name, self.namespace = name, namespace
        self._handle: Any = None

    def get(self) -> Any:
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return self._handle

    def forget(self) -> None:
        self._handle = None


def _replica_key(replica: Any) -> str:
    """The id a replica reports to the scheduler: its Serve unique_id."""
    return str(getattr(replica, "unique_id", replica))


class QueueDepthPolicy:
    """Serve's class-callable custom policy: `AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs=...)`.

    Serve builds it once per deployment with `policy_kwargs` (JSON) and calls it
    with an `AutoscalingContext` every tick.

    Args:
        scheduler_name, scheduler_namespace: the head-node scheduler actor whose
            global queue to add and which to tell about draining replicas (None:
            rely on replica-forwarded and handle queues). `{app_name}` in the
            name is replaced with the deployment's application name.
        scheduler_poll_s: how often to ask it.
        **config: `QueueDepthConfig` fields (min/max come from Serve's bounds).
    """

    def __init__(
        self,
        scheduler_name: str | None = None,
        scheduler_namespace: str = "shardline",
        scheduler_poll_s: float = 1.0,
        **config: Any,
    ):
        self.config = QueueDepthConfig.from_dict(config)
        self._scheduler_name, self._scheduler_namespace = scheduler_name, scheduler_namespace
        self._scheduler_poll_s = scheduler_poll_s
        self._reader: SchedulerQueueReader | None = None
        self._drains: DrainMarker | None = None

    def _connect(self, app_name: str) -> None:
        actor = NamedActor(self._scheduler_name.replace("{app_name}", app_name), self._scheduler_namespace)
        self._reader = SchedulerQueueReader.for_actor(actor, self._scheduler_poll_s)
        self._drains = DrainMarker.for_actor(actor)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        if self._scheduler_name and self._reader is None:
            self._connect(str(ctx.app_name))
        queue = 0.0
        if self._reader is not None and self._drains is not None:
            self._drains.update(_replica_key(r) for r in ctx.running_replicas or [])
            queue = self._reader.read(now)
        return decide_from_context(self.config, ctx, queue)


_DEFAULT_POLICY = QueueDepthConfig()


def queue_depth_autoscaling_policy(ctx: Any) -> tuple[int, dict[str, Any]]:
    """The policy as a plain function with the default knobs (Serve's function form)."""
    return decide_from_context(_DEFAULT_POLICY, ctx)


def serve_autoscaling_config(
    config: QueueDepthConfig,
    *,
    initial_replicas: int | None = None,
    push_interval_s: float = 1.0,
    look_back_period_s: float = 2.5,
    scheduler_name: str | None = None,
    scheduler_namespace: str = "shardline",
) -> dict[str, Any]:
    """A Serve `autoscaling_config` dict that hands every decision to this policy.

    Serve's own delays are 0 and its factors 1, so they pass this policy's
    decision through unchanged. Replicas push metrics every `push_interval_s`
    (`metrics_interval_s`) and sample them every `0.2 * look_back_period_s`
    (Serve's record-interval factor); the simulator models the same delays.
    """
    if not push_interval_s > 0 or not look_back_period_s > push_interval_s:
        raise ValueError(f"need 0 < push_interval_s < look_back_period_s, got {push_interval_s}, {look_back_period_s}")
    kwargs: dict[str, Any] = config.to_dict()
    if scheduler_name:
        kwargs.update(scheduler_name=scheduler_name, scheduler_namespace=scheduler_namespace, scheduler_poll_s=push_interval_s)
    out: dict[str, Any] = {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_queue_depth,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "upscaling_factor": 1.0,
        "downscaling_factor": 1.0,
        "metrics_interval_s": push_interval_s,
        "look_back_period_s": look_back_period_s,
        "policy": {"policy_function": POLICY_PATH, "policy_kwargs": kwargs},
    }
    if initial_replicas is not None:
        out["initial_replicas"] = initial_replicas
    return out
