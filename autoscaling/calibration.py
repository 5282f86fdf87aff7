"""A replica's cost model, and the measurement that calibrates it from the real engine.

The trace simulator needs to know how long one engine step takes. An engine
step (continuous batching) runs every request in decode one token and packs
new prompt tokens (chunked prefill) into the remaining token budget, so its
time is modelled as

    step_s = decode_step_s(b)                      b requests decoding (interpolated from measurements)
           + prefill_tokens / prefill_tokens_per_s  prompt tokens computed in this step
           + attention_s_per_token * extra_context  context beyond the measured reference length

with `prefill_overhead_s` standing in for `decode_step_s` when nothing decodes.
benchmarks/replica_cost.py measures every term on the real engine; the
default calibration for SmolLM2-135M on this CPU lives in
`calibrations/smollm2-135m-cpu.json` and was written by
`python benchmarks/replica_cost.py --write`. This module only reads it: the
autoscaling layer never loads a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CALIBRATION = Path(__file__).parent / "calibrations" / "smollm2-135m-cpu.json"

# Added to the measured engine load time to get a replica's start-up time: Ray
# schedules the replica actor, the worker imports torch and the engine, and Serve
# health-checks it before routing to it. Measured: a SmolLM2 replica started in
# 6.81 s (median of 3 live scale-ups, benchmarks/replica_startup.py, load average
# ~5) of which its engine load took 2.4-2.8 s in-process at similar load. It grows
# with CPU contention; benchmarks/replica_startup.py --write measures `startup_s`
# as a whole and is what the shipped calibration uses.
SERVE_STARTUP_OVERHEAD_S = 4.2


@dataclass(frozen=True, slots=True)
class ReplicaCostModel:
    """How fast one replica runs, as the simulator sees it.

    Args:
        prefill_tokens_per_s: prompt tokens computed per second inside a step.
        prefill_overhead_s: fixed cost of a step that only prefills.
        decode_batch_sizes: batch sizes at which a decode step was timed (ascending).
        decode_step_s: seconds per decode step at each of those batch sizes.
        decode_context_tokens: context length per sequence during the decode timing.
        attention_s_per_token: extra step time per context token beyond that reference.
        max_batch_size: the engine's max_num_seqs.
        max_batched_tokens: the engine's token budget per step (chunked prefill).
        kv_capacity_tokens: KV cache size in tokens (blocks * block_size).
        block_size: tokens per KV block.
        startup_s: from "start a replica" to "it takes requests".
        source: where the numbers came from (model, machine, load average, date).
    """

    prefill_tokens_per_s: float
    prefill_overhead_s: float
    decode_batch_sizes: tuple[int, ...]
    decode_step_s: tuple[float, ...]
    decode_context_tokens: int
    attention_s_per_token: float
    max_batch_size: int
    max_batched_tokens: int
    kv_capacity_tokens: int
    block_size: int
    startup_s: float
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prefill_tokens_per_s <= 0 or self.prefill_overhead_s < 0:
            raise ValueError("prefill_tokens_per_s must be > 0 and prefill_overhead_s >= 0")
        if len(self.decode_batch_sizes) != len(self.decode_step_s) or not self.decode_batch_sizes:
            raise ValueError("decode_batch_sizes and decode_step_s must be non-empty and the same length")
        if list(self.decode_batch_sizes) != sorted(set(self.decode_batch_sizes)) or self.decode_batch_sizes[0] < 1:
            raise ValueError(f"decode_batch_sizes must be ascending positive ints, got {self.decode_batch_sizes}")
        if any(s <= 0 for s in self.decode_step_s):
            raise ValueError("decode_step_s must all be > 0")
        if self.max_batch_size < 1 or self.max_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("max_batch_size, max_batched_tokens and block_size must be >= 1")
        if self.kv_capacity_tokens < self.block_size or self.startup_s < 0 or self.attention_s_per_token < 0:
            raise ValueError("kv_capacity_tokens must hold a block; startup_s and attention_s_per_token >= 0")

    def decode_time(self, batch: int) -> float:
        """Seconds of one decode step at `batch` sequences: piecewise-linear in the measurements."""
        xs, ys = self.decode_batch_sizes, self.decode_step_s
        if batch <= xs[0] or len(xs) == 1:
            # Below the smallest measurement: scale toward it, never below half of it.
            return ys[0] if len(xs) == 1 else max(ys[0] * 0.5, ys[0] + (batch - xs[0]) * (ys[1] - ys[0]) / (xs[1] - xs[0]))
        for i in range(1, len(xs)):
            if batch <= xs[i]:
                return ys[i - 1] + (batch - xs[i - 1]) * (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
        # Beyond the largest: extrapolate the last segment's slope.
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return ys[-1] + (batch - xs[-1]) * max(slope, 0.0)

    def step_time(self, decode_batch: int, prefill_tokens: int, context_tokens: int) -> float:
        """Seconds of one engine step.

        Args:
            decode_batch: requests generating one token this step.
            prefill_tokens: prompt tokens computed this step.
            context_tokens: the decoding requests' context lengths, summed.
        """
        base = self.decode_time(decode_batch) if decode_batch else self.prefill_overhead_s
        extra_ctx = max(0, context_tokens - decode_batch * self.decode_context_tokens)
        return base + prefill_tokens / self.prefill_tokens_per_s + self.attention_s_per_token * extra_ctx

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decode_batch_sizes"] = list(self.decode_batch_sizes)
        d["decode_step_s"] = list(self.decode_step_s)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReplicaCostModel":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown calibration fields {sorted(unknown)}; expected {sorted(known)}")
        try:
            d = dict(d, decode_batch_sizes=tuple(d["decode_batch_sizes"]), decode_step_s=tuple(d["decode_step_s"]))
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad calibration: {e}") from None


def load_calibration(path: str | Path | None = None) -> ReplicaCostModel:
    """Read a calibration JSON (default: SmolLM2-135M on this CPU)."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    if not path.is_file():
        raise ValueError(f"calibration file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"calibration file {path} is not JSON: {e}") from None
    return ReplicaCostModel.from_dict(data)
