"""`shardline serve` and `shardline status`, registered into shardline/cli.py.

    shardline serve [--model M] [--host 127.0.0.1] [--port 8000] [--num-replicas N]
                    [--min-replicas A --max-replicas B --target-queue-depth Q]
                    [--num-kv-blocks N] [--routing kv_aware|prefix_approx|pow2|round_robin]
                    [--tenants FILE] [--address ADDR] [--config serve.yaml]
    shardline status [--json] [--address auto]

Ray is imported inside the handlers only, so `shardline pull` never pays for
it. Settings come from, in rising order: ServeConfig's defaults, the first
application's `args` (and `http_options`) of a Serve config file, the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from shardline.cluster.placement import POLICIES
from shardline.deployments.config import APP_NAME

# flag dest -> ServeConfig field, for flags that override the config file.
_CONFIG_FLAGS = {
    "model": "model",
    "served_model_name": "served_model_name",
    "dtype": "dtype",
    "max_model_len": "max_model_len",
    "num_replicas": "num_replicas",
    "min_replicas": "min_replicas",
    "max_replicas": "max_replicas",
    "target_queue_depth": "target_queue_depth",
    "num_kv_blocks": "num_kv_blocks",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "max_queue_len": "max_queue_len",
    "request_timeout": "request_timeout_s",
    "grace_period": "graceful_shutdown_s",
    "tensor_parallel_size": "tensor_parallel_size",
    "placement_strategy": "placement_strategy",
    "routing": "routing",
    "tenants": "tenants_file",
    "replica_num_cpus": "replica_num_cpus",
    "torch_threads": "torch_threads",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Start a local Ray cluster (or join --address), deploy the app, serve until Ctrl-C.",
    )
    p.add_argument("--model", help="model folder or pulled alias (default: smollm2-135m)")
    p.add_argument("--served-model-name", help="the name clients send as `model` (default: the alias or folder name)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--num-replicas", type=int, help="ModelReplica count (default 1)")
    p.add_argument("--min-replicas", type=int, help="autoscaling: fewest replicas (default 1; 0 scales to zero when idle)")
    p.add_argument("--max-replicas", type=int, help="autoscale on queue depth up to this many replicas")
    p.add_argument("--target-queue-depth", type=float, help="autoscaling: requests (running + waiting) per replica (default 3.25)")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache blocks per replica")
    p.add_argument("--max-num-seqs", type=int, help="running batch size per replica")
    p.add_argument("--max-num-batched-tokens", type=int, help="tokens one engine step runs at most (default 1536): a running stream waits a step for its next token")
    p.add_argument("--max-queue-len", type=int, help="waiting requests per replica before 429")
    p.add_argument("--request-timeout", type=float, help="seconds before a request gets 408")
    p.add_argument("--grace-period", type=float, help="seconds in-flight requests get on shutdown")
    p.add_argument(
        "--replica-num-cpus",
        type=float,
        help="CPUs each replica (rank) reserves and runs torch threads on (default: on a cluster of its own, "
        "an equal share of this machine's cores; joining one, 1)",
    )
    p.add_argument("--torch-threads", type=int, help="torch threads per replica (default: its CPU reservation)")
    p.add_argument("--tensor-parallel-size", type=int, help="split each replica's model over N ranks (Ray actors)")
    p.add_argument(
        "--placement-strategy",
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="where a replica's ranks go: PACK on one node (default), SPREAD across nodes",
    )
    p.add_argument(
        "--routing",
        choices=list(POLICIES),
        help="where the head-node scheduler sends each request: kv_aware (default: exact prefix-cache hits), "
        "prefix_approx (prompt-text tree), pow2, round_robin",
    )
    p.add_argument("--tenants", metavar="FILE", help="tenants YAML/JSON: API keys, weights, queue limits, cache salts")
    p.add_argument("--address", help="join this Ray cluster (e.g. auto, or HEAD_IP:6379) instead of starting one")
    p.add_argument("--config", help="a Serve config YAML (serve.yaml): its first application's args and http_options")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "status",
        help="show the served app's replicas and queue depth",
        description="Running, starting and draining replicas and queue depth of each deployment.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--address", default="auto", help="Ray cluster to read (default: auto, the local one)")
    p.add_argument("--app-name", default=APP_NAME)
    p.set_defaults(func=_cmd_status)


def load_config_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ServeConfig fields, http_options) from a Serve config YAML or a plain mapping of fields."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    apps = data.get("applications")
    if apps is None:
        return data, {}
    if not apps:
        raise ValueError(f"{path}: `applications` is empty")
    return dict(apps[0].get("args") or {}), dict(data.get("http_options") or {})


def build_config(args: argparse.Namespace):
    """ServeConfig and ServerOptions from the flags and the optional config file."""
    from pydantic import ValidationError

    from shardline.deployments.config import ServeConfig
    from shardline.deployments.server import ServerOptions

    fields, http = load_config_file(args.config) if args.config else ({}, {})
    for flag, field in _CONFIG_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            fields[field] = value
    if fields.get("tenants_file"):
        fields["tenants_file"] = str(Path(fields["tenants_file"]).expanduser().resolve())  # replicas run elsewhere
    try:
        config = ServeConfig(**fields)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"invalid setting {where}: {first['msg']}") from None
    options = ServerOptions(
        host=args.host or http.get("host", "127.0.0.1"),
        port=args.port if args.port is not None else int(http.get("port", 8000)),
        address=args.address,
    )
    if options.address is None and "replica_num_cpus" not in fields:
        config = config.share_cpus(os.cpu_count() or 1)  # the cluster is this machine
    return config, options


def _cmd_serve(args: argparse.Namespace) -> int:
    from shardline.deployments.server import check_port_free, serve_forever
    from shardline.engine.pull import resolve_model

    config, options = build_config(args)
    resolve_model(config.model)  # an unknown or unpulled model fails here, before Ray starts
    if config.tenants_file:
        from shardline.cluster.tenants import TenantRegistry

        TenantRegistry.from_file(config.tenants_file)  # so does a bad tenants file
    if options.address is None:
        check_port_free(options.host, options.port)
    return serve_forever(config, options, print_fn=lambda line: print(line, flush=True))


def _connect(address: str) -> None:
    from shardline.deployments.cluster_address import join
    from shardline.deployments.server import quiet_serve_notices

    quiet_serve_notices()  # no "Started router" chatter in the report
    join(address, log_to_driver=False, logging_level="ERROR")


def _cmd_status(args: argparse.Namespace) -> int:
    import ray

    from shardline.deployments.status import fetch_status, render_text

    _connect(args.address)
    try:
        report = fetch_status(args.app_name)
    finally:
        ray.shutdown()
    print(json.dumps(report) if args.json else render_text(report))
    sys.stdout.flush()
    return 0
