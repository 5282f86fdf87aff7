"""The `shardline` command line.

    shardline pull smollm2-135m            fetch a model into ~/.cache/shardline/models
    shardline generate --model M "prompt"  run prompts offline through the engine
    shardline serve | status               the served app (shardline.deployments.cli)
    shardline capacity                     replicas for a load (shardline.autoscaling.cli)
    shardline batch submit | status | ...  batch jobs (shardline.deployments.batch_cli)

It sits above every layer: the one module that gathers the commands of all of them.

Every failure prints one line on stderr and exits with status 2 (bad
input) or 1 (a runtime failure); no traceback for expected errors.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


class CLIError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _cmd_pull(args: argparse.Namespace) -> int:
    from shardline.engine.pull import pull_model

    path = pull_model(args.alias, progress=not args.quiet)
    print(path)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from shardline.engine import LLM, SamplingParams

    llm = LLM(
        args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=args.seed,
    )
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
    prompts = args.prompts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise CLIError("no prompts: pass them as arguments or on stdin, one per line")
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=not args.quiet)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=not args.quiet)
    for out in outputs:
        print(out.outputs[0].text)
    return 0


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model and --dtype, shared by every command that loads a model."""
    p.add_argument("--model", default="smollm2-135m", help="model folder or pulled alias (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache dtype")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline", description="shardline: an LLM serving cluster on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download a model into the local cache", description="Download a model by alias.")
    p.add_argument("alias", help="model alias, e.g. smollm2-135m")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_pull)

    p = sub.add_parser("generate", help="generate offline from prompts", description="Run prompts through the engine.")
    add_model_args(p)
    p.add_argument("prompts", nargs="*", help="prompts (default: read from stdin, one per line)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_generate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Modules that add subcommands (serve, status, capacity) register here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def _load_extra_commands() -> None:
    """Add `serve`, `status`, `capacity` and `batch`; leave them out where the `serve` extra is not installed."""
    if _EXTRA_COMMANDS:
        return
    try:
        from shardline.autoscaling import cli as autoscaling_cli
        from shardline.deployments import batch_cli
        from shardline.deployments import cli as deployments_cli
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "shardline":
            raise
        return  # ray, pydantic, ...: pip install 'shardline[serve]'
    _EXTRA_COMMANDS.extend([deployments_cli.register, autoscaling_cli.register, batch_cli.register])


def main(argv: Sequence[str] | None = None) -> int:
    _load_extra_commands()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        print(f"shardline {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"shardline {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
