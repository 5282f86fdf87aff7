"""A ModelReplica's start-up time, measured through the real autoscaling path.

    .venv/bin/python benchmarks/replica_startup.py [--model smollm2-135m] [--samples 3] [--write]

Starts a local Ray cluster (loopback only, inside its own network namespace
when root) and `shardline serve`'s app with queue-depth autoscaling between 1
and 2 replicas, delays cut to seconds. Each sample: a closed-loop burst of
concurrent requests makes the policy ask for a second replica; the start-up
time is from the moment Serve's target becomes 2 to the moment the new replica
is RUNNING (Ray schedules the actor, the worker imports torch and the engine,
the engine loads the model, Serve health-checks it). Then the burst stops, the
deployment scales back to 1, and the next sample starts.

That is the `startup_s` the trace simulator charges for every replica it
starts (autoscaling/calibration.py); `--write` puts the median into the
calibration file. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # last: never shadows an installed package

from peers import ensure_netns  # noqa: E402

APP = "shardline"


def _states(client) -> dict:
    """ModelReplica's target and replica states from Serve's details."""
    from shardline.deployments.config import REPLICA_NAME

    dep = client.get_serve_details()["applications"][APP]["deployments"][REPLICA_NAME]
    states = {r["replica_id"]: getattr(r["state"], "value", r["state"]) for r in dep["replicas"]}
    starts = {r["replica_id"]: float(r["start_time_s"]) for r in dep["replicas"]}
    return {"t": time.time(), "target": int(dep["target_num_replicas"]), "states": states, "starts": starts}


def _wait(client, pred, timeout_s: float, what: str) -> dict:
    deadline = time.time() + timeout_s
    while True:
        s = _states(client)
        if pred(s):
            return s
        if time.time() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s (last: {s})")
        time.sleep(0.1)


async def _burst(base_url: str, model: str, concurrency: int, max_tokens: int, stop: threading.Event) -> tuple[int, int]:
    """Closed-loop requests until `stop`; returns (answered 200, failed)."""
    import httpx

    ok = failed = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal ok, failed
        while not stop.is_set():
            body = {"model": model, "prompt": "Tell me a story about a fox.", "max_tokens": max_tokens, "ignore_eos": True}
            try:
                r = await c.post(f"{base_url}/v1/completions", json=body)
                ok, failed = (ok + 1, failed) if r.status_code == 200 else (ok, failed + 1)
            except httpx.HTTPError:
                failed += 1

    async with httpx.AsyncClient(timeout=600) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return ok, failed


def measure(model: str, samples: int, concurrency: int, max_tokens: int, torch_threads: int) -> dict:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from shardline.deployments.app import build_app
    from shardline.deployments.config import SERVE_ENV, ServeConfig
    from shardline.deployments.server import free_port
    from shardline.engine.pull import resolve_model

    resolve_model(model)
    os.environ.update(SERVE_ENV)
    port = free_port()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=4, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(
            model=model, torch_threads=torch_threads, replica_num_cpus=1, min_replicas=1, max_replicas=2,
            target_queue_depth=concurrency / 3, upscale_delay_s=1.0, downscale_delay_s=3.0,
            autoscaling_policy={"upscale_lookahead_s": 0.0, "downscale_interval_s": 1.0},
        )
        serve.run(build_app(config), name=APP, route_prefix="/")
        client = _get_global_client()
        served = config.model_name
        runs = []
        for i in range(samples):
            _wait(client, lambda s: s["target"] == 1 and list(s["states"].values()) == ["RUNNING"], 300, "back to 1 replica")
            stop = threading.Event()
            result: dict = {}
            loader = threading.Thread(
                target=lambda: result.update(out=asyncio.run(_burst(f"http://127.0.0.1:{port}", served, concurrency, max_tokens, stop)))
            )
            t_burst = time.time()
            loader.start()
            try:
                up = _wait(client, lambda s: s["target"] == 2, 300, "the scale-up decision")
                new = _wait(client, lambda s: sum(v == "RUNNING" for v in s["states"].values()) == 2, 300, "the second replica")
            finally:
                stop.set()
                loader.join()
            new_id = next(r for r, st in new["states"].items() if st == "RUNNING" and up["states"].get(r) != "RUNNING")
            run = {
                "decision_after_burst_s": round(up["t"] - t_burst, 2),
                "startup_s": round(new["t"] - up["t"], 2),
                "actor_start_to_running_s": round(new["t"] - new["starts"][new_id], 2),
                "requests": dict(zip(("ok", "failed"), result.get("out", (0, 0)))),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
            }
            print(f"sample {i}: {run}", flush=True)
            runs.append(run)
    finally:
        serve.shutdown()
        ray.shutdown()
    startups = [r["startup_s"] for r in runs]
    return {
        "model": model,
        "torch_threads": torch_threads,
        "cpu_count": os.cpu_count(),
        "samples": runs,
        "startup_s_median": round(statistics.median(startups), 2),
        "startup_s_max": max(startups),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_calibration(path: Path, result: dict) -> None:
    """Put the measured start-up time into a calibration file, keeping what it replaces on record."""
    data = json.loads(path.read_text())
    source = data.setdefault("source", {})
    source["startup_assumed_before"] = {"startup_s": data["startup_s"], "startup_overhead_s": source.pop("startup_overhead_s", None)}
    data["startup_s"] = result["startup_s_median"]
    source["startup_measured"] = {k: result[k] for k in ("startup_s_median", "startup_s_max", "samples", "measured_at", "torch_threads")}
    source["startup_method"] = (
        "benchmarks/replica_startup.py: live Ray Serve autoscaling 1 -> 2 replicas on this machine; "
        "Serve's target becomes 2 -> the new replica RUNNING, median of the samples"
    )
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    from shardline.autoscaling.calibration import DEFAULT_CALIBRATION

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--torch-threads", type=int, default=1, help="per replica (two share this 2-core machine)")
    p.add_argument("--write", nargs="?", const=str(DEFAULT_CALIBRATION), default=None, help="update this calibration JSON")
    args = p.parse_args(argv)
    isolation = ensure_netns(sys.argv)
    result = measure(args.model, args.samples, args.concurrency, args.max_tokens, args.torch_threads)
    result["isolation"] = isolation
    if args.write:
        write_calibration(Path(args.write), result)
    print(json.dumps(dict(benchmark="replica_startup", **result)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
