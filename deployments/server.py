"""`shardline serve` in the foreground: start (or join) Ray, deploy, wait, drain, stop.

A cluster this process starts is recorded where Ray's clients look for one
(Ray's address file, as `ray start` writes it), so that `shardline status`
and any `ray.init(address="auto")` on this machine find it; the record goes
when the cluster does.

Shutdown, on SIGINT or SIGTERM (one line said, exit status 0):

1. every ingress replica starts draining: new requests get 503, /health too;
2. wait until the requests in flight finish, at most `graceful_shutdown_s`;
3. our app and its scheduler go, when we joined someone else's cluster;
4. `ray.shutdown()`: a cluster this process started goes with it, leaving no
   raylet or GCS behind.

A second Ctrl-C skips the wait.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from shardline.deployments import cluster_address
from shardline.deployments.config import APP_NAME, INGRESS_NAME, SERVE_ENV, ServeConfig


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to serve (what ServeConfig does not cover: the process and network)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Ray address to join ("auto", "ray://...", "IP:6379"); None starts a local cluster.
    address: Optional[str] = None
    app_name: str = APP_NAME
    # Prometheus scrape port of the local Ray node (0: pick a free one).
    metrics_port: int = 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def quiet_serve_notices() -> None:
    """Serve's INFO notices in this (driver) process off: "Started Serve", "Started <router>",
    "Application ... is ready at" its proxy's address, which `shardline serve` does not run.

    Importing ray.serve sets its logger's level, so this imports it first.
    """
    import ray.serve  # noqa: F401

    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """ValueError when something listens on host:port: fail before Ray starts, not after a minute of retries.

    SO_REUSEADDR, as the listener itself binds: the last run's connections waiting out TIME_WAIT
    on the port do not keep a new server from it; a live listener still does.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None


def start_ray(config: ServeConfig, options: ServerOptions) -> tuple[bool, Optional[int]]:
    """Connect to, or start, a Ray cluster. Returns (started here, metrics port)."""
    import ray

    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the raylet, hence by every worker
    if options.address:
        cluster_address.join(options.address, log_to_driver=False)
        return False, None
    metrics_port = options.metrics_port or free_port()
    replicas = config.max_model_replicas
    kwargs = dict(
        address="local",  # a new cluster, even when another one (`ray start`) runs on this machine
        include_dashboard=False,
        num_cpus=max(os.cpu_count() or 1, int(replicas * config.replica_num_cpus + 0.999)),
        log_to_driver=False,
        _metrics_export_port=metrics_port,
    )
    if _is_loopback(options.host):
        kwargs["_node_ip_address"] = "127.0.0.1"  # nothing of Ray listens beyond this machine
    ray.init(**kwargs)
    cluster_address.record(ray.get_runtime_context().gcs_address)
    return True, metrics_port


def deploy(config: ServeConfig, options: ServerOptions) -> None:
    """Run the app with its ingress replicas listening on host:port (blocks until it is RUNNING).

    The ingress answers HTTP itself (deployments/http_listener.py); Serve
    starts without its HTTP proxy, which would only add a hop. Joining a
    cluster whose Serve already runs, that Serve is left as it is.
    """
    from ray import serve

    from shardline.deployments.app import build_app

    serve.start(proxy_location="Disabled")
    config = config.model_copy(update={"http_host": options.host, "http_port": options.port})
    serve.run(build_app(config), name=options.app_name, route_prefix="/", blocking=False)


def wait_healthy(base_url: str, timeout_s: float = 60.0) -> None:
    """Poll GET /health until the app answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url}/health did not answer within {timeout_s:.0f} s")
        time.sleep(0.25)


def drain(app_name: str, grace_s: float, poll_s: float = 0.2) -> int:
    """Stop taking requests and wait for those in flight; returns how many were cut."""
    from ray import serve

    handle = serve.get_deployment_handle(INGRESS_NAME, app_name)
    inflight = sum(handle.broadcast("drain").results(timeout_s=10))
    deadline = time.monotonic() + grace_s
    while inflight > 0 and time.monotonic() < deadline:
        time.sleep(poll_s)
        inflight = sum(handle.broadcast("num_inflight").results(timeout_s=10))
    return inflight


def stop(options: ServerOptions, started_ray: bool) -> None:
    """Take our app off the cluster, then leave it; a cluster we started goes whole with
    `ray.shutdown()` (Serve's own shutdown would only add its controller's retries to the log)."""
    from ray import serve

    from shardline.deployments.scheduling import stop_scheduler

    if not started_ray:
        serve.delete(options.app_name)
        stop_scheduler(options.app_name)  # detached: it would outlive the app
    _shutdown_ray_if_connected()


def banner(config: ServeConfig, options: ServerOptions, metrics_port: Optional[int]) -> str:
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
    base = f"http://{host}:{options.port}"
    body = (
        '{"model": "%s", "messages": [{"role": "user", "content": "What is the capital of France?"}]}'
        % config.model_name
    )
    lines = [
        f"shardline: serving {config.model_name} at {base}/v1 (OpenAI API)",
        f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'",
    ]
    if metrics_port:
        lines.append(f"  metrics: Prometheus scrapes http://{host}:{metrics_port}/metrics (ray_shardline_*)")
    lines.append("  status: shardline status    stop: Ctrl-C")
    return "\n".join(lines)


def serve_forever(
    config: ServeConfig, options: ServerOptions, print_fn: Callable[[str], None] = print
) -> int:
    """Run until SIGINT/SIGTERM, then drain and stop. Returns the exit status."""
    stop_event = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum, _frame):
        if stop_event.is_set():  # a second signal: stop waiting for requests in flight
            raise KeyboardInterrupt
        stop_event.set()

    def take_signals() -> None:
        for sig in previous:
            signal.signal(sig, on_signal)

    take_signals()
    quiet_serve_notices()
    started_ray = False
    try:
        started_ray, metrics_port = start_ray(config, options)
        # Ray's core worker installs a SIGTERM handler of its own (a native stack dump, then exit):
        # take it back.
        take_signals()
        deploy(config, options)
        host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
        wait_healthy(f"http://{host}:{options.port}")
        print_fn(banner(config, options, metrics_port))
        while not stop_event.wait(0.5):
            pass
        print_fn(f"shardline: stopping: draining requests in flight, at most {config.graceful_shutdown_s:g} s (Ctrl-C again: now)")
        cut = drain(options.app_name, config.graceful_shutdown_s)
        if cut:
            print_fn(f"shardline: grace period over, cutting {cut} request(s)")
        stop(options, started_ray)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _shutdown_ray_if_connected()


def _shutdown_ray_if_connected() -> None:
    """Leave the cluster (a cluster this process started stops with it, and its record goes)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster_address.forget()
