"""The trace simulator: sanity, conservation, determinism; traces; Serve's default re-implemented; `shardline capacity`."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from shardline.autoscaling.calibration import DEFAULT_CALIBRATION, ReplicaCostModel, load_calibration
from shardline.autoscaling.policy import QueueDepthConfig
from shardline.autoscaling.serve_default import ServeDefaultConfig, ServeDefaultState, WindowedMean, serve_default_decide
from shardline.autoscaling.simulator import (
    SLO,
    QueueDepthAutoscaler,
    ServeDefaultAutoscaler,
    Simulator,
    StaticAutoscaler,
    min_static_replicas,
    simulate,
)
from shardline.autoscaling.traces import TraceRequest, bursty_trace, diurnal_trace, load_trace, make_trace, steady_trace

ROOT = Path(__file__).resolve().parents[1]
SLO_ = SLO(ttft_s=10.0, tpot_s=1.0)


@pytest.fixture(scope="module")
def cost() -> ReplicaCostModel:
    """The measured SmolLM2 CPU replica, deployed with 16 sequences and 512 tokens per step."""
    return dataclasses.replace(load_calibration(), max_batch_size=16, max_batched_tokens=512)


# ---- the cost model ------------------------------------------------------------------


def test_default_calibration_is_a_real_measurement_with_its_load_average():
    c = load_calibration()
    assert DEFAULT_CALIBRATION.is_file()
    assert c.source["model"] == "smollm2-135m" and c.source["loadavg_before"] and c.source["engine_load_s"] > 0
    # A decode step costs more with a bigger batch, less per sequence.
    steps = [c.decode_time(b) for b in (1, 2, 4, 8, 16, 32, 64)]
    assert steps == sorted(steps)
    assert c.decode_time(32) / 32 < c.decode_time(1)
    assert c.step_time(0, 100, 0) == pytest.approx(c.prefill_overhead_s + 100 / c.prefill_tokens_per_s)


def test_calibration_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_calibration(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(load_calibration().to_dict(), extra=1)))
    with pytest.raises(ValueError, match="unknown calibration fields"):
        load_calibration(bad)
    bad.write_text(json.dumps(dict(load_calibration().to_dict(), decode_step_s=[0.1])))
    with pytest.raises(ValueError, match="same length"):
        load_calibration(bad)


# ---- traces ----------------------------------------------------------------------------


def test_generated_traces_have_their_rates_and_are_seeded():
    steady = steady_trace(2.0, 2000, seed=1)
    assert len(steady) == pytest.approx(4000, rel=0.08)
    assert steady == steady_trace(2.0, 2000, seed=1) and steady != steady_trace(2.0, 2000, seed=2)
    bursty = bursty_trace(2.0, 20000, seed=1)
    # On 20% of the time at the peak, 80% at 15% of it: about 0.44 req/s on average.
    assert len(bursty) / 20000 == pytest.approx(0.2 * 2.0 + 0.8 * 0.3, rel=0.25)
    per_minute = [0] * (20000 // 60 + 1)
    for r in bursty:
        per_minute[int(r.arrival_s // 60)] += 1
    assert max(per_minute) > 3 * (len(bursty) / len(per_minute))  # bursts, not a flat rate
    diurnal = diurnal_trace(1.0, 3600, seed=1, period_s=3600)
    first, middle = [r for r in diurnal if r.arrival_s < 600], [r for r in diurnal if 1500 <= r.arrival_s < 2100]
    assert len(middle) > 3 * len(first)  # trough at the start, peak in the middle
    assert all(16 <= r.prompt_tokens <= 512 and 8 <= r.output_tokens <= 192 for r in steady)


def test_trace_files_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("timestamp,prompt_tokens,output_tokens\n105.5,20,5\n100,10,3\n")
    assert load_trace(csv_path) == [TraceRequest(0.0, 10, 3), TraceRequest(5.5, 20, 5)]
    jl = tmp_path / "t.jsonl"
    jl.write_text('{"arrival_s": 1, "prompt_tokens": 7, "output_tokens": 2}\n\n{"arrival_s": 3, "prompt_tokens": 8, "output_tokens": 4}\n')
    assert make_trace(str(jl), 1.0, 1.0) == [TraceRequest(0.0, 7, 2), TraceRequest(2.0, 8, 4)]
    (tmp_path / "bad.csv").write_text("arrival_s,prompt_tokens\n1,2\n")
    with pytest.raises(ValueError, match="request 1"):
        load_trace(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="unknown trace"):
        make_trace("spiky", 1.0, 10.0)
    with pytest.raises(ValueError):
        steady_trace(0.0, 10.0)


# ---- the simulator ------------------------------------------------------------------------


def test_static_at_peak_meets_the_slo_on_a_steady_trace(cost):
    trace = steady_trace(0.5, 600, seed=3)
    n, run = min_static_replicas(trace, cost, SLO_, 0.99, duration_s=600)
    assert 2 <= n <= 6
    assert run.slo_attainment >= 0.99 and run.completed == len(trace)
    # One replica fewer misses it: the search returned the smallest count.
    assert simulate(trace, cost, StaticAutoscaler(n - 1), SLO_, duration_s=600).slo_attainment < 0.99
    # Static cost is exact: n replicas for the whole run.
    assert run.replica_hours == pytest.approx(n * run.duration_s / 3600)
    assert run.ttft_p50_s < SLO_.ttft_s and run.tpot_p50_s < SLO_.tpot_s


@pytest.mark.parametrize(
    "make",
    [
        lambda: StaticAutoscaler(2),
        lambda: QueueDepthAutoscaler(QueueDepthConfig(min_replicas=1, max_replicas=6)),
        lambda: QueueDepthAutoscaler(QueueDepthConfig(min_replicas=0, max_replicas=6, downscale_to_zero_delay_s=30)),
        lambda: ServeDefaultAutoscaler(ServeDefaultConfig(min_replicas=1, max_replicas=6, target_ongoing_requests=3, downscale_delay_s=60)),
    ],
    ids=["static", "queue-depth", "queue-depth-min0", "serve-default"],
)
def test_every_request_completes_whatever_the_scaling(cost, make):
    trace = bursty_trace(2.0, 900, seed=4)
    sim = Simulator(trace, cost, make(), SLO_, duration_s=900)
    run = sim.run()
    assert run.completed == run.num_requests == len(trace)
    assert all(r.finish >= r.first_token >= r.arrival and r.generated == r.output for r in sim.reqs)
    # Draining: no replica stopped while holding a request, and none is left holding one.
    assert all(not rep.running and not rep.waiting for rep in sim.replicas)
    assert not sim.queue


def test_runs_are_deterministic_given_the_trace(cost):
    def once(seed: int):
        trace = bursty_trace(2.0, 600, seed=seed)
        return simulate(trace, cost, QueueDepthAutoscaler(QueueDepthConfig(max_replicas=6)), SLO_, duration_s=600).summary()

    assert once(7) == once(7)
    assert once(7) != once(8)


def test_scale_to_zero_holds_requests_until_a_replica_is_ready(cost):
    # Two requests 1000 s apart: the deployment goes to zero in between.
    trace = [TraceRequest(0.0, 64, 8), TraceRequest(1000.0, 64, 8)]
    cfg = QueueDepthConfig(min_replicas=0, max_replicas=2, downscale_to_zero_delay_s=60)
    sim = Simulator(trace, cost, QueueDepthAutoscaler(cfg), SLO_, duration_s=1000)
    run = sim.run()
    assert run.completed == 2
    assert (1000.0 - 1e-9 > max(t for t, n in run.timeline if n == 0)) and any(n == 0 for _, n in run.timeline)
    late = sim.reqs[1]
    # Held in the global queue: its first token comes after a whole replica start-up.
    assert late.first_token - late.arrival >= cost.startup_s
    assert run.replica_hours < 2 * 1000 / 3600 / 2  # far less than one replica for the whole run


def test_preemption_when_the_kv_cache_runs_out_still_completes_everything():
    tiny = dataclasses.replace(load_calibration(), max_batch_size=16, max_batched_tokens=512, kv_capacity_tokens=16 * 40)
    trace = [TraceRequest(0.1 * i, 100, 150) for i in range(12)]
    sim = Simulator(trace, tiny, StaticAutoscaler(1), SLO(60.0), duration_s=10)
    run = sim.run()
    assert run.completed == 12 and run.preemptions > 0


def test_the_queue_depth_policy_beats_serve_default_on_a_bursty_trace(cost):
    trace = bursty_trace(2.0, 1800, seed=11)
    ours = simulate(trace, cost, QueueDepthAutoscaler(QueueDepthConfig(max_replicas=8)), SLO_, duration_s=1800)
    serve = simulate(
        trace, cost, ServeDefaultAutoscaler(ServeDefaultConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=3)), SLO_, duration_s=1800
    )
    assert ours.slo_attainment > serve.slo_attainment
    assert ours.replica_hours < serve.replica_hours


# ---- Serve's default policy: the re-implementation against Ray's own -----------------------


def test_serve_default_matches_ray(monkeypatch):
    pytest.importorskip("ray.serve")
    import ray.serve.autoscaling_policy as rap
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    clock = {"now": 0.0}
    monkeypatch.setattr(rap.time, "time", lambda: clock["now"])  # Ray's delay logic reads the wall clock
    ray_policy = rap._apply_autoscaling_config(rap.replica_queue_length_autoscaling_policy)
    rng = random.Random(0)
    for trial in range(6):
        cfg = ServeDefaultConfig(
            min_replicas=rng.choice([0, 1, 2]),
            max_replicas=rng.choice([4, 10]),
            target_ongoing_requests=rng.choice([1.0, 2.0, 5.0]),
            upscale_delay_s=rng.choice([0.0, 3.0, 30.0]),
            downscale_delay_s=rng.choice([0.0, 10.0, 600.0]),
            downscale_to_zero_delay_s=rng.choice([None, 5.0]),
            upscaling_factor=rng.choice([1.0, 0.5, 2.0]),
            downscaling_factor=rng.choice([1.0, 0.3]),
        )
        ray_cfg = AutoscalingConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("look_back_period_s", "metrics_interval_s")})
        dep = DeploymentID(name="d", app_name="a")
        target, state, ray_state = max(cfg.min_replicas, 1), ServeDefaultState(), {}
        current = target
        for tick in range(300):
            clock["now"] = tick * 0.5
            total = max(0.0, rng.choice([0, 0, 1, 3, 8, 20, 50]) * rng.random())
            ctx = AutoscalingContext(
                deployment_id=dep, deployment_name="d", app_name="a", current_num_replicas=current, target_num_replicas=target,
                running_replicas=[ReplicaID(unique_id=str(i), deployment_id=dep) for i in range(current)],
                total_num_requests=total, total_queued_requests=0.0, aggregated_metrics={}, raw_metrics={},
                capacity_adjusted_min_replicas=cfg.min_replicas, capacity_adjusted_max_replicas=cfg.max_replicas,
                policy_state=dict(ray_state), last_scale_up_time=None, last_scale_down_time=None, current_time=clock["now"], config=ray_cfg,
            )
            want, ray_state = ray_policy(ctx)
            want = max(cfg.min_replicas, min(cfg.max_replicas, int(want)))  # DeploymentAutoscalingState.apply_bounds
            got, state = serve_default_decide(cfg, total, current, target, state, clock["now"])
            assert got == want, (trial, tick, cfg, total, current, target)
            # Replicas become ready a few ticks later, as in a cluster.
            target = got
            if tick % 3 == 0:
                current = target


def test_windowed_mean_sees_samples_only_after_the_push_and_averages_the_window():
    w = WindowedMean(ServeDefaultConfig(look_back_period_s=30.0, metrics_interval_s=10.0))
    for t in range(0, 26, 6):  # record every 6 s: 0 until t=12, then 10
        w.record(float(t), 0.0 if t < 12 else 10.0)
    assert w.mean(9.0) == 0.0  # only t=0 is pushed before t=10
    assert w.mean(19.0) == 0.0  # t=12 is recorded but not pushed until t=20
    assert w.mean(21.0) == pytest.approx((0 * 12 + 10 * 6 + 10 * 3) / 21)  # 0..18 visible, the last held to now
    assert w.mean(55.0) == pytest.approx(10.0)  # the window (20-30 s after the push) holds only 10s


# ---- the capacity CLI ----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardline", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_capacity_cli_says_how_many_replicas():
    out = _cli("capacity", "--rate", "0.6", "--slo-ttft", "10", "--slo-tpot", "1", "--trace", "steady", "--duration", "300")
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("replicas needed: ")
    n = int(last.split(": ")[1])
    assert 2 <= n <= 8  # ~0.25 req/s per replica at this SLO
    assert "replica-hours" in out.stdout and "autoscaled" in out.stdout

    plan = json.loads(_cli("capacity", "--rate", "0.6", "--slo-ttft", "10", "--slo-tpot", "1", "--trace", "steady", "--duration", "300", "--json").stdout)
    assert plan["static_replicas"] == n and plan["static_attainment"] >= 0.99


def test_capacity_cli_help_and_errors(tmp_path):
    out = _cli("capacity", "--help")
    assert out.returncode == 0 and "--slo-ttft" in out.stdout and "--calibration" in out.stdout
    out = _cli("capacity", "--rate", "1", "--slo-ttft", "5", "--trace", "nope")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "unknown trace" in out.stderr
    out = _cli("capacity", "--rate", "1", "--slo-ttft", "5", "--calibration", str(tmp_path / "none.json"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{i * 2},{64},{16}\n" for i in range(30)))
    out = _cli("capacity", "--rate", "1", "--slo-ttft", "10", "--trace", str(trace))
    assert out.returncode == 0 and "replicas needed: " in out.stdout, out.stderr
