"""The Files and Batches API and fleet batch jobs, on a served app, through the real `openai` client."""

from __future__ import annotations

import io
import json
import time

import openai
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardline.deployments.config import SERVE_ENV, ServeConfig
from tests.models import make_model
from tests.serve_cluster import local_serve

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from shardline.deployments.app import build_app

    tiny = make_model(tmp_path_factory.mktemp("batch-serve-tiny"))
    data = tmp_path_factory.mktemp("batch-data")
    with local_serve(num_cpus=6, env=SERVE_ENV) as port:
        config = ServeConfig(model=str(tiny), served_model_name="tiny", max_model_len=512, num_kv_blocks=256,
                             max_num_seqs=16, max_queue_len=8, data_dir=str(data))
        serve.run(build_app(config), name="shardline", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}/v1", "data": data, "tiny": tiny}


def test_openai_client_files_and_batches_end_to_end(served):
    client = openai.OpenAI(base_url=served["url"], api_key="unused", max_retries=0, timeout=60)
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": f"Question {i}"}]}}
             for i in range(20)]
    lines[6]["body"]["max_tokens"] = -1  # refused, on its own
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    uploaded = client.files.create(file=("requests.jsonl", io.BytesIO(text.encode())), purpose="batch")
    assert uploaded.bytes == len(text) and client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"team": "eval"})
    assert created.status in ("in_progress", "completed") and created.metadata == {"team": "eval"}
    deadline = time.monotonic() + 240
    batch = client.batches.retrieve(created.id)
    while batch.status not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.5)
        batch = client.batches.retrieve(created.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (20, 19, 1)
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in client.files.content(batch.error_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in outputs) == sorted(f"req-{i}" for i in range(20) if i != 6)
    assert all(o["response"]["body"]["object"] == "chat.completion" for o in outputs)
    assert [e["custom_id"] for e in errors] == ["req-6"] and "max_tokens" in errors[0]["error"]["message"]
    assert created.id in [b.id for b in client.batches.list().data]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")


def test_fleet_job_runs_rows_through_the_app_at_batch_priority(served, tmp_path):
    from shardline import batch

    rows = [{"prompt": f"Shared context. Question {i}", "max_tokens": 3, "n_id": i} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    job = batch.submit(tmp_path / "in.parquet", tmp_path / "job", model="tiny", mode="fleet", shard_rows=10,
                       concurrency=(2, 2), base_url=served["url"])
    status = job.wait(300)
    assert status["status"] == "completed" and status["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    out = pq.read_table(tmp_path / "job" / "results").to_pylist()
    assert sorted(r["row_index"] for r in out) == list(range(40))
    assert all(r["completion_tokens"] >= 1 and r["n_id"] == r["row_index"] for r in out)
