"""Batch jobs on Ray: the driver that feeds shards of rows to engines and writes what comes back.

    job = submit("rows.parquet", "out/job1", model="smollm2-135m", concurrency=(1, 4))
    job.wait()

Two ways to run. Dedicated: engine actors of the job's own (`BatchEngine`, one
per actor, `concurrency` = (fewest, most) actors; more start while the cluster
has free CPUs, as nodes join). Fleet: each shard is a Ray task that sends its
rows to the served app's OpenAI endpoints with the batch priority header
(`run_over_http`): they queue at batch priority in the head-node scheduler, fill
idle capacity and never hold back interactive requests (tenant quotas apply).

The bookkeeping is cluster/batch_job.py's: a shard is done when its output file
exists, so the driver writes each shard as it finishes and skips finished ones on
resume. Input is read a window of shards at a time; inside a window rows are
ordered by what they share (`BatchRow.cache_key`), so that rows with a common
system prompt or document land in the same shard, run in the same engine step
after step, and hit its prefix cache. A shard whose actor dies (or whose node is
lost) runs again on a fresh actor, at most `MAX_ATTEMPTS` times; the driver's
own death leaves a job `resume` finishes.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from shardline.cluster.batch_job import (
    CANCELLED,
    COMPLETED,
    FAILED,
    JobDir,
    JobSpec,
    Shard,
    ShardCounts,
    new_job_id,
)
from shardline.deployments import batch_io
from shardline.deployments.batch_io import BatchRow, RowResult

logger = logging.getLogger(__name__)

# Shards a row window holds: rows are ordered by cache key within a window.
WINDOW_SHARDS = 8
# Tries of one shard before the job fails (a shard that kills every actor it meets).
MAX_ATTEMPTS = 3


def connect(address: Optional[str]) -> None:
    """Join the cluster at `address` ("auto": the one `shardline serve` or `ray start` runs here), or start
    a local one (loopback only) when there is none and no address was given."""
    import ray

    if ray.is_initialized():
        return
    if address:
        from shardline.deployments.cluster_address import join

        join(address, log_to_driver=False, logging_level="ERROR")
        return
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")


def create_job(
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
    base_url: str = "http://127.0.0.1:8000/v1",
    job_id: Optional[str] = None,
) -> JobDir:
    """Check the input and the model (ValueError before any compute) and write the job's directory."""
    info = batch_io.inspect(input_path, model)
    check_model(model, mode, base_url)
    spec = JobSpec(
        job_id=job_id or new_job_id(),
        input_path=str(Path(input_path).resolve()),
        input_format=info.input_format,
        output_format=output_format or ("openai" if info.input_format == "openai" else "parquet"),
        model=model,
        mode=mode,
        num_rows=info.num_rows,
        shard_rows=shard_rows,
        concurrency=concurrency,
        endpoint=info.endpoint,
        defaults=dict(defaults or {}),
        engine=dict(engine or {}),
        base_url=base_url,
    )
    return JobDir.create(job_dir, spec)


def check_model(model: str, mode: str, base_url: str) -> None:
    """ValueError when the job's model cannot run: not a folder or pulled alias (dedicated), not among
    the app's models or the app not answering (fleet)."""
    if mode == "dedicated":
        from shardline.engine.pull import resolve_model

        resolve_model(model)
        return
    import httpx

    try:
        listed = httpx.get(base_url.rstrip("/") + "/models", timeout=30).json()
        names = [m["id"] for m in listed.get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"no OpenAI app answers at {base_url}: {type(e).__name__}: {e}") from None
    if model not in names:
        raise ValueError(f"model {model!r} is not served at {base_url} (it serves {names})")


def shards_of(job: JobDir, wanted: set[int]) -> Iterator[tuple[Shard, list[BatchRow]]]:
    """The rows of each wanted shard, reading the input once, a window at a time."""
    spec = job.spec
    info = batch_io.inspect(spec.input_path, spec.model)
    shards = spec.shards
    window_rows = spec.shard_rows * WINDOW_SHARDS
    rows = batch_io.iter_rows(info, spec.model, spec.defaults)
    for first in range(0, len(shards), WINDOW_SHARDS):
        group = shards[first : first + WINDOW_SHARDS]
        if not wanted.intersection(s.index for s in group):
            for _ in range(group[-1].end - group[0].start):  # skip a finished window's rows
                next(rows)
            continue
        window = [next(rows) for _ in range(group[-1].end - group[0].start)]
        window.sort(key=lambda r: (r.cache_key(), r.index))
        base = first * spec.shard_rows
        assert base == group[0].start and len(window) <= window_rows
        for shard in group:
            if shard.index in wanted:
                yield shard, window[shard.start - base : shard.end - base]


@dataclass
class _Slot:
    """One engine actor (dedicated) or one lane to the app (fleet), and what it is running."""

    handle: Any
    last_key: str = ""
    running: Optional[tuple[Any, Shard, list[BatchRow], int, Any]] = None  # (ref, shard, rows, attempt, handle)


