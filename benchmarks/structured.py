"""Structured outputs: decode speed with a JSON schema against the same decode without one.

    .venv/bin/python benchmarks/structured.py [--repeats 3] [--batches 1 32] [--dtype bf16]

SmolLM2-135M-Instruct, in process (shardline.LLM), asked for a JSON document for
each schema of tests/structured_schemas.py at temperature 1. A constrained run
generates under the schema (the grammar mask filled beside the forward pass,
applied in the sampler); its unconstrained twin then generates exactly as many
tokens per request (max_tokens = that count, ignore_eos), so both runs have
the same batch shape step by step and the ratio is the cost of the constraint
alone. Runs alternate; medians of `--repeats`. Also: the grammar compile time
per schema (cold, then cached), and the constrained runs with the mask filled
before the forward pass instead of beside it. The last line is one JSON object;
`ratio_b{N}` is constrained over unconstrained output tokens/s at batch N
(the target is at least 0.9).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: never shadows an installed package

from benchmarks.models import DTYPE_NAMES, model_folder  # noqa: E402
from tests.structured_schemas import SCHEMAS  # noqa: E402


def conversations(schemas):
    return [[{"role": "user", "content": f"Write a JSON document for this JSON schema: {json.dumps(s)}"}] for s in schemas]


def timed_chat(llm, convs, params) -> tuple[float, list[int]]:
    started = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    return time.perf_counter() - started, [len(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args(argv)

    from shardline import LLM, SamplingParams, StructuredOutputsParams

    folder = model_folder("smollm2-135m", args.dtype)
    # No prefix caching: each run computes its prompts, not only the first one of a repeated set.
    llm = LLM(str(folder), dtype=DTYPE_NAMES[args.dtype], max_num_seqs=max(args.batches), enable_prefix_caching=False)
    compiler = llm.engine.grammar_compiler
    specs = [StructuredOutputsParams(json=s) for s in SCHEMAS]
    cold, warm = [], []
    for spec in specs:
        started = time.perf_counter()
        compiler.compile(spec)
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        compiler.compile(spec)
        warm.append(time.perf_counter() - started)

    result: dict = {
        "bench": "structured", "model": "smollm2-135m", "dtype": args.dtype, "schemas": len(specs),
        "compile_ms_p50": round(statistics.median(cold) * 1e3, 3),
        "compile_ms_p99": round(sorted(cold)[int(0.99 * (len(cold) - 1))] * 1e3, 3),
        "cached_compile_us_p50": round(statistics.median(warm) * 1e6, 1),
        "cache": compiler.stats(),
    }
    llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    for batch in args.batches:
        schemas = (SCHEMAS * (batch // len(SCHEMAS) + 1))[:batch]
        convs = conversations(schemas)
        rates: dict[str, list[float]] = {"constrained": [], "unconstrained": [], "constrained_serial_mask": []}
        for r in range(args.repeats):
            seeds = [1000 * r + i for i in range(batch)]
            constrained = [SamplingParams(temperature=1.0, seed=s, max_tokens=args.max_tokens,
                                          structured_outputs=StructuredOutputsParams(json=schema))
                           for s, schema in zip(seeds, schemas)]
            llm.engine.runner.overlap_grammar = True
            took, counts = timed_chat(llm, convs, constrained)
            rates["constrained"].append(sum(counts) / took)
            free = [SamplingParams(temperature=1.0, seed=s, max_tokens=n, ignore_eos=True) for s, n in zip(seeds, counts)]
            took_free, free_counts = timed_chat(llm, convs, free)
            assert free_counts == counts
            rates["unconstrained"].append(sum(counts) / took_free)
            llm.engine.runner.overlap_grammar = False
            took_serial, serial_counts = timed_chat(llm, convs, constrained)
            rates["constrained_serial_mask"].append(sum(serial_counts) / took_serial)
            llm.engine.runner.overlap_grammar = True
        med = {k: statistics.median(v) for k, v in rates.items()}
        result[f"b{batch}"] = {k: round(v, 1) for k, v in med.items()}
        result[f"ratio_b{batch}"] = round(med["constrained"] / med["unconstrained"], 3)
        result[f"serial_mask_ratio_b{batch}"] = round(med["constrained_serial_mask"] / med["unconstrained"], 3)
        print(
            f"batch {batch:3d}: constrained {med['constrained']:7.1f} tok/s, unconstrained {med['unconstrained']:7.1f}, "
            f"ratio {result[f'ratio_b{batch}']:.3f} (mask before the forward pass: {result[f'serial_mask_ratio_b{batch}']:.3f})",
            file=sys.stderr,
        )
    llm.shutdown()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
