"""Measure a replica's cost model on the real engine (what the trace simulator charges per step).

    .venv/bin/python benchmarks/replica_cost.py [--model smollm2-135m] [--dtype float32] [--threads 1] [--write [FILE]]

Prints the calibration JSON that shardline.autoscaling.calibration reads (the terms are
described there); `--write` replaces the shipped default
(autoscaling/calibrations/smollm2-135m-cpu.json). benchmarks/replica_startup.py measures
`startup_s` on a live cluster instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Sequence

from shardline.autoscaling.calibration import DEFAULT_CALIBRATION, SERVE_STARTUP_OVERHEAD_S, ReplicaCostModel


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

    from shardline.engine import LLM, SamplingParams
    from shardline.engine.pull import resolve_model

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