@dataclass
class Progress:
    """What a running job has done, for a bar or a caller's poll."""

    rows_done: int = 0
    rows_total: int = 0
    completion_tokens: int = 0
    # Rows sent again because the engine running their shard was lost (work done twice, written once).
    rows_retried: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.monotonic() - self.started, 1e-9)


class Driver:
    """Runs one job to its end (completed, cancelled or failed); see the module docstring.

    Args:
        job: the job's directory.
        on_progress: called after every finished shard.
        poll_s: how often the driver looks at its actors, the cancel flag and the cluster's CPUs.
        api_key: a fleet job's key for the app (its tenant pays); never written to the job folder.
    """

    def __init__(
        self, job: JobDir, on_progress: Optional[Callable[[Progress], None]] = None, poll_s: float = 0.5,
        api_key: Optional[str] = None,
    ):
        self.job = job
        self.api_key = api_key
        self.spec = job.spec
        self.on_progress = on_progress
        self.poll_s = poll_s
        self.progress = Progress(rows_total=self.spec.num_rows)
        self.slots: list[_Slot] = []

    # ---- engines -------------------------------------------------------------------

    def _actor_options(self) -> dict[str, Any]:
        engine = self.spec.engine
        cpus = float(engine.get("num_cpus", 1)) * int(engine.get("tensor_parallel_size", 1))
        return {"num_cpus": cpus, "num_gpus": float(engine.get("num_gpus", 0)), "max_restarts": 0}

    def _slots_per_engine(self) -> int:
        from shardline.deployments.batch_worker import BatchEngine

        return 1 if self.spec.mode == "fleet" else BatchEngine.SHARDS_IN_FLIGHT

    def _new_engine(self) -> Any:
        """A dedicated engine actor (fleet lanes need none: each shard is a task of its own)."""
        if self.spec.mode == "fleet":
            return None
        import ray

        from shardline.deployments.batch_worker import BatchEngine

        engine = {k: v for k, v in self.spec.engine.items() if k not in ("num_cpus", "num_gpus")}
        options = dict(self._actor_options(), max_concurrency=BatchEngine.SHARDS_IN_FLIGHT + 1)
        return ray.remote(BatchEngine).options(**options).remote(self.spec.model, self.spec.model, engine)

    def _add_engine(self) -> None:
        """One more engine, and its slots: shards it takes at once (the next fills in behind the last)."""
        handle = self._new_engine()
        self.slots.extend(_Slot(handle) for _ in range(self._slots_per_engine()))

    @property
    def num_engines(self) -> int:
        return len(self.slots) // self._slots_per_engine()

    def _room_for_another(self) -> bool:
        """Whether the cluster has the CPUs (and GPUs) for one more engine actor right now."""
        if self.num_engines >= self.spec.concurrency[1]:
            return False
        if self.spec.mode == "fleet":
            return True
        import ray

        free = ray.available_resources()
        need = self._actor_options()
        return free.get("CPU", 0) >= need["num_cpus"] and free.get("GPU", 0) >= need["num_gpus"]

    def _submit(self, slot: _Slot, shard: Shard, rows: list[BatchRow], attempt: int) -> None:
        if self.spec.mode == "fleet":
            ref = _fleet_shard().remote(self.spec.base_url, rows, self.api_key)
        else:
            ref = slot.handle.run.remote(rows)
        slot.running = (ref, shard, rows, attempt, slot.handle)
        slot.last_key = rows[0].cache_key() if rows else ""

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run every pending shard; returns the job's final status."""
        import ray

        job, spec = self.job, self.spec
        job.clear_state()
        for shard in spec.shards:
            if job.is_done(shard):
                self.progress.rows_done += shard.num_rows
        pending = job.pending()
        source = shards_of(job, {s.index for s in pending})
        queue: collections.deque[tuple[Shard, list[BatchRow], int]] = collections.deque()
        try:
            while self.num_engines < spec.concurrency[0]:
                self._add_engine()
            exhausted = not pending
            while True:
                if job.cancelled:
                    job.set_state(CANCELLED)
                    return self._finish()
                busy = [s for s in self.slots if s.running is not None]
                # Keep the queue one shard ahead of the free slots.
                while not exhausted and len(queue) < len(self.slots) - len(busy) + 1:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                    else:
                        queue.append((item[0], item[1], 1))
                if exhausted and not queue and not busy:
                    break
                if queue and len(busy) == len(self.slots) and self._room_for_another():
                    self._add_engine()
                for slot in self.slots:
                    if slot.running is None and queue:
                        self._submit(slot, *self._pick(queue, slot))
                refs = [s.running[0] for s in self.slots if s.running is not None]
                if not refs:
                    continue
                done, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s)
                for ref in done:
                    self._collect(ref, queue)
        except _JobFailed as e:
            job.set_state(FAILED, str(e))
            return self._finish()
        except BaseException as e:  # a bug or an interrupt: the job says so, and resume can go on
            job.set_state(FAILED, f"{type(e).__name__}: {_last_line(e)}")
            self._finish()
            raise
        self._finalize()
        job.set_state(COMPLETED)
        return self._finish()

    @staticmethod
    def _pick(queue: collections.deque, slot: _Slot) -> tuple[Shard, list[BatchRow], int]:
        """The next shard for `slot`: one whose rows start where the slot's last shard's did (its prefix
        cache holds them), else the oldest."""
        for i, (shard, rows, attempt) in enumerate(queue):
            if rows and slot.last_key and rows[0].cache_key() == slot.last_key:
                del queue[i]
                return shard, rows, attempt
        return queue.popleft()

    def _collect(self, ref: Any, queue: collections.deque) -> None:
        import ray

        slot = next(s for s in self.slots if s.running is not None and s.running[0] == ref)
        _, shard, rows, attempt, handle = slot.running
        slot.running = None
        try:
            results: list[RowResult] = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.ObjectLostError) as e:
            why = _last_line(e)
            logger.warning("batch %s: shard %d failed on attempt %d: %s", self.spec.job_id, shard.index, attempt, why)
            if attempt >= MAX_ATTEMPTS:
                raise _JobFailed(f"shard {shard.index} failed {attempt} times; last: {why}") from None
            self._replace(handle)
            self.progress.rows_retried += len(rows)
            queue.appendleft((shard, rows, attempt + 1))
            return
        self._write(shard, results)

    def _replace(self, dead: Any) -> None:
        """A fresh engine in place of one that died, for every slot it served (fleet lanes need none:
        Serve replaces its replicas; a second shard of the same dead engine finds it replaced)."""
        if self.spec.mode == "fleet" or not any(s.handle is dead for s in self.slots):
            return
        import ray

        try:
            ray.kill(dead, no_restart=True)
        except Exception:  # already gone
            pass
        fresh = self._new_engine()
        for other in self.slots:
            if other.handle is dead:
                other.handle, other.last_key = fresh, ""

    def _write(self, shard: Shard, results: list[RowResult]) -> None:
        counts = ShardCounts(rows=len(results), failed=sum(1 for r in results if r.error is not None))
        for r in results:
            counts.prompt_tokens += r.prompt_tokens
            counts.cached_tokens += r.cached_tokens
            counts.completion_tokens += r.completion_tokens
        if self.spec.output_format == "parquet":
            files = {"parquet": batch_io.parquet_shard(results)}
        else:
            out, errors = batch_io.openai_shard(results, self.spec.job_id)
            files = {"errors.jsonl": errors, "jsonl": out}
        if self.job.finish_shard(shard, files, counts):
            self.progress.rows_done += counts.rows
            self.progress.completion_tokens += counts.completion_tokens
            if self.on_progress is not None:
                self.on_progress(self.progress)

    def _finalize(self) -> None:
        """OpenAI output: the shards' lines joined into output.jsonl and errors.jsonl, in input order."""
        if self.spec.output_format != "openai":
            return
        for name, suffix in (("output.jsonl", "jsonl"), ("errors.jsonl", "errors.jsonl")):
            target = self.job.path / name
            tmp = target.with_name(f".{name}.tmp")
            with open(tmp, "wb") as out:
                for shard in self.spec.shards:
                    part = self.job.shard_file(shard, suffix)
                    if part.exists():
                        out.write(part.read_bytes())
            os.replace(tmp, target)

    def _finish(self) -> dict[str, Any]:
        import ray

        if self.spec.mode == "dedicated":
            for handle in {id(s.handle): s.handle for s in self.slots}.values():
                try:
                    ray.kill(handle, no_restart=True)
                except Exception:
                    pass
        self.slots.clear()
        return self.job.status()


