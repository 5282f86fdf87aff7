"""The queue-depth policy over synthetic metric series, and its Serve adapter (no cluster)."""

from __future__ import annotations

import dataclasses
import math
import types

import pytest

from shardline.autoscaling.policy import ClusterLoad, PolicyState, QueueDepthConfig, ReplicaMetrics, ScalingDecision, decide

# No trend extrapolation unless a test asks for it: exact counts are easier to assert.
BASE = QueueDepthConfig(
    min_replicas=1,
    max_replicas=10,
    target_queue_depth=4.0,
    upscale_delay_s=2.0,
    upscale_lookahead_s=0.0,
    downscale_delay_s=30.0,
    downscale_interval_s=10.0,
    downscale_fraction=0.0,
    downscale_headroom=1.0,
    kv_high=0.85,
    kv_upscale_delay_s=5.0,
    downscale_to_zero_delay_s=60.0,
)


def load(demand_per_replica: list[int], ready: int | None = None, target: int | None = None, queue: float = 0, kv: float = 0.0) -> ClusterLoad:
    reps = tuple(ReplicaMetrics(num_waiting=d // 2, num_running=d - d // 2, kv_usage=kv) for d in demand_per_replica)
    n = len(reps)
    return ClusterLoad(reps, queue, n if ready is None else ready, n if target is None else target)


class Cluster:
    """Replays a metric series through the policy; replicas become ready at once."""

    def __init__(self, config: QueueDepthConfig, replicas: int):
        self.config, self.n, self.state = config, replicas, PolicyState()
        self.history: list[tuple[float, ScalingDecision]] = []

    def tick(self, now: float, demand: float, kv: float = 0.0, queue: float = 0.0) -> int:
        # Spread the demand over the replicas; the rest waits in the global queue.
        per = [int(demand // self.n) + (1 if i < demand % self.n else 0) for i in range(self.n)] if self.n else []
        reps = tuple(ReplicaMetrics(p, 0, kv) for p in per)
        extra = queue + (demand if self.n == 0 else 0)
        d = decide(self.config, ClusterLoad(reps, extra, self.n, self.n), self.state, now)
        self.state, self.n = d.state, d.num_replicas
        self.history.append((now, d))
        return self.n

    def run(self, series: list[tuple[float, float]], dt: float = 1.0, **kw) -> list[tuple[float, int]]:
        """series: (until_s, demand) segments; returns (t, replicas) per tick."""
        out, t = [], self.history[-1][0] + dt if self.history else 0.0
        for until, demand in series:
            while t < until - 1e-9:
                out.append((t, self.tick(t, demand, **kw)))
                t += dt
        return out


def first_time(trace: list[tuple[float, int]], pred) -> float | None:
    return next((t for t, n in trace if pred(n)), None)


# ---- scale up -------------------------------------------------------------------


def test_burst_scales_up_at_once_after_the_upscale_delay():
    c = Cluster(BASE, replicas=1)
    trace = c.run([(10, 3), (40, 30)])  # a burst of 30 requests from t=10
    # Held for the 2 s delay, then straight to ceil(30 / 4) = 8: no creeping one at a time.
    assert [n for t, n in trace if t < 12] == [1] * 12
    assert dict(trace)[12.0] == 8
    assert {n for t, n in trace if t >= 12} == {8}
    assert c.history[12][1].reason == "queue"


def test_a_spike_shorter_than_the_upscale_delay_is_ignored():
    c = Cluster(BASE, replicas=1)
    trace = c.run([(5, 2), (6, 40), (30, 2)])  # one tick of 40
    assert {n for _, n in trace} == {1}


def test_global_queue_counts_toward_demand():
    d = decide(BASE, load([4, 4], queue=16), PolicyState(), now=0.0)
    assert d.demand == 24 and d.desired == 6
    d = decide(BASE, load([4, 4], queue=16), d.state, now=2.0)
    assert d.num_replicas == 6


def test_trend_lookahead_sizes_the_jump_for_the_queue_the_new_replicas_will_meet():
    def first_jump(lookahead_s: float) -> int:
        cfg = dataclasses.replace(BASE, upscale_lookahead_s=lookahead_s, trend_window_s=1.0, upscale_delay_s=0.0, max_replicas=50)
        c = Cluster(cfg, replicas=2)
        c.run([(9, 4)])  # flat at 4: no trend
        n = c.tick(9.0, 9)  # +5 in one second: the level alone asks for ceil(9 / 4) = 3
        assert c.history[-1][1].reason == "queue"
        return n

    slope = (1 - math.exp(-1.0)) * 5.0  # the EWMA's first step toward 5 requests/s
    assert first_jump(0.0) == 3
    assert first_jump(10.0) == math.ceil((9 + slope * 10.0) / 4)


def test_trend_alone_does_not_start_replicas_while_the_level_fits():
    cfg = dataclasses.replace(BASE, upscale_lookahead_s=60.0, trend_window_s=1.0, upscale_delay_s=0.0)
    c = Cluster(cfg, replicas=3)
    # Demand rises 1 -> 11, always within 3 x 4: a steep slope but no queue beyond the target.
    trace = [(t, c.tick(t, 1 + t)) for t in range(11)]
    assert {n for _, n in trace} == {3}


def test_after_a_scale_up_the_lookahead_does_not_count_the_same_growth_twice():
    # A short trend window: the slope is the instantaneous one, 1 request/s.
    cfg = dataclasses.replace(BASE, upscale_lookahead_s=20.0, trend_window_s=1e-3, upscale_delay_s=0.0, max_replicas=50)
    c = Cluster(cfg, replicas=2)
    c.run([(4, 8)])
    # At t=4 the demand is 9 and growing 1/s: sized for 9 + 20 = 29 requests, 8 replicas.
    # While those start, the growth they were sized for shows up in the queue; it must
    # not be counted again (without the shrinking horizon: 9, 10, 11 replicas by t=19).
    counts = [c.tick(float(t), 8 + (t - 3)) for t in range(4, 20)]
    assert counts == [8] * len(counts)


# ---- scale down -----------------------------------------------------------------


def test_quiet_scales_down_slowly_one_step_per_interval_after_the_delay():
    c = Cluster(BASE, replicas=8)
    trace = c.run([(100, 2)])
    # Nothing goes during the 30 s quiet period, then one replica per 10 s.
    assert first_time(trace, lambda n: n < 8) == 30.0
    assert dict(trace)[39.0] == 7 and dict(trace)[40.0] == 6 and dict(trace)[50.0] == 5
    assert trace[-1][1] == 1  # demand 2 fits one replica
    assert all(d.reason in ("hold", "quiet") for _, d in c.history)


def test_proportional_downscale_removes_a_fraction_of_the_excess_per_step():
    c = Cluster(dataclasses.replace(BASE, downscale_fraction=0.5), replicas=9)
    trace = c.run([(60, 2)])
    steps = [n for t, n in trace if t in (30.0, 40.0, 50.0)]
    assert steps == [5, 3, 2]  # excess 8 -> remove 4, then 2, then 1


def test_any_load_during_the_quiet_period_restarts_it():
    c = Cluster(BASE, replicas=4)
    trace = c.run([(20, 2), (21, 16), (45, 2)])  # back to the target at t=20
    assert {n for _, n in trace} == {4}  # 21 + 30 > 45: still waiting
    trace = c.run([(60, 2)])
    assert first_time(trace, lambda n: n < 4) == 51.0


def test_downscale_never_goes_below_the_busiest_point_since_the_last_step():
    c = Cluster(dataclasses.replace(BASE, downscale_fraction=1.0), replicas=8)
    # Mostly 2 requests, but once 18 (5 replicas' worth, still below the target of 8).
    series = [(10, 2), (11, 18), (31, 2)]
    trace = c.run(series)
    assert dict(trace)[30.0] == 5


def test_headroom_keeps_a_margin_before_scaling_down():
    cfg = dataclasses.replace(BASE, downscale_headroom=0.5)
    c = Cluster(cfg, replicas=4)
    trace = c.run([(80, 12)])  # 12 fits 3 x 4, but not 3 x 4 x 0.5
    assert {n for _, n in trace} == {4}


# ---- bounds ---------------------------------------------------------------------------


def test_never_above_max_or_below_min():
    cfg = dataclasses.replace(BASE, min_replicas=2, max_replicas=5)
    c = Cluster(cfg, replicas=2)
    trace = c.run([(10, 1000)])
    assert max(n for _, n in trace) == 5 and c.history[-1][1].reason in ("bounds", "hold")
    trace = c.run([(200, 0)])
    assert min(n for _, n in trace) == 2


def test_a_target_outside_the_bounds_is_brought_back_at_once():
    cfg = dataclasses.replace(BASE, min_replicas=3, max_replicas=6)
    assert decide(cfg, load([0]), PolicyState(), 0.0).num_replicas == 3
    assert decide(cfg, load([0] * 9), PolicyState(), 0.0).num_replicas == 6


# ---- the KV signal ---------------------------------------------------------------


def test_sustained_high_kv_usage_adds_a_replica_even_with_a_short_queue():
    c = Cluster(BASE, replicas=2)
    trace = c.run([(20, 3)], kv=0.95)  # 3 requests: the queue alone wants 1
    assert dict(trace)[4.0] == 2 and dict(trace)[5.0] == 3  # after kv_upscale_delay_s
    assert c.history[5][1].reason == "kv"
    # Once the new replica is ready, still-high usage asks for yet one more.
    assert trace[-1][1] > 3


def test_a_kv_blip_does_not_scale():
    c = Cluster(BASE, replicas=2)
    c.run([(3, 3)], kv=0.95)
    trace = c.run([(20, 3)], kv=0.3)
    assert {n for _, n in trace} == {2}


def test_kv_load_blocks_a_scale_down_that_would_overfill_the_others():
    c = Cluster(BASE, replicas=4)
    # Short queue (2 requests) but each replica's cache is 60% full: three would be at 80%,
    # two at 120% of kv_high: the count may drop to 3 but not below.
    trace = c.run([(200, 2)], kv=0.6)
    assert min(n for _, n in trace) == math.ceil(4 * 0.6 / 0.85)


# ---- scale to and from zero ----------------------------------------------------


def test_scale_from_zero_is_immediate_and_to_zero_waits_for_idle():
    cfg = dataclasses.replace(BASE, min_replicas=0)
    c = Cluster(cfg, replicas=0)
    assert c.run([(5, 0)])[-1][1] == 0
    # One request held at zero replicas: one replica at once, no upscale delay.
    assert c.tick(5.0, 1) == 1
    assert c.history[-1][1].reason == "scale-from-zero"
    # A trickle keeps the last replica; 60 s without any request lets it go.
    trace = c.run([(100, 1)])
    assert {n for _, n in trace} == {1}
    trace = c.run([(200, 0)])
    assert first_time(trace, lambda n: n == 0) == 160.0
    assert c.history[-1][1].reason in ("idle", "hold")


def test_scale_from_zero_jumps_to_the_desired_count():
    cfg = dataclasses.replace(BASE, min_replicas=0)
    d = decide(cfg, ClusterLoad((), 17, 0, 0), PolicyState(), 0.0)
    assert d.num_replicas == 5 and d.reason == "scale-from-zero"


def test_min_one_never_scales_to_zero():
    c = Cluster(BASE, replicas=1)
    trace = c.run([(500, 0)])
    assert {n for _, n in trace} == {1}


# ---- config, state, purity ---------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(min_replicas=-1),
        dict(min_replicas=5, max_replicas=4),
        dict(max_replicas=0),
        dict(target_queue_depth=0),
        dict(upscale_delay_s=-1),
        dict(downscale_fraction=1.5),
        dict(downscale_headroom=0),
        dict(kv_high=1.2),
        dict(trend_window_s=0),
    ],
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        QueueDepthConfig(**bad)


def test_config_from_dict_rejects_unknown_keys_and_round_trips():
    with pytest.raises(ValueError, match="unknown autoscaling fields"):
        QueueDepthConfig.from_dict({"target_queue": 3})
    assert QueueDepthConfig.from_dict(BASE.to_dict()) == BASE


def test_decide_is_pure():
    ld, st = load([6, 6], queue=10), PolicyState(high_since=0.0)
    a = decide(BASE, ld, st, 5.0)
    b = decide(BASE, ld, st, 5.0)
    assert a == b and st == PolicyState(high_since=0.0)
    assert PolicyState.from_dict(a.state.to_dict()) == a.state
    assert PolicyState.from_dict(None) == PolicyState()


# ---- the Serve adapter ----------------------------------------------------------------

serve_config = pytest.importorskip("ray.serve.config")


def _ctx(metrics: dict, *, current=2, target=2, total=0.0, queued=0.0, state=None, now=100.0, lo=1, hi=8, raw=True, cfg=None):
    from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue

    dep = DeploymentID(name="ModelReplica", app_name="shardline")
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=dep) for i in range(current)]
    agg = {name: {ids[i]: v for i, v in enumerate(vals)} for name, vals in metrics.items()}
    raws = {name: {ids[i]: [TimeStampedValue(now - 5, 0.0), TimeStampedValue(now - 1, v)] for i, v in enumerate(vals)} for name, vals in metrics.items()}
    return serve_config.AutoscalingContext(
        deployment_id=dep,
        deployment_name=dep.name,
        app_name=dep.app_name,
        current_num_replicas=current,
        target_num_replicas=target,
        running_replicas=ids,
        total_num_requests=total,
        total_queued_requests=queued,
        aggregated_metrics={k: {r: v / 2 for r, v in d.items()} for k, d in agg.items()} if raw else agg,
        raw_metrics=raws if raw else None,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=state if state is not None else {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=cfg,
    )


def test_context_becomes_policy_load_from_the_latest_custom_metrics():
    from shardline.autoscaling.serve_policy import load_from_context

    ctx = _ctx({"num_waiting": [3, 1], "num_running": [8, 4], "kv_usage": [0.5, 0.25], "global_queue": [7, 6]}, queued=2)
    ld = load_from_context(ctx, global_queue=5)
    assert [(r.num_waiting, r.num_running, r.kv_usage) for r in ld.replicas] == [(3, 8, 0.5), (1, 4, 0.25)]
    assert ld.global_queue == 5 + 7 + 2  # scheduler + the largest forwarded report + handle-queued
    assert ld.demand == 14 + 16 and ld.ready_replicas == 2 and ld.target_replicas == 2


def test_context_without_raw_series_uses_the_window_aggregate():
    from shardline.autoscaling.serve_policy import load_from_context

    ctx = _ctx({"num_waiting": [2, 2], "num_running": [4, 6]}, raw=False)
    assert load_from_context(ctx).demand == 14


def test_context_without_custom_metrics_falls_back_to_serve_ongoing_requests():
    from shardline.autoscaling.serve_policy import load_from_context

    ld = load_from_context(_ctx({}, total=11.0))
    assert ld.replicas == () and ld.demand == 11.0


def test_serve_policy_scales_up_keeps_state_and_uses_serve_bounds():
    from shardline.autoscaling.serve_policy import STATE_KEY, QueueDepthPolicy

    pol = QueueDepthPolicy(**dataclasses.replace(BASE, upscale_delay_s=0.0).to_dict())
    n, state = pol(_ctx({"num_waiting": [10, 10], "num_running": [8, 8]}, state={"other": 1}, hi=6))
    assert n == 6  # ceil(36 / 4) = 9, clipped to Serve's capacity-adjusted max
    assert state["other"] == 1 and state[STATE_KEY]["last_tick"] == 100.0


@pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")
def test_serve_wrapper_with_our_config_passes_decisions_through():
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    from shardline.autoscaling.serve_policy import QueueDepthPolicy, serve_autoscaling_config

    cfg = serve_config.AutoscalingConfig(**serve_autoscaling_config(dataclasses.replace(BASE, upscale_delay_s=0.0, downscale_delay_s=0.0, downscale_interval_s=0.0)))
    wrapped = _apply_autoscaling_config(QueueDepthPolicy(**cfg.policy.policy_kwargs))
    busy = {"num_waiting": [10, 10], "num_running": [8, 8]}
    n, state = wrapped(_ctx(busy, cfg=cfg, hi=10))
    assert n == 9
    quiet = {"num_waiting": [0, 0, 0], "num_running": [1, 0, 0]}
    n, state = wrapped(_ctx(quiet, current=3, target=3, cfg=cfg, state=state, now=101.0, hi=10))
    assert n == 2  # one step down at once: Serve's own delays are 0


def test_serve_autoscaling_config_is_valid_and_its_policy_deserializes():
    from shardline.autoscaling.serve_policy import POLICY_PATH, QueueDepthPolicy, serve_autoscaling_config

    with pytest.warns(DeprecationWarning):  # metrics_interval_s: still how Ray 2.60 sets the push interval
        cfg = serve_config.AutoscalingConfig(**serve_autoscaling_config(BASE, initial_replicas=2))
    assert cfg.policy.policy_function == POLICY_PATH and cfg.upscale_delay_s == 0 and cfg.initial_replicas == 2
    assert isinstance(cfg.policy.get_policy()(**cfg.policy.policy_kwargs), QueueDepthPolicy)
    with pytest.raises(ValueError):
        serve_autoscaling_config(BASE, push_interval_s=5.0, look_back_period_s=2.0)
    with pytest.raises(ValueError, match="unknown autoscaling fields"):
        QueueDepthPolicy(targt=3)


def test_function_form_and_replica_stats():
    from shardline.autoscaling.serve_policy import queue_depth_autoscaling_policy, replica_autoscaling_stats

    n, _ = queue_depth_autoscaling_policy(_ctx({"num_waiting": [0, 0], "num_running": [1, 1]}))
    assert n == 2
    stats = replica_autoscaling_stats({"num_waiting": 2, "num_pending": 1, "num_running": 5, "kv_usage": 0.4}, global_queue=3)
    assert stats == {"num_waiting": 3.0, "num_running": 5.0, "kv_usage": 0.4, "global_queue": 3.0}
    assert all(isinstance(v, float) for v in stats.values())  # Serve accepts int or float only


def test_scheduler_queue_reader_never_blocks_and_keeps_one_request_in_flight():
    from shardline.autoscaling.serve_policy import SchedulerQueueReader

    sent: list[int] = []
    answered: set[int] = set()

    def submit():
        sent.append(len(sent))
        return sent[-1]

    reader = SchedulerQueueReader(submit, lambda ref: ref in answered, lambda ref: 10.0 * (ref + 1), interval_s=1.0)
    assert reader.read(0.0) == 0.0 and sent == [0]
    assert reader.read(0.5) == 0.0 and sent == [0]  # not answered: nothing more sent
    answered.add(0)
    assert reader.read(0.6) == 10.0 and sent == [0]  # answered, but the interval has not passed
    assert reader.read(1.0) == 10.0 and sent == [0, 1]

    def failing():
        raise RuntimeError("no scheduler")

    broken = SchedulerQueueReader(failing, lambda ref: True, lambda ref: 1.0)
    assert broken.read(0.0) == 0.0 and broken.read(5.0) == 0.0


def test_inflight_beyond_the_engine_counts_as_waiting():
    from shardline.autoscaling.serve_policy import load_from_context

    # A burst the engine has not stepped over yet: 9 accepted, the last step saw 2 running, 1 waiting.
    ctx = _ctx({"num_waiting": [1, 0], "num_running": [2, 3], "num_inflight": [9, 3]})
    ld = load_from_context(ctx)
    assert [(r.num_waiting, r.num_running) for r in ld.replicas] == [(7, 2), (0, 3)]
    assert ld.demand == 12


def test_drain_marker_marks_each_replica_that_leaves_once_and_survives_failures():
    from shardline.autoscaling.serve_policy import DrainMarker

    marked: list[str] = []
    marker = DrainMarker(marked.append)
    assert marker.update(["a", "b"]) == [] and marked == []  # the first tick only learns the set
    assert marker.update(["a", "b", "c"]) == []
    assert marker.update(["a", "c"]) == ["b"] and marked == ["b"]
    assert marker.update(["a", "c"]) == [] and marked == ["b"]  # once
    assert marker.update([]) == ["a", "c"] and marked == ["b", "a", "c"]

    def failing(replica_id: str) -> None:
        raise ValueError(f"unknown replica {replica_id!r}")

    broken = DrainMarker(failing)
    broken.update(["a"])
    assert broken.update([]) == ["a"]  # no scheduler: nothing raises into Serve's controller


def test_policy_with_a_scheduler_adds_its_queue_and_marks_removed_replicas(monkeypatch):
    from shardline.autoscaling import serve_policy

    class FakeRef:
        def __init__(self, value):
            self.value = value

    class FakeScheduler:
        def __init__(self):
            self.draining: list[str] = []
            self.stats = self
            self.set_draining = self

        def remote(self, *args):
            if args:
                self.draining.append(args[0])
                return None
            return FakeRef(types.SimpleNamespace(num_queued_interactive=12))

    sched = FakeScheduler()
    looked_up: list[tuple[str, str]] = []

    def get(self):
        looked_up.append((self.name, self.namespace))
        return sched

    monkeypatch.setattr(serve_policy.NamedActor, "get", get)
    import ray

    monkeypatch.setattr(ray, "wait", lambda refs, timeout: (refs, []))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref.value)
    pol = serve_policy.QueueDepthPolicy(
        scheduler_name="sched-{app_name}", scheduler_namespace="ns", scheduler_poll_s=0.5,
        **dataclasses.replace(BASE, upscale_delay_s=0.0).to_dict(),
    )
    idle = {"num_waiting": [0, 0], "num_running": [0, 0]}
    n, state = pol(_ctx(idle, now=100.0))  # sends the first stats() request
    n, state = pol(_ctx(idle, now=100.1, state=state))  # reads its answer: 12 queued at the scheduler
    assert n == 3 and looked_up[0] == ("sched-shardline", "ns")  # ceil(12 / 4)
    n, state = pol(_ctx({"num_waiting": [0], "num_running": [1]}, current=1, target=2, now=100.2, state=state))
    assert sched.draining == ["r1"]
