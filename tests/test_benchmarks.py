"""The engine benchmark's harness runs end to end and ends with one JSON line (tiny model, shardline only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_engine_throughput_quick_tiny(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "engine_throughput.py"),
            "--quick",
            "--tiny",
            "--skip-vllm",
            "--skip-transformers",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=230,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["complete"] is True
    assert json.loads(out.read_text())["throughput"] == report["throughput"]
    for key in ("config", "peers", "machine", "throughput", "roofline", "serving", "errors"):
        assert key in report, key
    assert report["errors"] == [], report["errors"]
    assert report["peers"]["vllm"]["available"] is False
    cells = report["throughput"]["tiny"]["bf16"]
    assert set(cells) == {"1", "8"}
    for cell in cells.values():
        assert cell["shardline"] > 0
        assert {"transformers", "vllm", "shardline_vs_transformers", "shardline_vs_vllm"} <= set(cell)
    roof = report["roofline"]["tiny"]["bf16"]
    assert report["machine"]["bandwidth_gb_s"] > 0
    assert roof["roofline_tok_s"] > 0 and 0 < roof["shardline_fraction"]
    # the headline fraction divides by the bandwidth copied beside the decode probe
    beside = roof["shardline_bandwidth_gb_s"]
    assert beside > 0
    assert roof["shardline_fraction"] == pytest.approx(roof["shardline_decode_tok_s"] * roof["weight_bytes_per_token"] / (beside * 1e9))
    assert roof["shardline_fraction_run_max"] == pytest.approx(roof["shardline_decode_tok_s"] / roof["roofline_tok_s"])
    assert len(report["machine"]["loadavg_start"]) == 3 and len(report["machine"]["loadavg_end"]) == 3
    serving = report["serving"]
    for mode in ("shardline_continuous", "shardline_static"):
        s = serving[mode]
        assert s["completed"] == 20 and not s["timed_out"]
        assert s["output_tokens"] == s["output_tokens_expected"]
        assert s["output_throughput"] > 0
        assert s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p90"] > 0
    assert serving["continuous_vs_static_throughput"] > 0
    assert "vllm" not in serving


def test_serve_load_gives_each_rate_fresh_prompts():
    """A later rate must not find its prompts in the prefix cache an earlier rate filled."""
    from benchmarks.serve_load import prompts_per_rate

    a = prompts_per_rate([2.0, 8.0, float("inf")], 16, 128, 49152, seed=0)
    assert list(a) == ["2.0", "8.0", "inf"]
    firsts = {tuple(p[:16]) for prompts in a.values() for p in prompts}
    assert len(firsts) == 3 * 16  # no first block shared, within or across rates
    assert all(len(p) == 128 for prompts in a.values() for p in prompts)
    assert prompts_per_rate([2.0, 8.0, float("inf")], 16, 128, 49152, seed=0) == a  # every engine gets the same
