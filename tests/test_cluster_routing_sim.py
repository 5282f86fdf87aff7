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
