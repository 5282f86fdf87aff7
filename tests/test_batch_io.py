"""Batch jobs' pure parts: shards and the job folder (cluster/batch_job.py), input and output (deployments/batch_io.py)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from shardline.cluster.batch_job import COMPLETED, JobDir, JobSpec, ShardCounts, plan_shards
from shardline.deployments import batch_io
from shardline.deployments.batch_io import BatchRow, RowResult


def test_shards_cover_every_row_once():
    for rows, size in [(0, 4), (1, 4), (10, 4), (12, 4), (1000, 7)]:
        shards = plan_shards(rows, size)
        covered = [i for s in shards for i in range(s.start, s.end)]
        assert covered == list(range(rows)) and all(0 < s.num_rows <= size for s in shards)
        assert [s.index for s in shards] == list(range(len(shards)))
    with pytest.raises(ValueError):
        plan_shards(10, 0)


def _spec(**kw) -> JobSpec:
    return JobSpec(**{"job_id": "batch_x", "input_path": "/in.parquet", "input_format": "table", "output_format": "parquet",
                      "model": "m", "num_rows": 10, "shard_rows": 4, **kw})


def test_spec_checks_its_fields_and_round_trips():
    spec = _spec(concurrency=(1, 3), defaults={"max_tokens": 8})
    assert JobSpec.from_json(spec.to_json()) == spec
    for bad in ({"mode": "x"}, {"input_format": "x"}, {"output_format": "x"}, {"concurrency": (2, 1)}, {"concurrency": (0, 1)}):
        with pytest.raises(ValueError):
            _spec(**bad)


def test_job_dir_marks_a_shard_done_once_and_sums_counts(tmp_path):
    job = JobDir.create(tmp_path / "job", _spec())
    assert [s.index for s in job.pending()] == [0, 1, 2]
    first = job.spec.shards[0]
    assert job.finish_shard(first, {"parquet": b"data"}, ShardCounts(rows=4, failed=1, prompt_tokens=40, cached_tokens=10))
    assert not job.finish_shard(first, {"parquet": b"other"}, ShardCounts(rows=4))  # a retry that finished twice
    assert job.shard_output(first).read_bytes() == b"data"
    assert [s.index for s in job.pending()] == [1, 2]
    status = job.status()
    assert status["request_counts"] == {"total": 10, "completed": 3, "failed": 1}
    assert status["usage"]["cached_share"] == 0.25 and status["status"] == "in_progress"
    assert JobDir(tmp_path / "job").spec == job.spec  # reopened from disk
    with pytest.raises(FileExistsError):
        JobDir.create(tmp_path / "job", _spec(input_path="/other.parquet"))
    job.cancel()
    assert job.status()["status"] == "cancelling"
    job.set_state(COMPLETED)
    assert job.status()["status"] == "completed"
    with pytest.raises(FileNotFoundError):
        JobDir(tmp_path / "nothing")


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_inspect_refuses_what_cannot_run_before_any_compute(tmp_path):
    with pytest.raises(ValueError, match="not a batch input"):
        batch_io.inspect(_write_jsonl(tmp_path / "in.txt", ["x"]))
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        batch_io.inspect(_write_jsonl(tmp_path / "bad.jsonl", ["{nope"]))
    with pytest.raises(ValueError, match="exactly one of the columns"):
        batch_io.inspect(_write_jsonl(tmp_path / "cols.jsonl", [{"text": "hi"}]))
    with pytest.raises(ValueError, match="not served here"):
        batch_io.inspect(_write_jsonl(tmp_path / "emb.jsonl", [{"custom_id": "a", "url": "/v1/embeddings", "body": {}}]))
    with pytest.raises(ValueError, match="asks for model 'other'"):
        batch_io.inspect(_write_jsonl(tmp_path / "m.jsonl", [
            {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "other", "prompt": "x"}}]), "m")
    with pytest.raises(ValueError, match="no rows"):
        batch_io.inspect(_write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(FileNotFoundError):
        batch_io.inspect(tmp_path / "missing.parquet")


def test_openai_rows_keep_line_numbers_for_their_errors(tmp_path):
    path = _write_jsonl(tmp_path / "in.jsonl", [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "hi"}]}},
        "{not json",
        "",
        {"custom_id": 3, "method": "POST", "url": "/v1/chat/completions", "body": {}},
        {"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {}},
        {"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {}, "extra": 1},
    ])
    info = batch_io.inspect(path, "m")
    assert (info.input_format, info.kind, info.num_rows) == ("openai", "chat", 5)  # the blank line is no row
    rows = list(batch_io.iter_rows(info, "m", {"max_tokens": 5}))
    assert [r.index for r in rows] == [0, 1, 2, 3, 4] and [r.line for r in rows] == [1, 2, 4, 5, 6]
    assert rows[0].error is None and rows[0].body == {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "model": "m"}
    assert "line 2: not JSON" in rows[1].error
    assert "line 4: custom_id" in rows[2].error
    assert "line 5: url" in rows[3].error
    assert "line 6: unknown field" in rows[4].error


def test_table_rows_from_parquet_csv_and_jsonl_pass_other_columns_through(tmp_path):
    records = [{"prompt": "p0", "max_tokens": 3, "tag": "a"}, {"prompt": None, "max_tokens": 2, "tag": "b"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "in.parquet")
    pacsv.write_csv(pa.Table.from_pylist([{"messages": json.dumps([{"role": "user", "content": "hi"}]), "k": 1}]),
                    tmp_path / "in.csv")
    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "x", "temperature": 0.5, "meta": {"a": 1}}, "[1]"])
    rows = list(batch_io.iter_rows(batch_io.inspect(tmp_path / "in.parquet"), "m"))
    assert rows[0].body == {"max_tokens": 3, "model": "m", "prompt": "p0"} and rows[0].passthrough == {"tag": "a"}
    assert rows[1].error == "row 2: prompt is empty" and rows[1].passthrough == {"tag": "b"}
    (csv_row,) = batch_io.iter_rows(batch_io.inspect(tmp_path / "in.csv"), "m")
    assert csv_row.kind == "chat" and csv_row.body["messages"] == [{"role": "user", "content": "hi"}]
    jsonl = list(batch_io.iter_rows(batch_io.inspect(tmp_path / "in.jsonl"), "m"))
    assert jsonl[0].body["temperature"] == 0.5 and jsonl[0].passthrough == {"meta": {"a": 1}}
    assert "line 2: not a JSON object" in jsonl[1].error


def test_cache_key_groups_rows_that_share_a_conversation():
    system = {"role": "system", "content": "You summarize long reports." * 20}
    a = BatchRow(0, 1, kind="chat", body={"messages": [system, {"role": "user", "content": "Question one"}]})
    b = BatchRow(1, 2, kind="chat", body={"messages": [system, {"role": "user", "content": "Question two"}]})
    c = BatchRow(2, 3, kind="chat", body={"messages": [{"role": "user", "content": "Question one"}]})
    assert a.cache_key()[:-20] == b.cache_key()[:-20] and a.cache_key() != c.cache_key()
    assert BatchRow(0, 1, error="x").cache_key() == ""


def test_outputs_have_one_row_per_input_row_in_order():
    row = BatchRow(1, 2, custom_id="b", passthrough={"tag": "t"})
    results = [
        RowResult.failed(row, "line 2: bad", 400),
        RowResult(0, 1, "a", {"tag": "s"}, 200, {"id": "cmpl-1", "choices": []}, None, "hi", "stop", 3, 1, 2),
    ]
    table = pq.read_table(io.BytesIO(batch_io.parquet_shard(results)))
    assert table.column("row_index").to_pylist() == [0, 1]
    assert table.column("tag").to_pylist() == ["s", "t"] and table.column("error").to_pylist() == [None, "line 2: bad"]
    assert table.schema.field("completion_tokens").type == pa.int64()
    out, errors = batch_io.openai_shard(results, "batch_x")
    (ok,) = [json.loads(line) for line in out.decode().splitlines()]
    (err,) = [json.loads(line) for line in errors.decode().splitlines()]
    assert ok["custom_id"] == "a" and ok["response"]["status_code"] == 200 and ok["error"] is None
    assert err["custom_id"] == "b" and err["response"]["status_code"] == 400 and err["error"]["line"] == 2


def test_a_job_for_a_model_that_cannot_run_fails_before_any_compute(tmp_path):
    from shardline.deployments.batch import create_job

    _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="neither a model folder nor a known alias"):
        create_job(tmp_path / "in.jsonl", tmp_path / "job", model="no-such-model")
    with pytest.raises(ValueError, match="no OpenAI app answers at http://127.0.0.1:9/v1"):
        create_job(tmp_path / "in.jsonl", tmp_path / "job", model="m", mode="fleet", base_url="http://127.0.0.1:9/v1")
    assert not (tmp_path / "job").exists()
