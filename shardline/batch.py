"""Batch jobs from Python: `shardline.batch.submit(...)` runs a file of requests as Ray tasks.

    from shardline import batch
    job = batch.submit("questions.parquet", "runs/q1", model="smollm2-135m", concurrency=(1, 4))
    print(job.progress.rows_done, job.progress.tokens_per_s)
    job.wait()                      # {"status": "completed", "request_counts": {...}, "usage": {...}}

The input is OpenAI batch JSONL or a Parquet / JSONL / CSV table with a `prompt`
or `messages` column; the output lands in the job folder (`results/`, a Parquet
dataset, or `output.jsonl` and `errors.jsonl`). See shardline.deployments.batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from shardline.cluster.batch_job import JobDir
from shardline.deployments.batch import BatchJob, Progress, connect, create_job


def submit(
    input_path: str | Path,
    job_dir: str | Path,
    *,
    model: str = "smollm2-135m",
    mode: str = "dedicated",
    concurrency: tuple[int, int] = (1, 1),
    shard_rows: int = 256,
    output_format: Optional[str] = None,
    defaults: Optional[dict[str, Any]] = None,
    engine: Optional[dict[str, Any]] = None,
    address: Optional[str] = None,
    base_url: str = "http://127.0.0.1:8000/v1",
    api_key: Optional[str] = None,
    on_progress: Optional[Callable[[Progress], None]] = None,
) -> BatchJob:
    """Check the input, write the job folder and start the job; returns at once.

    Args:
        input_path: OpenAI batch JSONL, or a table (Parquet, JSONL, CSV) with `prompt` or `messages`.
        job_dir: the job's folder (its results, its state; resubmitting the same input resumes it).
        model: a model folder or pulled alias (dedicated), or the served model's name (fleet).
        mode: "dedicated" (engine actors of the job's own) or "fleet" (the served app, batch priority).
        concurrency: (fewest, most) engine actors, or shards in flight to the app.
        shard_rows: rows per shard: the unit written, retried and resumed.
        output_format: "parquet" or "openai" (default: as the input).
        defaults: sampling defaults under every row's own (max_tokens, temperature, ...).
        engine: EngineConfig settings of dedicated engines, plus num_cpus / num_gpus per actor.
        address: the Ray cluster ("auto": the local one); default: join the local one in fleet mode,
            start one in dedicated mode when none runs.
        base_url: a fleet job's app, its OpenAI base URL.
        api_key: a fleet job's key for the app (its tenant pays and its quotas apply); not stored.
        on_progress: called with a `Progress` after every finished shard.
    """
    connect(address if address or mode == "dedicated" else "auto")
    job = create_job(
        input_path, job_dir, model=model, mode=mode, concurrency=concurrency, shard_rows=shard_rows,
        output_format=output_format, defaults=defaults, engine=engine, base_url=base_url,
    )
    return BatchJob(job, on_progress, api_key)


def resume(job_dir: str | Path, *, address: Optional[str] = None, api_key: Optional[str] = None,
           on_progress: Optional[Callable[[Progress], None]] = None) -> BatchJob:
    """Run what a job has left (its finished shards stay as they are)."""
    job = JobDir(job_dir)
    connect(address if address or job.spec.mode == "dedicated" else "auto")
    return BatchJob(job, on_progress, api_key)


def status(job_dir: str | Path) -> dict[str, Any]:
    return JobDir(job_dir).status()


def cancel(job_dir: str | Path) -> None:
    """Ask the job's driver to stop (it finishes at its next look, leaving finished shards in place)."""
    JobDir(job_dir).cancel()


__all__ = ["submit", "resume", "status", "cancel", "BatchJob", "Progress"]
