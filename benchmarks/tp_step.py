"""Per-step time of tensor parallelism on this machine, split into compute, all-reduce and dispatch.

TP=1 (all cores) against TP=2 and more (local worker processes, cores split
between ranks) on the same model and prompts, decode steps only, at several
batch sizes. Rank 0's step time is split into:
  dispatch   packing and broadcasting the step's inputs to the workers,
  all-reduce time inside collectives (including waiting for the slowest rank),
  compute    the rest.

    python benchmarks/tp_step.py [--model DIR] [--dtype bfloat16] [--batches 1,32] [--tp 2]

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: never shadows an installed package

import torch  # noqa: E402

from shardline.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from shardline.engine.distributed import LocalProcessLauncher  # noqa: E402


def model_88m(folder: Path) -> Path:
    """The Engine speed issue's random 88M Llama (hidden 768, 12 layers, 12 heads, 4 KV heads)."""
    if not (folder / "config.json").exists():
        from tests.models import make_model

        make_model(
            folder, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048,
            vocab_size=8192, with_tokenizer=False, weight_scale=0.02, max_position_embeddings=2048,
        )
    return folder


def measure(folder: str, dtype: str, tp: int, batch: int, prompt_len: int, new_tokens: int) -> dict:
    launcher = LocalProcessLauncher() if tp > 1 else None
    engine = LLMEngine(
        EngineConfig(model=folder, dtype=dtype, max_model_len=prompt_len + new_tokens + 8, max_num_seqs=batch,
                     num_kv_blocks=batch * ((prompt_len + new_tokens) // 16 + 2), tensor_parallel_size=tp),
        launcher=launcher,
    )
    try:
        g = torch.Generator().manual_seed(0)
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        group = engine.tp_group
        for i in range(batch):
            ids = torch.randint(0, engine.vocab_size, (prompt_len,), generator=g).tolist()
            engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
        # prefill (and the first decode steps) warm up; then time pure decode steps
        while any(r.num_output_tokens < 2 for r in engine.scheduler.requests.values()):
            engine.step()
        if group is not None:
            group.ctx.comm_seconds, group.broadcaster.send_seconds = 0.0, 0.0
        steps = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        steps = steps[:-1]  # the last step only finishes requests
        total = sum(steps)
        comm = group.ctx.comm_seconds if group else 0.0
        dispatch = group.broadcaster.send_seconds if group else 0.0
        n = len(steps)
        return {
            "tp": tp, "batch": batch, "steps": n,
            "step_ms": 1e3 * total / n, "step_ms_median": 1e3 * statistics.median(steps),
            "compute_ms": 1e3 * (total - comm - dispatch) / n, "allreduce_ms": 1e3 * comm / n,
            "dispatch_ms": 1e3 * dispatch / n, "overhead_share": (comm + dispatch) / total,
            "tok_s": batch * n / total,
        }
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the random 88M Llama, built on first use)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--tp", default="2", help="tensor-parallel sizes to compare with TP=1, comma-separated")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    args = ap.parse_args()
    folder = args.model or str(model_88m(Path(os.environ.get("SHARDLINE_BENCH_DIR", ".bench")) / "llama-88m"))
    results = []
    load_start = os.getloadavg()
    for batch in [int(b) for b in args.batches.split(",")]:
        for tp in [1] + [int(t) for t in args.tp.split(",")]:
            print(f"TP={tp} batch={batch} ...", file=sys.stderr, flush=True)
            r = measure(folder, args.dtype, tp, batch, args.prompt_len, args.new_tokens)
            results.append(r)
            print(
                f"  TP={tp} batch={batch}: {r['step_ms']:.1f} ms/step ({r['tok_s']:.0f} tok/s): compute "
                f"{r['compute_ms']:.1f}, all-reduce {r['allreduce_ms']:.2f}, dispatch {r['dispatch_ms']:.2f} ms "
                f"({100 * r['overhead_share']:.1f}% of the step)",
                file=sys.stderr, flush=True,
            )
    summary = {"benchmark": "tp_step", "model": folder, "dtype": args.dtype, "results": results,
               "loadavg_start": load_start, "loadavg_end": os.getloadavg()}
    for batch in {r["batch"] for r in results}:
        base = next(r for r in results if r["batch"] == batch and r["tp"] == 1)
        for r in results:
            if r["batch"] == batch and r["tp"] > 1:
                summary[f"tp{r['tp']}_vs_tp1_batch{batch}"] = base["step_ms"] / r["step_ms"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
