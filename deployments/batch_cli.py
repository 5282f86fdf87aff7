"""`shardline batch submit | status | cancel | resume`: batch jobs from the shell.

    shardline batch submit rows.parquet --output runs/job1 [--model M] [--dedicated | --fleet]
                           [--concurrency MIN,MAX] [--shard-rows N] [--max-tokens N] [--temperature T]
                           [--output-format parquet|openai] [--address auto] [--base-url URL]
    shardline batch status runs/job1 [--json]
    shardline batch cancel runs/job1
    shardline batch resume runs/job1

`submit` and `resume` run the job in the foreground with a progress bar (rows,
tokens/s, ETA); Ctrl-C stops the driver and leaves a job `resume` finishes. A
fleet job's API key comes from SHARDLINE_API_KEY (never a flag: it would show in
the process list), and is not written to the job folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _concurrency(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[1]


def register(sub: argparse._SubParsersAction) -> None:
    batch = sub.add_parser("batch", help="run a file of requests as a batch job (Ray tasks)",
                           description="Batch jobs: OpenAI batch JSONL or a Parquet/JSONL/CSV table in, results out.")
    verbs = batch.add_subparsers(dest="batch_command", required=True, metavar="VERB")

    p = verbs.add_parser("submit", help="start a job and follow it", description="Check the input, start the job, show progress.")
    p.add_argument("input", help="OpenAI batch JSONL, or a table (.parquet, .jsonl, .csv) with a prompt or messages column")
    p.add_argument("--output", required=True, help="the job's folder: results/ (Parquet) or output.jsonl + errors.jsonl")
    p.add_argument("--model", default="smollm2-135m", help="model folder or pulled alias (fleet: the served name)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dedicated", dest="mode", action="store_const", const="dedicated",
                      help="engine actors of the job's own (default)")
    mode.add_argument("--fleet", dest="mode", action="store_const", const="fleet",
                      help="through the served app, at batch priority (fills idle capacity)")
    p.set_defaults(mode="dedicated")
    p.add_argument("--concurrency", type=_concurrency, default=(1, 1), metavar="MIN,MAX",
                   help="engine actors (fleet: shards in flight); more start as CPUs free up (default 1)")
    p.add_argument("--shard-rows", type=int, default=256, help="rows per shard: written, retried and resumed whole")
    p.add_argument("--output-format", choices=["parquet", "openai"], help="default: as the input")
    p.add_argument("--max-tokens", type=int, help="default max_tokens of rows that do not set it")
    p.add_argument("--temperature", type=float, help="default temperature of rows that do not set it")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="dedicated engines' dtype")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per dedicated engine actor (its torch threads)")
    p.add_argument("--address", help="Ray cluster to use (auto: the one running here); default: start one (dedicated) "
                   "or join the local one (fleet)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="the served app's OpenAI base URL (fleet)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_submit)

    for verb, helptext in (("status", "show a job's progress and counts"), ("cancel", "stop a running job"),
                           ("resume", "finish a job whose driver stopped")):
        p = verbs.add_parser(verb, help=helptext, description=helptext[0].upper() + helptext[1:] + ".")
        p.add_argument("job", help="the job's folder (--output of submit)")
        if verb == "status":
            p.add_argument("--json", action="store_true", help="print one JSON object")
        if verb == "resume":
            p.add_argument("--address", help="Ray cluster to use (as submit)")
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        p.set_defaults(func={"status": _cmd_status, "cancel": _cmd_cancel, "resume": _cmd_resume}[verb])


def _follow(job, quiet: bool) -> int:
    """Wait for a job with a progress bar; exit status 0 completed, 1 failed or cancelled."""
    from tqdm import tqdm

    bar = tqdm(total=job.progress.rows_total, initial=job.progress.rows_done, unit="row", desc=job.id,
               disable=quiet, dynamic_ncols=True)
    shown = job.progress.rows_done
    try:
        while True:
            try:
                status = job.wait(timeout=0.5)
                break
            except TimeoutError:
                pass
            done = job.progress.rows_done
            if done != shown:
                bar.update(done - shown)
                shown = done
                bar.set_postfix(tok_s=f"{job.progress.tokens_per_s:.1f}")
        bar.update(job.progress.rows_done - shown)
    except KeyboardInterrupt:
        bar.close()
        print(f"shardline batch: stopped; `shardline batch resume {job.job.path}` finishes it", file=sys.stderr)
        return 130
    bar.close()
    print(_render(status))
    return 0 if status["status"] == "completed" else 1


def _render(status: dict[str, Any]) -> str:
    counts, usage = status["request_counts"], status["usage"]
    line = (
        f"{status['id']}: {status['status']}, {counts['completed']} of {counts['total']} rows answered, "
        f"{counts['failed']} failed; shards {status['shards']['done']}/{status['shards']['total']}; tokens: "
        f"{usage['prompt_tokens']} prompt ({usage['cached_share']:.0%} cached), {usage['completion_tokens']} completion"
    )
    return line + (f"\n  error: {status['error']}" if status.get("error") else "")


def _cmd_submit(args: argparse.Namespace) -> int:
    from shardline import batch

    defaults = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature)) if v is not None}
    engine: dict[str, Any] = {"num_cpus": args.num_cpus}
    if args.dtype:
        engine["dtype"] = args.dtype
    job = batch.submit(
        args.input, args.output, model=args.model, mode=args.mode, concurrency=args.concurrency,
        shard_rows=args.shard_rows, output_format=args.output_format, defaults=defaults, engine=engine,
        address=args.address, base_url=args.base_url, api_key=os.environ.get("SHARDLINE_API_KEY"),
    )
    return _follow(job, args.quiet)


def _cmd_resume(args: argparse.Namespace) -> int:
    from shardline import batch

    return _follow(batch.resume(args.job, address=args.address, api_key=os.environ.get("SHARDLINE_API_KEY")), args.quiet)


def _cmd_status(args: argparse.Namespace) -> int:
    from shardline import batch

    status = batch.status(args.job)
    print(json.dumps(status) if args.json else _render(status))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from shardline import batch

    batch.cancel(args.job)
    print(f"shardline batch: {args.job} will stop at its driver's next look")
    return 0
