"""A local Ray cluster with Serve's HTTP proxy, for the tests that serve through it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest

from shardline.deployments.config import SERVE_ENV


@contextmanager
def local_serve(num_cpus: int, env: Mapping[str, str] = SERVE_ENV, **ray_init_kwargs) -> Iterator[int]:
    """Ray bound to 127.0.0.1 and Serve's proxy on a free port (yielded); all shut down on exit.

    `env` is set before Ray starts (its workers inherit it) and restored afterwards.
    """
    import ray
    from ray import serve

    from shardline.deployments.server import free_port

    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        if ray.is_initialized():
            ray.shutdown()
        port = free_port()
        # address="local": a cluster of our own, even when another one on this machine
        # (`ray start`) wrote /tmp/ray/ray_current_cluster.
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=num_cpus,
            log_to_driver=False,
            **ray_init_kwargs,
        )
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()
