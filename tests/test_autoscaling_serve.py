"""Queue-depth autoscaling in the Serve app: the config and options (no cluster), then live.

The live test runs a real local Ray cluster (bound to 127.0.0.1) with the tiny
random model and the policy's delays cut to seconds. A closed-loop burst of
concurrent requests scales ModelReplica 1 -> 2; when only a trickle of long
requests is left, it scales back to 1, and the replica Serve stops drains the
request it holds. Every request must answer 200 with all its tokens. It also
measures a replica's start-up time (the decision to scale up -> the new
replica RUNNING), which the trace simulator's calibration uses.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field

import pytest

from shardline.deployments.config import REPLICA_NAME, ServeConfig
from shardline.deployments.status import render_text, summarize

APP = "shardline"

# ---- config, options and CLI (no cluster) -------------------------------------------------


def test_autoscaling_fields_build_the_custom_policy_config():
    from ray.serve.config import AutoscalingConfig

    from shardline.autoscaling.serve_policy import POLICY_PATH, QueueDepthPolicy

    config = ServeConfig(min_replicas=0, max_replicas=4, target_queue_depth=2.5, autoscaling_policy={"kv_high": 0.9})
    policy = config.autoscaling
    assert (policy.min_replicas, policy.max_replicas, policy.target_queue_depth, policy.kv_high) == (0, 4, 2.5, 0.9)
    assert config.max_model_replicas == 4
    with pytest.warns(DeprecationWarning):  # metrics_interval_s: how Ray 2.60 still sets the push interval
        serve_cfg = AutoscalingConfig(**config.replica_autoscaling_config("sched-{app_name}"))
    assert serve_cfg.metrics_interval_s == 0.5 and serve_cfg.policy.policy_function == POLICY_PATH
    assert (serve_cfg.min_replicas, serve_cfg.max_replicas, serve_cfg.initial_replicas) == (0, 4, 1)  # up at once, idles to 0
    assert serve_cfg.upscale_delay_s == serve_cfg.downscale_delay_s == 0  # the policy's own delays are the only ones
    assert isinstance(serve_cfg.policy.get_policy()(**serve_cfg.policy.policy_kwargs), QueueDepthPolicy)
    assert serve_cfg.policy.policy_kwargs["scheduler_name"] == "sched-{app_name}"

    fixed = ServeConfig(num_replicas=3)
    assert fixed.autoscaling is None and fixed.replica_autoscaling_config() is None and fixed.max_model_replicas == 3
    passthrough = ServeConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 5})
    assert passthrough.replica_autoscaling_config() == {"min_replicas": 1, "max_replicas": 5}
    assert passthrough.max_model_replicas == 5


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(min_replicas=1), "need max_replicas"),
        (dict(autoscaling_policy={"kv_high": 0.9}), "need max_replicas"),
        (dict(max_replicas=2, autoscaling_config={"max_replicas": 2}), "not both"),
        (dict(max_replicas=2, min_replicas=3), "max_replicas must be >="),
        (dict(max_replicas=2, autoscaling_policy={"target_queue_depth": 1}), "ServeConfig fields"),
        (dict(max_replicas=2, autoscaling_policy={"kv_hi": 0.9}), "unknown autoscaling fields"),
        (dict(max_replicas=0), "greater than or equal to 1"),
        (dict(max_replicas=2, target_queue_depth=0), "greater than 0"),
    ],
)
def test_bad_autoscaling_settings_fail_at_config_time(fields, match):
    with pytest.raises(ValueError, match=match):
        ServeConfig(**fields)


def test_replica_drain_outlasts_any_request():
    assert ServeConfig().replica_graceful_shutdown_s == 600.0 + 30.0  # request_timeout_s + margin
    assert ServeConfig(request_timeout_s=None).replica_graceful_shutdown_s == 3600.0
    assert ServeConfig(drain_timeout_s=5.0, graceful_shutdown_s=20.0).replica_graceful_shutdown_s == 20.0


def test_build_app_deploys_the_policy_and_a_long_drain():
    from shardline.deployments.app import build_app

    app = build_app(ServeConfig(max_replicas=3, request_timeout_s=100.0))
    replica = app._bound_deployment.init_args[1]._bound_deployment
    options = replica._deployment_config
    assert replica.name == REPLICA_NAME
    assert options.graceful_shutdown_timeout_s == 130.0 and options.graceful_shutdown_wait_loop_s == 0.5
    kwargs = options.autoscaling_config.policy.policy_kwargs
    assert kwargs["max_replicas"] == 3 and kwargs["scheduler_name"].endswith("{app_name}")
    fixed = build_app(ServeConfig(num_replicas=2))._bound_deployment.init_args[1]._bound_deployment
    assert fixed._deployment_config.autoscaling_config is None and fixed.num_replicas == 2


def test_serve_flags_turn_autoscaling_on():
    import argparse

    from shardline.deployments.cli import build_config, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--min-replicas", "0", "--max-replicas", "4", "--target-queue-depth", "6"])
    config, _ = build_config(args)
    assert (config.min_replicas, config.max_replicas, config.target_queue_depth) == (0, 4, 6.0)
    assert config.autoscaling.min_replicas == 0
    args = parser.parse_args(["serve", "--min-replicas", "2"])
    with pytest.raises(ValueError, match="max_replicas"):
        build_config(args)


def test_status_counts_a_migrating_replica_as_running():
    details = {"applications": {APP: {"status": "RUNNING", "deployments": {REPLICA_NAME: {
        "status": "HEALTHY", "target_num_replicas": 2,
        "replicas": [{"state": "PENDING_MIGRATION"}, {"state": "STARTING"}, {"state": "STOPPING"}, {"state": "RUNNING"}],
    }}}}}
    d = summarize(details, APP, [])["deployments"][0]
    assert (d["running_replicas"], d["starting_replicas"], d["draining_replicas"]) == (2, 1, 1)


# ---- live: 1 -> 2 -> 1 on a real local cluster -----------------------------------------------

# Delays cut to what the test's physics needs: a queue that lasts a second scales up; four
# quiet seconds scale down. target 4: a burst of 12 in flight asks for 3 (max 2); the trickle
# of 2 in flight fits one replica with headroom (2 <= 4 * 0.6).
LIVE_POLICY = dict(
    min_replicas=1,
    max_replicas=2,
    target_queue_depth=4.0,
    upscale_delay_s=1.0,
    downscale_delay_s=4.0,
    autoscaling_policy={"upscale_lookahead_s": 0.0, "downscale_interval_s": 2.0},
)
BURST, TRICKLE = 12, 2
BURST_TOKENS, TRICKLE_TOKENS = 200, 1000  # trickle requests run for seconds: one is in flight when its replica stops
SCALE_TIMEOUT_S = 90.0


@dataclass
class Timeline:
    """ModelReplica's replica states over time, as `shardline status` counts them (polled from Serve)."""

    samples: list[dict] = field(default_factory=list)  # {"t", "target", "running", "starting", "draining", "ids"}
    first_seen: dict[str, dict[str, float]] = field(default_factory=dict)  # replica id -> state -> first time seen
    start_time_s: dict[str, float] = field(default_factory=dict)  # replica id -> actor start (Serve's details)
    drained: dict[str, int] = field(default_factory=dict)  # replica id -> ongoing requests when first seen STOPPING
    status_while_draining: dict | None = None  # a full `shardline status` report taken then
    errors: list[str] = field(default_factory=list)

    def first(self, pred) -> dict | None:
        return next((s for s in self.samples if pred(s)), None)


