"""OpenAI's Files and Batches API over shardline's batch jobs.

    POST /v1/files (purpose=batch)   GET /v1/files/{id}   GET /v1/files/{id}/content   GET /v1/files
    POST /v1/batches                 GET /v1/batches/{id} POST /v1/batches/{id}/cancel GET /v1/batches

Files live under the app's data folder (`ServeConfig.data_dir`): files/<id> and
its record <id>.json. A batch is a job folder (cluster/batch_job.py) under
batches/<id>, plus batch.json (its OpenAI fields and its owner). `start` runs the
job as a detached Ray actor (`BatchJobRunner`, on this node, where the data
folder is) in fleet mode: its rows come back to this app's endpoints at batch
priority, with the key of the tenant that created it. When
the job completes, its output.jsonl and errors.jsonl become files of their own.

A tenant sees only its own files and batches (an API key's tenant; without keys
everyone is the anonymous tenant). Several ingress replicas across nodes need
the data folder on shared storage.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from shardline.cluster.batch_job import CANCELLED, COMPLETED, FAILED, FINALIZING, JobDir, write_atomic
from shardline.deployments import batch_io
from shardline.deployments.errors import APIError

# The endpoint a batch's lines may name -> what it runs.
BATCH_ENDPOINTS = tuple(batch_io.ENDPOINTS)
MAX_FILE_BYTES = 512 << 20


def _not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"No {kind} with id '{ident}'.", code="not_found")


class BatchStore:
    """Files and batches of one app, on disk.

    Args:
        root: the data folder.
        model_name: the served model (batch lines must name it).
    """

    def __init__(self, root: str | Path, model_name: str):
        self.root = Path(root).expanduser()
        self.files = self.root / "files"
        self.batches = self.root / "batches"
        self.model_name = model_name
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)

    # ---- files -----------------------------------------------------------------------

    def add_file(self, data: bytes, filename: str, purpose: str, owner: str, file_id: Optional[str] = None) -> dict[str, Any]:
        if purpose not in ("batch", "batch_output"):
            raise APIError(400, f"purpose must be 'batch', got {purpose!r}", "purpose")
        if len(data) > MAX_FILE_BYTES:
            raise APIError(413, f"file is {len(data)} bytes; the limit is {MAX_FILE_BYTES}", "file")
        file_id = file_id or f"file-{uuid.uuid4().hex[:24]}"
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed"}
        write_atomic(self.files / file_id, data)
        write_atomic(self.files / f"{file_id}.json", json.dumps({**record, "owner": owner}).encode())
        return record

    def _file_record(self, file_id: str, owner: str) -> dict[str, Any]:
        path = self.files / f"{file_id}.json"
        if "/" in file_id or not path.is_file():
            raise _not_found("file", file_id)
        record = json.loads(path.read_text())
        if record.pop("owner") != owner:
            raise _not_found("file", file_id)
        return record

    def get_file(self, file_id: str, owner: str) -> dict[str, Any]:
        return self._file_record(file_id, owner)

    def file_path(self, file_id: str, owner: str) -> Path:
        self._file_record(file_id, owner)
        return self.files / file_id

    def list_files(self, owner: str) -> dict[str, Any]:
        records = []
        for path in sorted(self.files.glob("*.json")):
            record = json.loads(path.read_text())
            if record.pop("owner") == owner:
                records.append(record)
        return {"object": "list", "data": records}

    # ---- batches ------------------------------------------------------------------------

    def create_batch(self, input_file_id: str, endpoint: str, completion_window: str, metadata: Optional[dict],
                     owner: str, base_url: str = "http://127.0.0.1:8000/v1") -> JobDir:
        """Check the input file and write the batch's job folder (ValueError-free: APIErrors)."""
        from shardline.deployments.batch import create_job

        if endpoint not in BATCH_ENDPOINTS:
            raise APIError(400, f"endpoint must be one of {list(BATCH_ENDPOINTS)}, got {endpoint!r}", "endpoint")
        if completion_window != "24h":
            raise APIError(400, "completion_window must be '24h'", "completion_window")
        path = self.file_path(input_file_id, owner)
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        staged = self.batches / batch_id / "input.jsonl"  # the suffix batch_io reads formats by
        staged.parent.mkdir(parents=True)
        staged.write_bytes(path.read_bytes())
        try:
            info = batch_io.inspect(staged, self.model_name)
            if info.input_format != "openai" or info.endpoint != endpoint:
                raise ValueError(f"the file's lines must be OpenAI batch requests for {endpoint}")
            job = create_job(staged, self.batches / batch_id, model=self.model_name, mode="fleet", concurrency=(1, 2),
                             job_id=batch_id, output_format="openai", base_url=base_url)
        except (ValueError, FileNotFoundError) as e:
            raise APIError(400, str(e), "input_file_id") from None
        meta = {"endpoint": endpoint, "input_file_id": input_file_id, "completion_window": completion_window,
                "metadata": metadata, "owner": owner, "created_at": int(time.time())}
        write_atomic(job.path / "batch.json", json.dumps(meta).encode())
        return job

    def _job(self, batch_id: str, owner: str) -> tuple[JobDir, dict[str, Any]]:
        path = self.batches / batch_id
        if "/" in batch_id or not (path / "batch.json").is_file():
            raise _not_found("batch", batch_id)
        meta = json.loads((path / "batch.json").read_text())
        if meta["owner"] != owner:
            raise _not_found("batch", batch_id)
        return JobDir(path), meta

    def batch(self, batch_id: str, owner: str) -> dict[str, Any]:
        """The OpenAI Batch object; once the job completed, its output and error files exist."""
        job, meta = self._job(batch_id, owner)
        status = job.status()
        ended = job.ended() or {}
        output_id = error_id = None
        if status["status"] == COMPLETED:
            output_id, error_id = self._register_outputs(job, owner)
        now_state = status["status"]
        return {
            "id": batch_id, "object": "batch", "endpoint": meta["endpoint"], "errors": None,
            "input_file_id": meta["input_file_id"], "completion_window": meta["completion_window"],
            "status": now_state, "output_file_id": output_id, "error_file_id": error_id,
            "created_at": meta["created_at"],
            "in_progress_at": meta["created_at"],
            "finalizing_at": int(ended["at"]) if now_state in (FINALIZING, COMPLETED) and ended.get("at") else None,
            "completed_at": int(ended["at"]) if now_state == COMPLETED else None,
            "failed_at": int(ended["at"]) if now_state == FAILED else None,
            "cancelled_at": int(ended["at"]) if now_state == CANCELLED else None,
            "expires_at": None, "expired_at": None, "cancelling_at": None,
            "request_counts": status["request_counts"],
            "metadata": meta.get("metadata"),
            "usage": {"input_tokens": status["usage"]["prompt_tokens"],
                      "input_tokens_details": {"cached_tokens": status["usage"]["cached_tokens"]},
                      "output_tokens": status["usage"]["completion_tokens"],
                      "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": status["usage"]["prompt_tokens"] + status["usage"]["completion_tokens"]},
        }

    def _register_outputs(self, job: JobDir, owner: str) -> tuple[Optional[str], Optional[str]]:
        ids = []
        for name in ("output.jsonl", "errors.jsonl"):
            data = (job.path / name).read_bytes()
            file_id = f"file-{job.spec.job_id}-{name.split('.')[0]}"
            if not data and name == "errors.jsonl":
                ids.append(None)
                continue
            if not (self.files / file_id).exists():
                self.add_file(data, f"{job.spec.job_id}_{name}", "batch_output", owner, file_id)
            ids.append(file_id)
        return ids[0], ids[1]

    def cancel(self, batch_id: str, owner: str) -> dict[str, Any]:
        job, _ = self._job(batch_id, owner)
        if job.ended() is None:
            job.cancel()
        return self.batch(batch_id, owner)

    def list_batches(self, owner: str) -> dict[str, Any]:
        found = []
        for path in sorted(self.batches.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            meta_file = path / "batch.json"
            if meta_file.is_file() and json.loads(meta_file.read_text())["owner"] == owner:
                found.append(self.batch(path.name, owner))
        return {"object": "list", "data": found, "has_more": False}


class BatchJobRunner:
    """A detached Ray actor that drives one batch job to its end (deployments/batch.py's Driver)."""

    def __init__(self, job_dir: str, api_key: Optional[str] = None):
        self.job_dir = job_dir
        self.api_key = api_key

    def run(self) -> None:
        """Drive the job, then end this actor (a detached actor outlives its caller otherwise)."""
        import ray

        from shardline.deployments.batch import Driver

        try:
            Driver(JobDir(self.job_dir), api_key=self.api_key).run()
        finally:
            ray.actor.exit_actor()


def start(job: JobDir, api_key: Optional[str] = None) -> None:
    """Run `job` in a detached actor on this node (the data folder is here)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    runner = ray.remote(BatchJobRunner).options(
        name=f"shardline-{job.spec.job_id}", lifetime="detached", num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote(str(job.path), api_key)
    runner.run.remote()  # the runner's own reference keeps it alive until the job ends
