"""A replica's cost model, and the measurement that calibrates it from the real engine.

The trace simulator needs to know how long one engine step takes. An engine
step (continuous batching) runs every request in decode one token and packs
new prompt tokens (chunked prefill) into the remaining token budget, so its
time is modelled as

    step_s = decode_step_s(b)                      b requests decoding (interpolated from measurements)
           + prefill_tokens / prefill_tokens_per_s  prompt tokens computed in this step
           + attention_s_per_token * extra_context  context beyond the measured reference length

with `prefill_overhead_s` standing in for `decode_step_s` when nothing decodes.
`calibrate()` measures every term on the real engine (`engine.LLM`); the
default calibration for SmolLM2-135M on this CPU lives in
`calibrations/smollm2-135m-cpu.json` and was written by
`python -m autoscaling.calibration --write`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

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


# ---- measurement ------------------------------------------------------------


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _run_to_completion(engine, step_times: list[float] | None = None) -> None:
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)


def _random_prompt(rng: random.Random, n: int, vocab: int) -> dict[str, list[int]]:
    # Distinct random tokens: no prefix-cache hits between requests.
    return {"prompt_token_ids": [rng.randrange(100, vocab) for _ in range(n)]}


def _time_prefill(engine, params, rng, num_prompts: int, prompt_len: int, repeats: int) -> float:
    """Fastest of `repeats` steps that each prefill num_prompts x prompt_len tokens.

    The minimum, not the median: on a shared CPU other work only ever adds time.
    """
    times = []
    for r in range(repeats):
        for i in range(num_prompts):
            engine.add_request(f"pf-{prompt_len}-{num_prompts}-{r}-{i}", _random_prompt(rng, prompt_len, engine.vocab_size), params)
        t0 = time.perf_counter()
        engine.step()  # budget >= num_prompts * prompt_len: one step prefills all and samples once
        times.append(time.perf_counter() - t0)
        _run_to_completion(engine)
    return min(times)


def _time_decode(engine, sampling_cls, rng, batch: int, context: int, steps: int) -> float:
    """Lower-quartile seconds of a pure decode step at `batch` sequences of about `context` tokens."""
    params = sampling_cls(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"dc-{batch}-{context}-{i}", _random_prompt(rng, context, engine.vocab_size), params)
    # The first steps prefill (chunked to the token budget); time only steps where all decode.
    times: list[float] = []
    prefill_steps = -(-batch * context // engine.scheduler.config.max_num_batched_tokens)
    for _ in range(prefill_steps):
        engine.step()
    _run_to_completion(engine, times)
    # Drop the last step (it finishes every request and frees blocks) and the first (warm-up).
    body = sorted(times[1:-1] or times)
    return body[len(body) // 4]


def calibrate(
    model: str = "smollm2-135m",
    *,
    dtype: str = "float32",
    batch_sizes: Sequence[int] = (1, 4, 16, 32),
    decode_context: int = 128,
    long_context: int = 640,
    decode_steps: int = 12,
    prefill_sizes: Sequence[tuple[int, int]] = ((1, 128), (2, 512)),
    repeats: int = 2,
    threads: int = 1,
    startup_overhead_s: float = SERVE_STARTUP_OVERHEAD_S,
    seed: int = 0,
) -> ReplicaCostModel:
    """Measure the real engine on `model` and return its cost model.

    Prefill: a step over n prompts of L random tokens each, at two sizes, fitted
    as overhead + tokens / rate. Decode: the median pure-decode step at each batch
    size with `decode_context`-token prompts, and once more with `long_context`
    tokens to get the attention cost per context token. `threads` torch threads:
    one, as when two replicas share this 2-core machine (the live 1 -> 2 test). Start-up: the time to
    build the engine plus `startup_overhead_s` for Ray and Serve (benchmarks/replica_startup.py
    measures the whole start-up on a live cluster instead).

    NOTE: the CPU may be shared; the load average before and after goes into
    `source` so that a reader can judge the numbers.
    """
    import torch

    from engine import LLM, SamplingParams
    from engine.pull import resolve_model

    folder = resolve_model(model)
    torch.set_num_threads(threads)
    load_before = _loadavg()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    llm = LLM(folder, dtype=dtype, enable_prefix_caching=False, seed=seed)
    load_s = time.perf_counter() - t0
    engine = llm.engine
    one = SamplingParams(temperature=0.0, max_tokens=1)

    _time_prefill(engine, one, rng, 1, 64, 1)  # warm-up
    (n1, l1), (n2, l2) = prefill_sizes
    t_small = _time_prefill(engine, one, rng, n1, l1, repeats)
    t_big = _time_prefill(engine, one, rng, n2, l2, repeats)
    tok_small, tok_big = n1 * l1, n2 * l2
    per_token = max((t_big - t_small) / (tok_big - tok_small), 1e-9)
    prefill_overhead = max(t_small - tok_small * per_token, 0.0)

    decode = [_time_decode(engine, SamplingParams, rng, b, decode_context, decode_steps) for b in batch_sizes]
    b_long = batch_sizes[min(1, len(batch_sizes) - 1)]
    t_long = _time_decode(engine, SamplingParams, rng, b_long, long_context, decode_steps)
    t_ref = decode[list(batch_sizes).index(b_long)]
    attn = max((t_long - t_ref) / (b_long * (long_context - decode_context)), 0.0)

    kv = engine.scheduler.kv
    return ReplicaCostModel(
        prefill_tokens_per_s=round(1.0 / per_token, 1),
        prefill_overhead_s=round(prefill_overhead, 5),
        decode_batch_sizes=tuple(batch_sizes),
        decode_step_s=tuple(round(t, 5) for t in decode),
        decode_context_tokens=decode_context,
        attention_s_per_token=float(f"{attn:.3g}"),
        max_batch_size=engine.scheduler.config.max_num_seqs,
        max_batched_tokens=engine.scheduler.config.max_num_batched_tokens,
        kv_capacity_tokens=kv.num_blocks * kv.block_size,
        block_size=kv.block_size,
        startup_s=round(load_s + startup_overhead_s, 2),
        source={
            "model": model,
            "dtype": dtype,
            "engine_load_s": round(load_s, 2),
            "startup_overhead_s": startup_overhead_s,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": _loadavg(),
            "prefill_step_s": {f"{n1}x{l1}": round(t_small, 5), f"{n2}x{l2}": round(t_big, 5)},
            "long_context_decode": {"batch": b_long, "context": long_context, "step_s": round(t_long, 5)},
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Measure the engine and print (or write) a replica cost model.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", nargs="?", const=str(DEFAULT_CALIBRATION), default=None, help="write the JSON here")
    args = p.parse_args(argv)
    cost = calibrate(args.model, dtype=args.dtype, threads=args.threads)
    text = json.dumps(cost.to_dict(), indent=2) + "\n"
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