def _monitor(timeline: Timeline, stop: threading.Event, period_s: float = 0.2) -> None:
    import ray
    from ray.serve.context import _get_global_client

    from shardline.deployments.status import fetch_status

    client = _get_global_client()
    while not stop.is_set():
        try:
            details = client.get_serve_details()
            now = time.time()
            dep = details["applications"][APP]["deployments"][REPLICA_NAME]
            report = summarize(details, APP, [])
            entry = next(d for d in report["deployments"] if d["name"] == REPLICA_NAME)
            states = {r["replica_id"]: getattr(r["state"], "value", r["state"]) for r in dep["replicas"]}
            timeline.samples.append(dict(
                t=now, target=entry["target_replicas"], running=entry["running_replicas"],
                starting=entry["starting_replicas"], draining=entry["draining_replicas"], ids=states,
            ))
            for rid, state in states.items():
                timeline.first_seen.setdefault(rid, {}).setdefault(state, now)
            for r in dep["replicas"]:
                timeline.start_time_s.setdefault(r["replica_id"], float(r["start_time_s"]))
            for rid, state in states.items():
                if state == "STOPPING" and rid not in timeline.drained:
                    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{REPLICA_NAME}#{rid}", namespace="serve")
                    timeline.drained[rid] = ray.get(actor.get_num_ongoing_requests.remote(), timeout=10)
                    timeline.status_while_draining = fetch_status(APP)
        except Exception as e:  # noqa: BLE001 - recorded, asserted on at the end
            timeline.errors.append(repr(e))
        stop.wait(period_s)


