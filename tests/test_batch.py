"""Batch jobs on a real local Ray cluster: every row once, through a killed engine and a killed driver.

The tiny random model answers with max_tokens tokens (ignore_eos), so a row's usage is known in advance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.models import make_model

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

DEFAULTS = {"max_tokens": 4, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("batch-tiny"), num_layers=1, vocab_size=256, max_position_embeddings=256)


def table_input(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Report {i % 4}: the quarterly numbers. Question {i}?", "id": i} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_results(job_dir: Path) -> list[dict]:
    return pq.read_table(job_dir / "results").to_pylist()


def test_dedicated_job_answers_every_row_once_and_keeps_bad_rows(cluster, tiny, tmp_path):
    from shardline import batch

    rows = [{"prompt": f"Question {i}", "tag": f"t{i}", "max_tokens": None} for i in range(30)]
    rows[3]["prompt"] = None  # malformed
    rows[5]["prompt"] = "word " * 400  # past the model's 256-token context
    rows[7]["max_tokens"] = 0  # a bad sampling value
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    job = batch.submit(tmp_path / "in.parquet", tmp_path / "job", model=str(tiny), shard_rows=4, concurrency=(1, 2),
                       defaults=DEFAULTS)
    status = job.wait(300)
    assert status["status"] == "completed", status
    assert status["request_counts"] == {"total": 30, "completed": 27, "failed": 3}
    out = read_results(tmp_path / "job")
    assert sorted(r["row_index"] for r in out) == list(range(30))
    by_index = {r["row_index"]: r for r in out}
    assert all(by_index[i]["tag"] == f"t{i}" for i in range(30))  # columns pass through
    assert "row 4: prompt is empty" in by_index[3]["error"]
    assert "line 6" in by_index[5]["error"] and "context" in by_index[5]["error"]
    assert "line 8" in by_index[7]["error"] and "max_tokens" in by_index[7]["error"]
    ok = [r for r in out if r["error"] is None]
    assert all(r["completion_tokens"] == 4 and r["finish_reason"] == "length" for r in ok)
    assert status["usage"]["completion_tokens"] == 4 * 27
    # resubmitting the same input to the same folder runs nothing again
    again = batch.submit(tmp_path / "in.parquet", tmp_path / "job", model=str(tiny), shard_rows=4, defaults=DEFAULTS)
    assert again.wait(120)["usage"] == status["usage"] and again.progress.rows_retried == 0


def test_openai_batch_file_gives_output_and_error_files(cluster, tiny, tmp_path):
    from shardline import batch

    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": str(tiny), "messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": f"Question {i}"}]}}
             for i in range(12)]
    text = "\n".join(json.dumps(line) for line in lines)
    text = text.replace('"custom_id": "r4", ', '"custom_id": "r4", "bogus": 1, ')  # an unknown field
    (tmp_path / "in.jsonl").write_text(text + "\n")
    status = batch.submit(tmp_path / "in.jsonl", tmp_path / "job", model=str(tiny), shard_rows=5, defaults=DEFAULTS).wait(300)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 12, "completed": 11, "failed": 1}
    outputs = [json.loads(line) for line in (tmp_path / "job" / "output.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "job" / "errors.jsonl").read_text().splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"r{i}" for i in range(12) if i != 4)
    assert [e["custom_id"] for e in errors] == ["r4"] and "unknown field" in errors[0]["error"]["message"]
    body = outputs[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 4
    assert status["usage"]["cached_tokens"] > 0  # rows share the system prompt: the engine's prefix cache serves it


def test_a_killed_engine_actor_loses_no_row_and_redoes_one_shard(cluster, tiny, tmp_path):
    from shardline import batch

    table_input(tmp_path / "in.parquet", 160)
    job = batch.submit(tmp_path / "in.parquet", tmp_path / "job", model=str(tiny), shard_rows=8, concurrency=(1, 1),
                       defaults={**DEFAULTS, "max_tokens": 24})
    deadline = time.monotonic() + 120
    while job.progress.rows_done < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    slot = job.driver.slots[0]
    while slot.running is None and time.monotonic() < deadline:
        time.sleep(0.01)
    ray.kill(slot.handle, no_restart=True)  # mid-shard
    status = job.wait(300)
    assert status["status"] == "completed", status
    out = read_results(tmp_path / "job")
    assert sorted(r["row_index"] for r in out) == list(range(160))  # every row once: none lost, none twice
    assert all(r["completion_tokens"] == 24 for r in out)
    # the work done twice: the shards the engine held (two: the next one fills in behind the last)
    assert 0 < job.progress.rows_retried <= 2 * 8


def test_a_killed_driver_leaves_a_job_that_resume_finishes(tiny, tmp_path):
    """`shardline batch submit` killed with SIGKILL mid-job (its own local cluster goes with it); `resume`
    finishes it, and every row is in the results once."""
    if ray.is_initialized():
        ray.shutdown()
    table_input(tmp_path / "in.parquet", 120)
    cli = [str(Path(sys.executable).parent / "shardline"), "batch"]
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="sl-ray-", dir="/tmp"))  # short: Ray's socket paths
    job_dir = tmp_path / "job"
    proc = subprocess.Popen([*cli, "submit", str(tmp_path / "in.parquet"), "--output", str(job_dir), "--model", str(tiny),
                             "--shard-rows", "8", "--max-tokens", "16", "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list((job_dir / "results").glob("*.parquet"))) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    done_before = len(list((job_dir / "results").glob("*.parquet")))
    assert 3 <= done_before < 15, f"kill the driver mid-job: {done_before} shards done; {stderr.decode()[-2000:]}"
    resumed = subprocess.run([*cli, "resume", str(job_dir), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "completed, 120 of 120 rows answered" in resumed.stdout
    out = read_results(job_dir)
    assert sorted(r["row_index"] for r in out) == list(range(120))
    status = subprocess.run([*cli, "status", str(job_dir), "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert json.loads(status.stdout)["status"] == "completed"
