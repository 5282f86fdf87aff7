"""`shardline capacity`: how many replicas a load needs, from the trace simulator.

    shardline capacity --rate 2 --slo-ttft 10 --slo-tpot 1 --trace bursty

simulates the trace against the calibrated replica cost model, finds the
smallest static replica count that meets the SLO for `--attainment` of the
requests, and then runs the queue-depth autoscaler (max replicas: that count
plus one) on the same trace to say what it would spend in replica-hours.
`shardline/cli.py` finds this module and calls `register`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

# The replica's engine budgets as deployed on CPU (also benchmarks/autoscaling_sim.py):
# 16 sequences keep a decode step at ~0.35 s (calibration), inside a 1 s TPOT with room
# for prefill; 512 prompt tokens per step cap a step's prefill at ~5 s instead of ~20 s.
DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_BATCHED_TOKENS = 512


@dataclass(frozen=True, slots=True)
class CapacityPlan:
    """The answer of `plan_capacity`."""

    trace: str
    num_requests: int
    duration_s: float
    static_replicas: int
    static_attainment: float
    static_replica_hours: float
    autoscaled_attainment: float
    autoscaled_replica_hours: float
    autoscaled_peak_replicas: int
    autoscaled_mean_replicas: float
    price_per_replica_hour: float

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}


def plan_capacity(
    rate: float,
    slo_ttft_s: float,
    slo_tpot_s: float | None = None,
    trace: str = "bursty",
    calibration: str | None = None,
    duration_s: float = 1800.0,
    seed: int = 0,
    attainment: float = 0.99,
    max_replicas: int = 64,
    min_replicas: int = 1,
    target_queue_depth: float | None = None,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    price_per_replica_hour: float = 1.0,
) -> CapacityPlan:
    """Simulate the load statically and autoscaled; see the module doc."""
    from shardline.autoscaling.calibration import load_calibration
    from shardline.autoscaling.policy import QueueDepthConfig
    from shardline.autoscaling.simulator import SLO, QueueDepthAutoscaler, min_static_replicas, simulate
    from shardline.autoscaling.traces import make_trace

    if not 0 < attainment <= 1:
        raise ValueError(f"--attainment must be in (0, 1], got {attainment}")
    if max_num_seqs < 1 or max_batched_tokens < 1:
        raise ValueError("--max-num-seqs and --max-batched-tokens must be >= 1")
    cost = dataclasses.replace(load_calibration(calibration), max_batch_size=max_num_seqs, max_batched_tokens=max_batched_tokens)
    slo = SLO(slo_ttft_s, slo_tpot_s)
    requests = make_trace(trace, rate, duration_s, seed)
    duration = max(duration_s if trace in ("steady", "bursty", "diurnal") else 0.0, requests[-1].arrival_s if requests else 0.0)
    if not requests:
        raise ValueError(f"the {trace} trace at {rate} req/s over {duration_s} s holds no request")
    n, static = min_static_replicas(requests, cost, slo, attainment, max_replicas, duration_s=duration)
    knobs = {} if target_queue_depth is None else {"target_queue_depth": target_queue_depth}
    config = QueueDepthConfig(min_replicas=min(min_replicas, n), max_replicas=n + 1, **knobs)
    auto = simulate(requests, cost, QueueDepthAutoscaler(config), slo, price_per_replica_hour, duration_s=duration)
    return CapacityPlan(
        trace=trace,
        num_requests=len(requests),
        duration_s=duration,
        static_replicas=n,
        static_attainment=static.slo_attainment,
        static_replica_hours=static.replica_hours,
        autoscaled_attainment=auto.slo_attainment,
        autoscaled_replica_hours=auto.replica_hours,
        autoscaled_peak_replicas=auto.peak_replicas,
        autoscaled_mean_replicas=auto.mean_replicas,
        price_per_replica_hour=price_per_replica_hour,
    )


def _positive(kind: type):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return v

    return parse


def _cmd_capacity(args: argparse.Namespace) -> int:
    plan = plan_capacity(
        rate=args.rate,
        slo_ttft_s=args.slo_ttft,
        slo_tpot_s=args.slo_tpot,
        trace=args.trace,
        calibration=args.calibration,
        duration_s=args.duration,
        seed=args.seed,
        attainment=args.attainment,
        max_replicas=args.max_replicas,
        min_replicas=args.min_replicas,
        target_queue_depth=args.target_queue_depth,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        price_per_replica_hour=args.price,
    )
    if args.json:
        print(json.dumps(plan.to_dict()))
        return 0
    slo = f"TTFT <= {args.slo_ttft:g} s" + (f", TPOT <= {args.slo_tpot:g} s" if args.slo_tpot else "")
    share = plan.autoscaled_replica_hours / plan.static_replica_hours if plan.static_replica_hours else float("nan")
    print(f"load: {plan.trace} trace at {args.rate:g} req/s (peak), {plan.num_requests} requests over {plan.duration_s:.0f} s; SLO {slo} for {args.attainment:.1%} of requests")
    print(
        f"static: {plan.static_replicas} replicas ({plan.static_attainment:.2%} attainment), "
        f"{plan.static_replica_hours:.2f} replica-hours, ${plan.static_replica_hours * plan.price_per_replica_hour:.2f}"
    )
    print(
        f"autoscaled (queue-depth, max {plan.static_replicas + 1}): {plan.autoscaled_replica_hours:.2f} replica-hours "
        f"({share:.0%} of static), ${plan.autoscaled_replica_hours * plan.price_per_replica_hour:.2f}, "
        f"{plan.autoscaled_attainment:.2%} attainment, mean {plan.autoscaled_mean_replicas:.1f} / peak {plan.autoscaled_peak_replicas} replicas"
    )
    print(f"replicas needed: {plan.static_replicas}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `capacity` to the `shardline` CLI."""
    p = subparsers.add_parser(
        "capacity",
        help="how many replicas a load needs (trace simulator)",
        description="Simulate a load against the calibrated replica cost model: the smallest static replica "
        "count meeting the SLO, and the replica-hours the queue-depth autoscaler would use.",
    )
    p.add_argument("--rate", type=_positive(float), required=True, help="requests/s (the peak for bursty and diurnal traces)")
    p.add_argument("--slo-ttft", type=_positive(float), required=True, help="time-to-first-token target, seconds")
    p.add_argument("--slo-tpot", type=_positive(float), default=None, help="time-per-output-token target, seconds")
    p.add_argument("--trace", default="bursty", help="steady, bursty, diurnal, or a CSV/JSONL file (arrival_s, prompt_tokens, output_tokens)")
    p.add_argument("--calibration", default=None, help="replica cost model JSON (default: SmolLM2-135M on this CPU)")
    p.add_argument("--duration", type=_positive(float), default=1800.0, help="trace length for generated traces, seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attainment", type=float, default=0.99, help="fraction of requests that must meet the SLO")
    p.add_argument("--max-replicas", type=_positive(int), default=64, help="give up above this many static replicas")
    p.add_argument("--min-replicas", type=int, default=1, help="the autoscaler's minimum")
    p.add_argument("--target-queue-depth", type=_positive(float), default=None, help="the autoscaler's requests per replica")
    p.add_argument("--max-num-seqs", type=_positive(int), default=DEFAULT_MAX_NUM_SEQS, help="a replica's batch size limit")
    p.add_argument("--max-batched-tokens", type=_positive(int), default=DEFAULT_MAX_BATCHED_TOKENS, help="a replica's tokens per step")
    p.add_argument("--price", type=float, default=1.0, help="dollars per replica-hour")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_capacity)