@dataclass
class Outcome:
    phase: str
    ok: bool
    seconds: float
    detail: str = ""


async def _load(base_url: str, burst_until, trickle_until) -> list[Outcome]:
    """BURST closed-loop workers until burst_until() is true, TRICKLE until trickle_until() is."""
    import openai

    outcomes: list[Outcome] = []
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def worker(phase: str, until, max_tokens: int) -> None:
        while not until():
            t0 = time.monotonic()
            try:
                r = await client.completions.create(
                    model="tiny", prompt="hello there", max_tokens=max_tokens, extra_body={"ignore_eos": True}
                )
                got = (r.usage.completion_tokens, r.choices[0].finish_reason)
                outcomes.append(Outcome(phase, got == (max_tokens, "length"), time.monotonic() - t0, repr(got)))
            except Exception as e:  # noqa: BLE001 - any non-200 or cut connection is a failure
                outcomes.append(Outcome(phase, False, time.monotonic() - t0, repr(e)))

    try:
        await asyncio.gather(
            *(worker("burst", burst_until, BURST_TOKENS) for _ in range(BURST)),
            *(worker("trickle", trickle_until, TRICKLE_TOKENS) for _ in range(TRICKLE)),
        )
    finally:
        await client.close()
    return outcomes


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """Ray + Serve on 127.0.0.1 with the app autoscaling under LIVE_POLICY; torn down at the end."""
    from ray import serve

    from shardline.deployments.app import build_app
    from tests.models import make_model
    from tests.serve_cluster import local_serve

    tiny = make_model(tmp_path_factory.mktemp("autoscale-tiny"))
    with local_serve(num_cpus=4) as port:
        config = ServeConfig(
            model=str(tiny), served_model_name="tiny", max_model_len=1024, num_kv_blocks=512, block_size=16,
            max_num_seqs=32, torch_threads=1, replica_num_cpus=1, **LIVE_POLICY,
        )
        serve.run(build_app(config), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_burst_scales_1_to_2_then_back_to_1_and_every_request_answers_200(live):
    timeline = Timeline()
    stop_monitor = threading.Event()
    monitor = threading.Thread(target=_monitor, args=(timeline, stop_monitor), daemon=True)
    monitor.start()
    t0 = time.time()
    phase = {"burst_done": False, "trickle_done": False, "t_burst_end": None, "t_quiet": None}
    seen = set()

    def two_running() -> bool:
        return any(s["running"] == 2 for s in timeline.samples)

    def burst_until() -> bool:
        if phase["burst_done"]:
            return True
        if two_running() or time.time() - t0 > SCALE_TIMEOUT_S:
            phase["burst_done"], phase["t_burst_end"] = True, time.time()
        return phase["burst_done"]

    def trickle_until() -> bool:
        if phase["trickle_done"]:
            return True
        if phase["burst_done"]:
            s = timeline.samples[-1] if timeline.samples else None
            if s and s["t"] > phase["t_burst_end"] and s["target"] == 1 and s["running"] == 1 and not s["draining"]:
                seen.add("back-to-1")
            if "back-to-1" in seen or time.time() - phase["t_burst_end"] > SCALE_TIMEOUT_S + 60:
                phase["trickle_done"], phase["t_quiet"] = True, time.time()
        return phase["trickle_done"]

    try:
        outcomes = asyncio.run(_load(live, burst_until, trickle_until))
    finally:
        stop_monitor.set()
        monitor.join(timeout=30)

    failures = [o for o in outcomes if not o.ok]
    by_phase = {p: sum(o.phase == p for o in outcomes) for p in ("burst", "trickle")}
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed: {failures[:5]}"
    assert by_phase["burst"] >= BURST and by_phase["trickle"] >= TRICKLE, by_phase

    up = timeline.first(lambda s: s["target"] == 2)
    ready = timeline.first(lambda s: s["running"] == 2)
    assert up is not None and ready is not None, f"never scaled to 2 within {SCALE_TIMEOUT_S} s; errors: {timeline.errors[-3:]}"
    assert ready["t"] - t0 <= SCALE_TIMEOUT_S
    new_id = next(rid for rid in ready["ids"] if rid not in timeline.samples[0]["ids"])
    # `shardline status` counted the new replica as starting before it ran.
    assert any(s["starting"] == 1 for s in timeline.samples if up["t"] <= s["t"] < ready["t"])

    down = timeline.first(lambda s: s["t"] > ready["t"] and s["target"] == 1)
    back = timeline.first(lambda s: down is not None and s["t"] >= down["t"] and s["running"] == 1 and not s["draining"])
    assert down is not None and back is not None, f"never scaled back to 1; errors: {timeline.errors[-3:]}"
    # The replica Serve stopped held a request and finished it: every request above answered 200.
    assert timeline.drained and max(timeline.drained.values()) >= 1, timeline.drained
    status = timeline.status_while_draining
    entry = next(d for d in status["deployments"] if d["name"] == REPLICA_NAME)
    assert entry["draining_replicas"] == 1 and entry["running_replicas"] == 1
    assert "DRAINING" in render_text(status)
    stopping = [rid for rid, states in timeline.first_seen.items() if "STOPPING" in states]

    figures = {
        "scale_up_decision_s": round(up["t"] - t0, 2),  # burst start -> target 2
        "replica_startup_s": round(ready["t"] - up["t"], 2),  # target 2 -> the new replica RUNNING
        "replica_actor_to_running_s": round(timeline.first_seen[new_id]["RUNNING"] - timeline.start_time_s[new_id], 2),
        "scale_down_decision_s": round(down["t"] - phase["t_burst_end"], 2),  # burst end -> target 1
        "drain_s": round(back["t"] - down["t"], 2),  # target 1 -> the stopped replica gone
        "drained_requests": timeline.drained,
        "stopped": stopping,
        "requests": by_phase,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print("\nautoscaling live figures:", json.dumps(figures))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_to_zero_holds_requests_until_a_replica_is_ready(live, tmp_path_factory):
    """min_replicas 0: idle goes to zero replicas; requests then wait for one to start and answer 200."""
    import openai
    from ray import serve
    from ray.serve.context import _get_global_client

    from shardline.deployments.app import build_app
    from tests.models import make_model

    tiny = make_model(tmp_path_factory.mktemp("autoscale-zero"))
    config = ServeConfig(
        model=str(tiny), served_model_name="tiny", max_model_len=1024, num_kv_blocks=256, max_num_seqs=8,
        torch_threads=1, replica_num_cpus=1, min_replicas=0, max_replicas=1, downscale_to_zero_delay_s=2.0,
    )
    serve.run(build_app(config), name=APP, route_prefix="/")
    client = _get_global_client()

    def replicas() -> tuple[int, list[str]]:
        dep = client.get_serve_details()["applications"][APP]["deployments"][REPLICA_NAME]
        return int(dep["target_num_replicas"]), [getattr(r["state"], "value", r["state"]) for r in dep["replicas"]]

    deadline = time.time() + 120
    while replicas() != (0, []):
        assert time.time() < deadline, f"never scaled to zero: {replicas()}"
        time.sleep(0.2)

    async def ask(c: openai.AsyncOpenAI) -> tuple[int, str]:
        r = await c.completions.create(model="tiny", prompt="hello", max_tokens=8, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, r.choices[0].finish_reason

    async def main() -> list:
        c = openai.AsyncOpenAI(base_url=f"{live}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(ask(c) for _ in range(3)))
        finally:
            await c.close()

    t0 = time.time()
    answers = asyncio.run(main())
    waited = time.time() - t0
    assert answers == [(8, "length")] * 3
    assert replicas() == (1, ["RUNNING"])
    print(f"\nscale from zero: 3 held requests answered {waited:.2f} s after they were sent")
