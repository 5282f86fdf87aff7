"""`shardline status`: the app's deployments, their replicas and queue depth.

`summarize` is pure: Serve's instance details (the dict the controller
serves, as `serve status` reads it) plus the ModelReplicas' own stats and the
head-node scheduler's (its policy, global queue depth, prefix hit rate) in,
the report out. `fetch_status` does the I/O against a running cluster.

    {"app": "shardline", "status": "RUNNING", "deployments": [
        {"name": "ModelReplica", "status": "HEALTHY", "running_replicas": 1,
         "starting_replicas": 0, "draining_replicas": 0, "target_replicas": 1,
         "queue_depth": 0, "replicas": [{"replica_id": ..., "num_running": ..., ...}]},
        ...],
     "scheduler": {"policy": "kv_aware", "global_queue": 0, "queue_depth": 0, ...}}
"""

from __future__ import annotations

import time
from typing import Any, Optional

from shardline.deployments.config import INGRESS_NAME, REPLICA_NAME

# Serve's replica states (ReplicaState, Ray 2.60). A PENDING_MIGRATION replica still
# serves until its replacement runs; a STOPPING one takes no new requests and
# finishes those it holds (a scale-down drains it) before it goes.
_RUNNING = {"RUNNING", "PENDING_MIGRATION"}
_STARTING = {"STARTING", "UPDATING", "RECOVERING"}
_DRAINING = {"STOPPING"}


def summarize(
    details: dict[str, Any],
    app_name: str,
    replica_stats: list[dict[str, Any]],
    scheduler: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The status report of one app from Serve's details, the replicas' and the scheduler's stats."""
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        raise ValueError(f"no Serve application named {app_name!r} is running (is `shardline serve` up?)")
    deployments = []
    for name, d in (app.get("deployments") or {}).items():
        states = [_plain(r.get("state")) for r in d.get("replicas") or []]
        entry: dict[str, Any] = {
            "name": name,
            "status": _plain(d.get("status")),
            "running_replicas": sum(s in _RUNNING for s in states),
            "starting_replicas": sum(s in _STARTING for s in states),
            "draining_replicas": sum(s in _DRAINING for s in states),
            "target_replicas": int(d.get("target_num_replicas") or 0),
            "queue_depth": 0,
        }
        if name == REPLICA_NAME:
            entry["queue_depth"] = sum(int(s.get("num_waiting", 0)) for s in replica_stats)
            entry["replicas"] = replica_stats
        deployments.append(entry)
    order = {INGRESS_NAME: 0, REPLICA_NAME: 1}
    deployments.sort(key=lambda e: (order.get(e["name"], 2), e["name"]))
    return {"app": app_name, "status": _plain(app.get("status")), "deployments": deployments, "scheduler": scheduler}


def scheduler_summary(stats: Any) -> dict[str, Any]:
    """The head-node scheduler's `SchedulerStats`, JSON-ready: its policy and the global queue."""
    predicted = stats.predicted_cached_tokens / stats.bound_prompt_tokens if stats.bound_prompt_tokens else 0.0
    served = stats.finished_cached_tokens / stats.finished_prompt_tokens if stats.finished_prompt_tokens else 0.0
    return {
        "policy": stats.policy,
        # Requests waiting in the global queue for a replica.
        "global_queue": stats.num_queued_interactive + stats.num_queued_batch,
        "queued_interactive": stats.num_queued_interactive,
        "queued_batch": stats.num_queued_batch,
        "queued_by_tenant": dict(stats.queued_by_tenant),
        # The global queue plus every replica's own waiting requests (the autoscaling signal).
        "queue_depth": stats.queue_depth,
        "num_in_flight": stats.num_in_flight,
        "num_bound": stats.num_bound,
        "num_rejected": stats.num_rejected,
        "predicted_hit_rate": round(predicted, 4),
        "served_hit_rate": round(served, 4),
        "replicas": [
            {
                "replica_id": r.replica_id,
                "indexed_blocks": r.num_indexed_blocks,
                "in_flight": r.num_in_flight,
                "stale_index": r.stale_index,
                "draining": r.draining,
                "seconds_since_report": round(r.seconds_since_report, 3),
            }
            for r in stats.replicas
        ],
    }

def _plain(value: Any) -> Any:
    """Serve's status enums as their plain string values (JSON-ready)."""
    return getattr(value, "value", value)


def render_text(report: dict[str, Any]) -> str:
    """The report as a table for people."""
    lines = [f"app {report['app']}: {report['status']}"]
    header = ("DEPLOYMENT", "STATUS", "RUNNING", "STARTING", "DRAINING", "TARGET", "QUEUE")
    rows = [header] + [
        (
            d["name"],
            str(d["status"]),
            str(d["running_replicas"]),
            str(d["starting_replicas"]),
            str(d["draining_replicas"]),
            str(d["target_replicas"]),
            str(d["queue_depth"]),
        )
        for d in report["deployments"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    sched = report.get("scheduler")
    if sched is None:
        lines.append("scheduler: not running (requests go by Serve's own routing)")
    else:
        lines.append(
            f"scheduler: {sched['policy']}, global queue {sched['global_queue']} "
            f"(interactive {sched['queued_interactive']}, batch {sched['queued_batch']}), "
            f"in flight {sched['num_in_flight']}, queue depth {sched['queue_depth']}, "
            f"prefix hits {sched['served_hit_rate']:.0%}"
        )
    for d in report["deployments"]:
        for r in d.get("replicas", []):
            lines.append(
                f"  {d['name']} {r.get('replica_id')}: running {r.get('num_running')}, waiting {r.get('num_waiting')}, "
                f"free KV blocks {r.get('num_free_blocks')}/{r.get('num_blocks')}"
            )
    return "\n".join(lines)


def fetch_status(app_name: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """Read the report from the Serve instance this process is connected to (ray.init done)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise ValueError("Ray Serve is not running on this cluster (start it with `shardline serve`)")
    details = client.get_serve_details()
    stats: list[dict[str, Any]] = []
    scheduler = None
    if app_name in (details.get("applications") or {}):
        stats = _broadcast_stats(serve.get_deployment_handle(REPLICA_NAME, app_name), timeout_s)
        scheduler = fetch_scheduler_stats(app_name, timeout_s)
    return summarize(details, app_name, sorted(stats, key=lambda s: str(s.get("replica_id"))), scheduler)


def _broadcast_stats(handle, timeout_s: float) -> list[dict[str, Any]]:
    """Every replica's stats. A process that just joined the cluster learns the replicas from
    Serve's controller a moment after its first call: until then the broadcast finds none."""
    from ray.serve.exceptions import DeploymentUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return list(handle.broadcast("stats").results(timeout_s=timeout_s))
        except DeploymentUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def fetch_scheduler_stats(app_name: str, timeout_s: float = 10.0) -> Optional[dict[str, Any]]:
    """The app's scheduler summary, or None when it is not running or does not answer."""
    import ray

    from shardline.cluster.scheduler_actor import get_scheduler, scheduler_name

    actor = get_scheduler(scheduler_name(app_name))
    if actor is None:
        return None
    try:
        return scheduler_summary(ray.get(actor.stats.remote(), timeout=timeout_s))
    except ray.exceptions.RayError:
        return None

