"""benchmarks/routing_sim.py runs end to end on a tiny workload and ends with one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_routing_sim_smoke():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "routing_sim.py"), "--replicas", "2", "--tenants", "3",
         "--requests", "60", "--rate", "20", "--context-tokens", "256", "--capacity-replicas", "2"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(summary["results"]) == {"round_robin", "pow2", "prefix_approx", "kv_aware"}
    kv = summary["results"]["kv_aware"]
    assert 0 < kv["hit_rate"] <= kv["oracle_hit_rate"] <= 1
    assert summary["scheduler_capacity"][0]["replicas"] == 2


def test_routing_benchmark_workload_oracle_and_figures():
    """benchmarks/routing.py's pure parts (its cluster run is the benchmark itself)."""
    from benchmarks.routing import Outcome, Workload, make_arrivals, oracle, summarize

    w = Workload(replicas=3, tenants=6, requests=50, rate=10.0, context_tokens=256)
    arrivals = make_arrivals(w, vocab=512)
    assert len(arrivals) == 50 and all(arrivals[i].time < arrivals[i + 1].time for i in range(49))
    assert all(a.tokens[:256] == arrivals[0].tokens[:256] for a in arrivals if a.tenant == arrivals[0].tenant)
    assert all(3 <= t < 512 for a in arrivals for t in a.tokens)
    orc = oracle(w, arrivals)
    first = {a.tenant: i for i, a in reversed(list(enumerate(arrivals)))}
    expected = sum(256 for i, a in enumerate(arrivals) if first[a.tenant] != i) / sum(len(a.tokens) for a in arrivals)
    assert abs(orc["hit_rate"] - expected) < 1e-9 and orc["packable"]  # 2 contexts of 16 blocks in 40 blocks
    outcomes = [Outcome(0, 0.0, 0.1, 1.0, 100, 50, 10), Outcome(1, 0.5, 0.8, 2.0, 100, 0, 10), Outcome(1, 1.0, error="x")]
    s = summarize(w, outcomes, oracle_hit=0.5)
    assert (s["completed"], s["failed"], s["hit_rate"], s["hit_vs_oracle"]) == (2, 1, 0.25, 0.5)
    assert (s["ttft_p50_s"], s["makespan_s"], s["output_tok_per_s"]) == (0.2, 2.0, 10.0)


def test_routing_benchmark_model_sets_dtype_and_default_rate():
    from benchmarks.routing import BENCH_MODELS, parse_args

    w, args = parse_args([])
    assert (args.model, w.dtype, w.rate) == ("llama-88m", "bfloat16", BENCH_MODELS["llama-88m"][1])
    w, _ = parse_args(["--model", "tiny"])
    assert (w.dtype, w.rate) == ("float32", BENCH_MODELS["tiny"][1])
    w, _ = parse_args(["--model", "tiny", "--rate", "7"])
    assert w.rate == 7.0
