"""Autoscaling on a bursty trace: the queue-depth policy vs Serve's default vs static at peak.

    python benchmarks/autoscaling_sim.py [--duration 7200] [--seeds 3 4 5] [--calibration FILE]

Everything runs in the trace simulator (`autoscaling/simulator.py`) against the
replica cost model measured on the real engine (SmolLM2-135M on this CPU,
`autoscaling/calibrations/smollm2-135m-cpu.json`), so the run is deterministic
and takes seconds.

The setup, fixed before any tuning:
- Trace: on/off bursts (`traces.bursty_trace`): Poisson at 2 req/s while on,
  at 15% of that while off; on and off periods exponential with means 120 s
  and 480 s; prompts ~128 tokens and outputs ~48 (log-normal), 2 hours.
- SLO: TTFT <= 10 s and TPOT <= 1 s per request (a median prompt alone
  prefills in ~1.3 s on this CPU, a decode step at batch 16 takes ~0.35 s).
- Replicas: max_num_seqs 16, 512 batched tokens per step (`autoscaling.cli`).
- Static at peak: the fewest replicas that meet the SLO for 99% of requests
  on the trace (binary search). Both autoscalers get the same bounds:
  min 1, max = that count + 1.
- Serve's default (`replica_queue_length_autoscaling_policy` re-implemented
  in `autoscaling/serve_default.py`): Ray 2.60 defaults (upscale 30 s,
  downscale 600 s, 30 s look-back, 10 s metrics push) and
  target_ongoing_requests equal to this policy's target queue depth (3).
- This policy: `QueueDepthConfig()` defaults, tuned on seeds 0-2; this
  benchmark reports seeds 3-5, which the tuning never saw. Metrics pushed
  every 0.5 s, as deployed.

Targets (issue 7): at least 99% SLO attainment at no more than 60% of the
static-peak replica-hours, and better on both than Serve's default. The last
line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: never shadows an installed package

from shardline.autoscaling.calibration import load_calibration  # noqa: E402
from shardline.autoscaling.cli import DEFAULT_MAX_BATCHED_TOKENS, DEFAULT_MAX_NUM_SEQS  # noqa: E402
from shardline.autoscaling.policy import QueueDepthConfig  # noqa: E402
from shardline.autoscaling.serve_default import ServeDefaultConfig  # noqa: E402
from shardline.autoscaling.simulator import (  # noqa: E402
    SLO,
    QueueDepthAutoscaler,
    ServeDefaultAutoscaler,
    SimResult,
    StaticAutoscaler,
    min_static_replicas,
    simulate,
)
from shardline.autoscaling.traces import bursty_trace  # noqa: E402

PEAK_RATE = 2.0
SLO_TTFT_S, SLO_TPOT_S = 10.0, 1.0
ATTAINMENT = 0.99
MAX_SHARE = 0.60
# Replicas push their metrics this often where the policy is deployed (deployments.config.METRICS_PUSH_INTERVAL_S).
PUSH_INTERVAL_S = 0.5


def _row(r: SimResult, static_rh: float) -> str:
    return (
        f"{r.policy:>14} {r.slo_attainment:>8.2%} {r.ttft_p50_s:>7.2f} {r.ttft_p99_s:>7.2f} {r.tpot_p50_s:>7.3f} "
        f"{r.tpot_p99_s:>7.3f} {r.replica_hours:>8.2f} {r.replica_hours / static_rh:>7.0%} {r.mean_replicas:>6.2f} "
        f"{r.peak_replicas:>5d} {r.scale_events:>6d}"
    )


HEADER = (
    f"{'policy':>14} {'SLO ok':>8} {'TTFT50':>7} {'TTFT99':>7} {'TPOT50':>7} {'TPOT99':>7} "
    f"{'rep-h':>8} {'%static':>7} {'mean':>6} {'peak':>5} {'scales':>6}"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=7200.0, help="trace length, seconds")
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5], help="trace seeds (0-2 were used for tuning)")
    p.add_argument("--calibration", default=None, help="replica cost model JSON")
    p.add_argument("--price", type=float, default=1.0, help="dollars per replica-hour")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    calib = load_calibration(args.calibration)
    cost = dataclasses.replace(calib, max_batch_size=DEFAULT_MAX_NUM_SEQS, max_batched_tokens=DEFAULT_MAX_BATCHED_TOKENS)
    slo = SLO(SLO_TTFT_S, SLO_TPOT_S)
    policy_cfg = QueueDepthConfig()
    print(f"calibration: {calib.source.get('model')} {calib.source.get('dtype')}, prefill {calib.prefill_tokens_per_s:.0f} tok/s, "
          f"decode step {dict(zip(calib.decode_batch_sizes, calib.decode_step_s))} s, start-up {calib.startup_s:.1f} s, "
          f"measured at load average {calib.source.get('loadavg_before')}", flush=True)
    print(f"SLO: TTFT <= {SLO_TTFT_S} s, TPOT <= {SLO_TPOT_S} s; bursty trace, peak {PEAK_RATE} req/s, {args.duration:.0f} s, seeds {args.seeds}", flush=True)

    runs = []
    totals: dict[str, dict[str, float]] = {}
    for seed in args.seeds:
        trace = bursty_trace(PEAK_RATE, args.duration, seed=seed)
        print(f"\n[seed {seed}] {len(trace)} requests; searching the static-at-peak count ...", flush=True)
        n_static, static = min_static_replicas(trace, cost, slo, ATTAINMENT, duration_s=args.duration)
        static = simulate(trace, cost, StaticAutoscaler(n_static), slo, args.price, duration_s=args.duration)
        print(f"[seed {seed}] static at peak: {n_static} replicas; running the autoscalers ...", flush=True)
        bounds = dict(min_replicas=1, max_replicas=n_static + 1)
        ours = simulate(
            trace, cost, QueueDepthAutoscaler(dataclasses.replace(policy_cfg, **bounds), push_interval_s=PUSH_INTERVAL_S),
            slo, args.price, duration_s=args.duration,
        )
        serve_cfg = ServeDefaultConfig(target_ongoing_requests=policy_cfg.target_queue_depth, **bounds)
        serve = simulate(trace, cost, ServeDefaultAutoscaler(serve_cfg), slo, args.price, duration_s=args.duration)
        print(HEADER)
        for r in (static, ours, serve):
            print(_row(r, static.replica_hours))
            t = totals.setdefault(r.policy.split("-")[0] if r.policy.startswith("static") else r.policy, {"ok": 0.0, "n": 0, "rh": 0.0})
            t["ok"] += r.slo_attainment * r.num_requests
            t["n"] += r.num_requests
            t["rh"] += r.replica_hours
        runs.append({
            "seed": seed,
            "num_requests": len(trace),
            "static_replicas": n_static,
            "static": static.summary(),
            "queue_depth": ours.summary(),
            "serve_default": serve.summary(),
            "queue_depth_share_of_static": round(ours.replica_hours / static.replica_hours, 4),
            "serve_default_share_of_static": round(serve.replica_hours / static.replica_hours, 4),
        })

    agg = {
        name: {
            "slo_attainment": round(t["ok"] / t["n"], 4),
            "replica_hours": round(t["rh"], 3),
            "cost_usd": round(t["rh"] * args.price, 3),
            "share_of_static": round(t["rh"] / totals["static"]["rh"], 4),
        }
        for name, t in totals.items()
    }
    ours_a, serve_a = agg["queue-depth"], agg["serve-default"]
    targets = {
        "attainment_at_least_99pct": ours_a["slo_attainment"] >= ATTAINMENT,
        "replica_hours_at_most_60pct_of_static": ours_a["share_of_static"] <= MAX_SHARE,
        "better_than_serve_default_on_both": ours_a["slo_attainment"] > serve_a["slo_attainment"]
        and ours_a["replica_hours"] < serve_a["replica_hours"],
        "per_seed_attainment_at_least_99pct": [r["queue_depth"]["slo_attainment"] >= ATTAINMENT for r in runs],
        "per_seed_share_at_most_60pct": [r["queue_depth_share_of_static"] <= MAX_SHARE for r in runs],
    }
    print("\nall seeds together:")
    for name, a in agg.items():
        print(f"  {name:>14}: {a['slo_attainment']:.2%} SLO attainment, {a['replica_hours']:.2f} replica-hours "
              f"({a['share_of_static']:.0%} of static), ${a['cost_usd']:.2f}")
    print(f"targets: {targets}")
    print(f"({time.perf_counter() - t_start:.1f} s)")
    print(json.dumps({
        "benchmark": "autoscaling_sim",
        "trace": {"kind": "bursty", "peak_rate": PEAK_RATE, "base_fraction": 0.15, "mean_on_s": 120.0, "mean_off_s": 480.0,
                  "duration_s": args.duration, "seeds": args.seeds},
        "slo": {"ttft_s": SLO_TTFT_S, "tpot_s": SLO_TPOT_S, "attainment": ATTAINMENT},
        "replica": {"max_num_seqs": cost.max_batch_size, "max_batched_tokens": cost.max_batched_tokens,
                    "startup_s": cost.startup_s, "calibration_loadavg": calib.source.get("loadavg_before")},
        "policy": dict(policy_cfg.to_dict(), min_replicas=1, max_replicas="static_replicas + 1"),
        "serve_default": dict(
            dataclasses.asdict(ServeDefaultConfig(target_ongoing_requests=policy_cfg.target_queue_depth)),
            min_replicas=1, max_replicas="static_replicas + 1",
        ),
        "runs": runs,
        "aggregate": agg,
        "targets": targets,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