class _JobFailed(Exception):
    pass


def _last_line(error: BaseException) -> str:
    """The line of a (remote) error that says what went wrong: its last non-empty one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


_fleet_task = None


def _fleet_shard():
    """`run_over_http` as a Ray task (made on first use: importing this module must not need Ray)."""
    global _fleet_task
    if _fleet_task is None:
        import ray

        from shardline.deployments.batch_worker import run_over_http

        _fleet_task = ray.remote(num_cpus=0, max_retries=0)(run_over_http)
    return _fleet_task


class BatchJob:
    """A submitted job, running on a thread of this process.

    Args:
        job: its directory.
    """

    def __init__(
        self, job: JobDir, on_progress: Optional[Callable[[Progress], None]] = None, api_key: Optional[str] = None
    ):
        self.job = job
        self.driver = Driver(job, on_progress, api_key=api_key)
        self._result: Optional[dict[str, Any]] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name=f"batch-{job.spec.job_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self.driver.run()
        except BaseException as e:  # surfaced by wait()
            self._error = e

    @property
    def id(self) -> str:
        return self.job.spec.job_id

    @property
    def progress(self) -> Progress:
        return self.driver.progress

    def status(self) -> dict[str, Any]:
        return self.job.status()

    def cancel(self) -> None:
        self.job.cancel()

    def wait(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """Block until the job ends; its final status (TimeoutError past `timeout`)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"batch {self.id} still running after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result
