"""Ray Serve's default autoscaler, re-implemented as a pure function for the simulator.

This is `ray.serve.autoscaling_policy.replica_queue_length_autoscaling_policy`
(Ray 2.60) as the controller runs it: wrapped by `_apply_autoscaling_config`
(the cold-start fast path, `upscaling_factor` / `downscaling_factor`, and the
wall-clock `upscale_delay_s` / `downscale_delay_s` / `downscale_to_zero_delay_s`
logic) and then clipped to [min_replicas, max_replicas] by
`DeploymentAutoscalingState.apply_bounds`. Its input, `total_num_requests`, is
the time-weighted mean over `look_back_period_s` of the ongoing requests
(running at replicas plus queued at handles), sampled every
`min(0.2 * look_back_period_s, metrics_interval_s)` and pushed to the
controller every `metrics_interval_s`; `WindowedMean` models that.

No Ray import: the simulator runs without the serve extra. The test
`tests/test_autoscaling_sim.py::test_serve_default_matches_ray` drives this
and Ray's own policy with the same inputs and asserts the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# Ray's tolerance for delay comparisons (autoscaling_policy._DELAY_ELAPSED_EPS_S).
_DELAY_EPS_S = 1e-6
# ray.serve._private.constants.RAY_SERVE_AUTOSCALING_METRIC_RECORD_INTERVAL_FACTOR
_RECORD_INTERVAL_FACTOR = 0.2


@dataclass(frozen=True, slots=True)
class ServeDefaultConfig:
    """The AutoscalingConfig fields the default policy reads (Ray 2.60 defaults).

    Args:
        min_replicas, max_replicas: bounds.
        target_ongoing_requests: ongoing requests per replica the policy aims for.
        upscale_delay_s, downscale_delay_s, downscale_to_zero_delay_s: how long a
            decision must persist before it is applied.
        upscaling_factor, downscaling_factor: gains on the change (1 = all of it).
        look_back_period_s: the averaging window of the metrics.
        metrics_interval_s: how often replicas and handles push metrics.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    upscaling_factor: float = 1.0
    downscaling_factor: float = 1.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got {self.min_replicas}, {self.max_replicas}")
        for name in ("target_ongoing_requests", "upscaling_factor", "downscaling_factor", "look_back_period_s", "metrics_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def record_interval_s(self) -> float:
        """How often a replica or handle samples its ongoing requests."""
        return min(self.look_back_period_s * _RECORD_INTERVAL_FACTOR, self.metrics_interval_s)


@dataclass(frozen=True, slots=True)
class ServeDefaultState:
    """Serve's internal policy state (`__decision_counters`, `__decision_timestamp`)."""

    decision_counter: int = 0
    decision_timestamp: float | None = None


def _apply_scaling_factors(desired: float, current: int, cfg: ServeDefaultConfig) -> int:
    if current == 0:
        return math.ceil(desired)
    delta = desired - current
    factor = cfg.upscaling_factor if delta > 0 else cfg.downscaling_factor
    scaled = math.ceil(current + factor * delta)
    if math.ceil(float(desired)) < current and scaled == current:
        scaled -= 1
    return scaled


def _apply_delay_logic(desired: int, target: int, cfg: ServeDefaultConfig, st: ServeDefaultState, now: float) -> tuple[int, ServeDefaultState]:
    decision = target
    counter, stamp = st.decision_counter, st.decision_timestamp
    if desired > target:
        if counter < 0:
            counter, stamp = 0, None
        counter += 1
        stamp = now if stamp is None else stamp
        if now - stamp + _DELAY_EPS_S >= cfg.upscale_delay_s:
            counter, stamp, decision = 0, None, desired
    elif desired < target:
        if counter > 0:
            counter, stamp = 0, None
        counter -= 1
        if target == 1:
            delay = cfg.downscale_to_zero_delay_s if cfg.downscale_to_zero_delay_s is not None else cfg.downscale_delay_s
        else:
            delay = cfg.downscale_delay_s
            desired = max(1, desired)
        stamp = now if stamp is None else stamp
        if now - stamp + _DELAY_EPS_S >= delay:
            counter, stamp, decision = 0, None, desired
    else:
        counter, stamp = 0, None
    return decision, ServeDefaultState(counter, stamp)


def serve_default_decide(
    cfg: ServeDefaultConfig,
    total_num_requests: float,
    current_num_replicas: int,
    target_num_replicas: int,
    state: ServeDefaultState,
    now: float,
) -> tuple[int, ServeDefaultState]:
    """One controller tick of Serve's default autoscaler: (new target, new state)."""

    def bounds(n: int) -> int:
        return max(cfg.min_replicas, min(cfg.max_replicas, n))

    # Cold start fast path (_get_cold_start_scale_up_replicas).
    if current_num_replicas == 0 and total_num_requests > 0:
        return bounds(max(math.ceil(1 * cfg.upscaling_factor), target_num_replicas)), state
    # _core_replica_queue_length_policy.
    if current_num_replicas == 0:
        desired: float = target_num_replicas
    else:
        error_ratio = total_num_requests / (cfg.target_ongoing_requests * current_num_replicas)
        desired = current_num_replicas * error_ratio
    # _apply_default_params.
    scaled = _apply_scaling_factors(desired, current_num_replicas, cfg)
    if current_num_replicas == 0 and scaled > 0:
        return bounds(scaled), state
    final, state = _apply_delay_logic(max(0, scaled), target_num_replicas, cfg, state, now)
    return bounds(final), state


class WindowedMean:
    """Serve's view of total ongoing requests: sampled, pushed late, averaged over a window.

    `record(t, value)` is a sample taken at the source every `record_interval_s`;
    samples become visible to the controller only at the next push (every
    `metrics_interval_s`). `mean(now)` is the time-weighted mean of the visible
    step function over the last `look_back_period_s`, the last sample held until
    now (metrics_utils.time_weighted_average with last_window_s = now - last).
    """

    def __init__(self, cfg: ServeDefaultConfig):
        self.cfg = cfg
        self._samples: deque[tuple[float, float]] = deque()

    def record(self, t: float, value: float) -> None:
        self._samples.append((t, value))
        horizon = t - self.cfg.look_back_period_s - self.cfg.metrics_interval_s
        while len(self._samples) > 1 and self._samples[1][0] < horizon:
            self._samples.popleft()

    def mean(self, now: float) -> float:
        last_push = math.floor(now / self.cfg.metrics_interval_s) * self.cfg.metrics_interval_s
        start = last_push - self.cfg.look_back_period_s
        visible = [(t, v) for t, v in self._samples if start <= t <= last_push]
        if not visible:
            return 0.0
        area, total = 0.0, 0.0
        for (t0, v), (t1, _) in zip(visible, visible[1:]):
            area += v * (t1 - t0)
            total += t1 - t0
        tail = max(now - visible[-1][0], 1e-3)
        area += visible[-1][1] * tail
        total += tail
        return area / total
