"""A batch job's bookkeeping: its spec, its shards, what is done, and what it says about itself.

Plain Python and files, no Ray: the driver (deployments/batch.py) does the work,
this decides what work is left. A job is a directory:

    job.json                       the spec (input, output, model, mode, shard size, defaults)
    results/shard-00012.parquet    one output per finished shard (or .jsonl, with .errors.jsonl
                                   beside it), written whole then renamed into place, last of the
                                   shard's files; `results/` reads as one Parquet dataset
    counts/shard-00012.json        that shard's counts (rows, errors, tokens)
    cancelled                      present once someone cancelled the job
    state.json                     how the driver ended (completed, cancelled, failed and why)

A shard is done exactly when its output file exists. The rename is atomic, so a
reader (and a resumed driver) sees whole shards or none: a driver that dies
mid-shard leaves nothing of it, and the shard runs again; a finished shard never
runs twice. Every input row is in exactly one shard, so every row lands once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

INPUT_FORMATS = ("openai", "table")
OUTPUT_FORMATS = ("parquet", "openai")
MODES = ("dedicated", "fleet")
# The OpenAI Batch API's states, as `status` reports them.
VALIDATING, IN_PROGRESS, FINALIZING, COMPLETED, FAILED, CANCELLING, CANCELLED = (
    "validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled",
)


def new_job_id() -> str:
    return f"batch_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Shard:
    """Rows [start, end) of the input."""

    index: int
    start: int
    end: int

    @property
    def num_rows(self) -> int:
        return self.end - self.start


def plan_shards(num_rows: int, shard_rows: int) -> list[Shard]:
    """Consecutive shards of `shard_rows` rows (the last one shorter) covering every row once."""
    if shard_rows < 1:
        raise ValueError(f"shard size must be at least 1 row, got {shard_rows}")
    return [Shard(i, start, min(start + shard_rows, num_rows)) for i, start in enumerate(range(0, num_rows, shard_rows))]


@dataclass
class JobSpec:
    """What a job runs. Saved as job.json; everything a resumed driver needs.

    Args:
        job_id: the job's name.
        input_path: the input file (OpenAI batch JSONL, or a Parquet, JSONL or CSV table).
        input_format: "openai" (lines {custom_id, method, url, body}) or "table" (a prompt or messages column).
        output_format: "parquet" (one row per input row) or "openai" (output and error JSONL).
        model: the served or loadable model the rows run on.
        mode: "dedicated" (engine actors of the job's own) or "fleet" (the live app, at batch priority).
        num_rows: rows in the input.
        shard_rows: rows per shard (the unit that is retried, written and resumed).
        concurrency: (min, max) engine actors in dedicated mode (fleet: shards in flight).
        endpoint: for an OpenAI input, the one endpoint every line must name.
        defaults: sampling defaults for rows that do not say (max_tokens, temperature, ...).
        engine: engine settings for dedicated actors (dtype, max_num_seqs, ...).
        base_url: the served app's OpenAI base URL a fleet job sends its rows to.
        created_at: Unix time.
    """

    job_id: str
    input_path: str
    input_format: str
    output_format: str
    model: str
    mode: str = "dedicated"
    num_rows: int = 0
    shard_rows: int = 256
    concurrency: tuple[int, int] = (1, 1)
    endpoint: Optional[str] = None
    defaults: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    base_url: str = "http://127.0.0.1:8000/v1"
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(f"input format must be one of {INPUT_FORMATS}, got {self.input_format!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        low, high = self.concurrency = tuple(int(c) for c in self.concurrency)
        if not 1 <= low <= high:
            raise ValueError(f"concurrency must be MIN,MAX with 1 <= MIN <= MAX, got {low},{high}")
        if self.shard_rows < 1:
            raise ValueError(f"shard_rows must be >= 1, got {self.shard_rows}")

    @property
    def shards(self) -> list[Shard]:
        return plan_shards(self.num_rows, self.shard_rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        data = json.loads(text)
        data["concurrency"] = tuple(data.get("concurrency", (1, 1)))
        return cls(**data)


@dataclass
class ShardCounts:
    """What one finished shard holds."""

    rows: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def add(self, other: ShardCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all (a temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class JobDir:
    """A job's directory: its spec, its finished shards, its cancel flag.

    Args:
        path: the directory (created by `create`).
        output_suffix: file suffix of a shard's output ("parquet" or "jsonl"), from the spec.
    """

    SPEC = "job.json"
    CANCELLED = "cancelled"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        spec_file = self.path / self.SPEC
        if not spec_file.is_file():
            raise FileNotFoundError(f"no batch job at {self.path} (no {self.SPEC})")
        self.spec = JobSpec.from_json(spec_file.read_text())

    @classmethod
    def create(cls, path: str | Path, spec: JobSpec) -> JobDir:
        """A new job directory for `spec` (FileExistsError if one is there with another spec)."""
        path = Path(path)
        spec_file = path / cls.SPEC
        if spec_file.exists():
            existing = JobSpec.from_json(spec_file.read_text())
            if existing.input_path != spec.input_path or existing.num_rows != spec.num_rows:
                raise FileExistsError(f"{path} holds another job ({existing.job_id}); resume it or pick another folder")
            return cls(path)
        write_atomic(spec_file, spec.to_json().encode())
        return cls(path)

    @property
    def results(self) -> Path:
        return self.path / "results"

    @property
    def output_suffix(self) -> str:
        return "parquet" if self.spec.output_format == "parquet" else "jsonl"

    def shard_output(self, shard: Shard) -> Path:
        return self.shard_file(shard, self.output_suffix)

    def shard_counts_file(self, shard: Shard) -> Path:
        return self.path / "counts" / f"shard-{shard.index:05d}.json"

    def is_done(self, shard: Shard) -> bool:
        return self.shard_output(shard).exists()

    def pending(self) -> list[Shard]:
        """Shards without output, in order."""
        return [s for s in self.spec.shards if not self.is_done(s)]

    def shard_file(self, shard: Shard, suffix: str) -> Path:
        return self.results / f"shard-{shard.index:05d}.{suffix}"

    def finish_shard(self, shard: Shard, files: dict[str, bytes], counts: ShardCounts) -> bool:
        """Record a shard: its counts and side files, then its output (`files[output_suffix]`, the
        rename that makes it done). False, and nothing written, when it was already done."""
        if self.is_done(shard):
            return False
        write_atomic(self.shard_counts_file(shard), json.dumps(asdict(counts)).encode())
        for suffix, data in files.items():
            if suffix != self.output_suffix:
                write_atomic(self.shard_file(shard, suffix), data)
        write_atomic(self.shard_output(shard), files[self.output_suffix])
        return True

    def counts(self) -> ShardCounts:
        """The finished shards' counts, summed."""
        total = ShardCounts()
        for shard in self.spec.shards:
            if self.is_done(shard):
                total.add(ShardCounts(**json.loads(self.shard_counts_file(shard).read_text())))
        return total

    def cancel(self) -> None:
        write_atomic(self.path / self.CANCELLED, b"")

    @property
    def cancelled(self) -> bool:
        return (self.path / self.CANCELLED).exists()

    STATE = "state.json"

    def set_state(self, status: str, error: Optional[str] = None) -> None:
        """How the driver ended: COMPLETED, CANCELLED or FAILED (with why)."""
        write_atomic(self.path / self.STATE, json.dumps({"status": status, "error": error, "at": time.time()}).encode())

    def clear_state(self) -> None:
        """A resumed job is running again."""
        (self.path / self.STATE).unlink(missing_ok=True)

    def ended(self) -> Optional[dict[str, Any]]:
        state = self.path / self.STATE
        return json.loads(state.read_text()) if state.exists() else None

    def status(self) -> dict[str, Any]:
        """Where the job is, as `shardline batch status` and GET /v1/batches/{id} report it."""
        shards = self.spec.shards
        done = sum(1 for s in shards if self.is_done(s))
        counts = self.counts()
        ended = self.ended()
        if ended is not None:
            state = ended["status"]
        elif self.cancelled:
            state = CANCELLING
        else:
            state = IN_PROGRESS if done < len(shards) else FINALIZING
        return {
            "id": self.spec.job_id,
            "status": state,
            "shards": {"done": done, "total": len(shards)},
            "request_counts": {"total": self.spec.num_rows, "completed": counts.rows - counts.failed, "failed": counts.failed},
            "usage": {
                "prompt_tokens": counts.prompt_tokens,
                "cached_tokens": counts.cached_tokens,
                "completion_tokens": counts.completion_tokens,
                "cached_share": round(counts.cached_tokens / counts.prompt_tokens, 4) if counts.prompt_tokens else 0.0,
            },
            "error": ended.get("error") if ended else None,
        }
