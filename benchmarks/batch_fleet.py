"""Fleet batch jobs beside interactive traffic: what a batch costs the interactive requests, and what it gets.

    .venv/bin/python benchmarks/batch_fleet.py [--rate 2] [--duration 60] [--batch-rows 4000]

One `shardline serve` (SmolLM2-135M bf16) in a loopback-only network namespace.
Interactive load: streamed chat completions arriving as a Poisson process at
`--rate` per second (64-token prompts of random words, 32 tokens out), measured
client side (time to first token, end to end). Two phases on the same server and
the same arrival schedule: the interactive load alone, then the same load while a
fleet batch job (`shardline.batch.submit(..., mode="fleet")`) sends its rows at
batch priority. The last line is one JSON object; `ttft_p99_ratio` (with the batch
over without) should be at most 1.2, and `batch_tok_s` is what the batch got.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parent))  # last: never shadows an installed package

from benchmarks.peers import ensure_netns  # noqa: E402

WORDS = "the quarterly report shows revenue growth across regions while costs fell slightly".split()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prompt(rng: random.Random, words: int = 48) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def interactive(base: str, rate: float, duration: float, seed: int) -> list[dict]:
    import httpx

    rng = random.Random(seed)
    arrivals, t = [], 0.0
    while t < duration:
        t += rng.expovariate(rate)
        arrivals.append((t, prompt(rng)))
    results: list[dict] = []

    async def one(client: httpx.AsyncClient, at: float, text: str, start: float) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        first = None
        body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": text}], "max_tokens": 32,
                "temperature": 0, "stream": True}
        async with client.stream("POST", f"{base}/chat/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: ") and first is None and '"content":"' in line and '"content":""' not in line:
                    first = time.perf_counter()
        done = time.perf_counter()
        results.append({"ttft": (first or done) - sent, "e2e": done - sent, "status": reply.status_code})

    async with httpx.AsyncClient(timeout=300) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, at, text, start) for at, text in arrivals))
    return results


def summary(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["ttft"] * 1e3 for r in ok]
    return {"requests": len(results), "ok": len(ok), "ttft_ms_p50": round(statistics.median(ttft), 1),
            "ttft_ms_p99": round(percentile(ttft, 0.99), 1), "e2e_ms_p50": round(statistics.median(r["e2e"] * 1e3 for r in ok), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--batch-rows", type=int, default=4000)
    p.add_argument("--port", type=int, default=8731)
    args = p.parse_args(argv)
    ensure_netns(sys.argv if argv is None else [sys.argv[0], *argv])
    ray_tmp = tempfile.mkdtemp(prefix="sl-bf-", dir="/tmp")
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    cli = str(Path(sys.executable).parent / "shardline")
    server = subprocess.Popen([cli, "serve", "--dtype", "bfloat16", "--port", str(args.port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready = threading.Event()
    threading.Thread(target=lambda: [ready.set() for line in server.stdout if line.startswith("  status:")], daemon=True).start()
    base = f"http://127.0.0.1:{args.port}/v1"
    try:
        if not ready.wait(300):
            raise SystemExit("batch_fleet: the server did not come up")
        asyncio.run(interactive(base, args.rate, 5, seed=99))  # warm-up
        alone = summary(asyncio.run(interactive(base, args.rate, args.duration, seed=1)))
        print(f"  alone:      {alone}", file=sys.stderr)

        import pyarrow as pa
        import pyarrow.parquet as pq

        from shardline import batch

        work = Path(tempfile.mkdtemp(prefix="batch-fleet-"))
        rng = random.Random(7)
        pq.write_table(pa.Table.from_pylist([{"prompt": prompt(rng, 96)} for _ in range(args.batch_rows)]), work / "in.parquet")
        os.environ["RAY_TMPDIR"] = ray_tmp  # join the server's cluster
        job = batch.submit(work / "in.parquet", work / "job", model="smollm2-135m", mode="fleet", base_url=base,
                           shard_rows=64, concurrency=(2, 2), defaults={"max_tokens": 32, "temperature": 0},
                           address="auto")
        time.sleep(10)  # the batch fills the server first
        tokens_before = job.progress.completion_tokens
        started = time.perf_counter()
        beside = summary(asyncio.run(interactive(base, args.rate, args.duration, seed=1)))
        batch_tok_s = (job.progress.completion_tokens - tokens_before) / (time.perf_counter() - started)
        job.cancel()
        job.wait(600)
        print(f"  with batch: {beside}; batch {batch_tok_s:.1f} output tok/s", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(120)
    result = {"bench": "batch_fleet", "rate": args.rate, "duration_s": args.duration, "alone": alone, "with_batch": beside,
              "batch_tok_s": round(batch_tok_s, 1),
              "ttft_p99_ratio": round(beside["ttft_ms_p99"] / alone["ttft_ms_p99"], 3),
              "ttft_p50_ratio": round(beside["ttft_ms_p50"] / alone["ttft_ms_p50"], 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
