"""`shardline status`: the app's deployments, their replicas and queue depth.

`summarize` is pure: Serve's instance details (the dict the controller
serves, as `serve status` reads it) plus the ModelReplicas' own stats in, the
report out. `fetch_status` does the I/O against a running cluster.

    {"app": "shardline", "status": "RUNNING", "deployments": [
        {"name": "ModelReplica", "status": "HEALTHY", "running_replicas": 1,
         "starting_replicas": 0, "draining_replicas": 0, "target_replicas": 1,
         "queue_depth": 0, "replicas": [{"replica_id": ..., "num_running": ..., ...}]},
        ...]}
"""

from __future__ import annotations

from typing import Any

from deployments.config import INGRESS_NAME, REPLICA_NAME

_STARTING = {"STARTING", "UPDATING", "RECOVERING", "PENDING_MIGRATION"}
_DRAINING = {"STOPPING"}


def summarize(details: dict[str, Any], app_name: str, replica_stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The status report of one app from Serve's details and the replicas' stats."""
    app = (details.get("applications") or {}).get(app_name)
    if app is None:
        raise ValueError(f"no Serve application named {app_name!r} is running (is `shardline serve` up?)")
    deployments = []
    for name, d in (app.get("deployments") or {}).items():
        states = [_plain(r.get("state")) for r in d.get("replicas") or []]
        entry: dict[str, Any] = {
            "name": name,
            "status": _plain(d.get("status")),
            "running_replicas": states.count("RUNNING"),
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
    return {"app": app_name, "status": _plain(app.get("status")), "deployments": deployments}


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
    if app_name in (details.get("applications") or {}):
        handle = serve.get_deployment_handle(REPLICA_NAME, app_name)
        stats = list(handle.broadcast("stats").results(timeout_s=timeout_s))
    return summarize(details, app_name, sorted(stats, key=lambda s: str(s.get("replica_id"))))

