"""The Serve application: two thin deployments and the builder that binds them.

    OpenAIIngress (FastAPI: parse, tokenize, route) --handle--> ModelReplica (engine)
          |  place / finished                                   |  load, KV events
          +------------> scheduler actor (cluster/, head node) <-+

The ingress asks the app's scheduler where each request runs and Serve's
request router (serve_router.py) delivers it there; see router.py.

Both classes are thin shells over plain ones (ingress.py + service.py,
replica.py): they add only what needs Ray (the replica's id, Ray metrics, a
DeploymentHandle router, drain controls). `build_app(config)` turns one
validated ServeConfig into deployment options (replica count, resources,
queue limits, shutdown grace); `app_builder` is the entry point for Serve
config files (`serve run serve.yaml`, `serve deploy`).
"""

from __future__ import annotations

import gc
from typing import Any

import ray
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from shardline.cluster.scheduler_actor import DEFAULT_NAMESPACE, scheduler_name
from shardline.deployments.batch_api import BatchStore
from shardline.deployments.batch_api import start as start_batch_job
from shardline.deployments.config import INGRESS_NAME, REPLICA_ENV, REPLICA_NAME, ServeConfig
from shardline.deployments.http_listener import HttpListener
from shardline.deployments.ingress import Gate, build_openai_app
from shardline.deployments.metrics import RayReplicaMetrics
from shardline.deployments.replica import ModelReplica
from shardline.deployments.reporter import ReplicaReporter
from shardline.deployments.router import ReplicaRouter
from shardline.deployments.scheduling import SchedulerUnavailable, ingress_link, load_tenants, replica_link
from shardline.deployments.service import OpenAIService
from shardline.deployments.step_stream import StepStreams
from shardline.deployments.tensor_parallel import rank_bundles

SCHEDULED_ROUTER = "shardline.deployments.serve_router:ScheduledRequestRouter"

# A resource only the head node has (ray._common.constants.HEAD_NODE_RESOURCE_NAME).
HEAD_NODE_RESOURCE = "node:__internal_head__"


def freeze_startup_heap() -> int:
    """Put everything alive after start-up out of the cyclic GC's reach, as vLLM's engine does;
    returns how many objects that froze.

    A replica holds a few hundred thousand long-lived objects (Ray, Serve, torch, the tokenizer):
    every full collection walked them all with the GIL held, which the engine's stepping thread
    needs between its kernel calls (SmolLM2's engine with Ray, Serve and FastAPI imported: 441 k
    objects, 214 ms a full collection; frozen, under 0.1 ms). What serving allocates is collected as before.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class ServeModelReplica(ModelReplica):
    """ModelReplica as a Serve replica: Ray metrics, its Serve id, reports to the app's
    scheduler (reporter.py), engine stopped on shutdown."""

    def __init__(self, config: ServeConfig):
        super().__init__(config, metrics=RayReplicaMetrics(config.model_name))
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._tp_ranks: list[dict[str, Any]] | None = None
        self.reporter = ReplicaReporter(
            self.replica_id, self, replica_link(context.app_name), config.scheduler_report_interval_s
        )
        self.on_routing_news = self.reporter.poke
        self.reporter.start()  # Serve runs the constructor on the replica's event loop
        self.gc_frozen = freeze_startup_heap()  # the engine is loaded and warmed up by now

    def stats(self) -> dict[str, Any]:
        """ModelReplica.stats plus where this replica (and each tensor-parallel rank) runs."""
        s = super().stats()
        s["node_id"] = ray.get_runtime_context().get_node_id()
        s["gc_frozen"] = self.gc_frozen
        group = self.engine.engine.tp_group
        if group is not None:
            if self._tp_ranks is None:
                try:
                    infos = group.launcher.worker_info()
                    self._tp_ranks = [{"rank": i + 1, **info} for i, info in enumerate(infos)]
                except Exception:  # a dead shard: the health check reports it
                    return dict(s, tp_ranks=[])
            s["tp_ranks"] = self._tp_ranks
        return s

    def check_health(self) -> None:
        super().check_health()
        self.reporter.start()  # no-op while it runs

    def record_routing_stats(self) -> dict[str, Any]:
        """Serve's hook for request routers: the load a custom router ranks replicas by."""
        return self.stats()

    def __del__(self) -> None:
        reporter = getattr(self, "reporter", None)
        if reporter is not None:
            reporter.leave()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


@serve.ingress()
class OpenAIIngress:
    """The HTTP ingress: the OpenAI app, plus controls for a graceful shutdown.

    Args:
        config: the app's ServeConfig.
        replica_handle: DeploymentHandle of ModelReplica (Serve passes it from `bind`).
    """

    def __init__(self, config: ServeConfig, replica_handle: Any):
        from shardline.engine.pull import resolve_model
        from shardline.engine.tokenizer import Tokenizer

        self.gate = Gate()
        tenants = load_tenants(config)
        link = ingress_link(config, serve.get_replica_context().app_name, tenants)
        try:
            link.actor()  # start the app's scheduler now, so that the replicas find it
        except SchedulerUnavailable:
            pass  # requests go by Serve's routing until it is up
        ingress_id = serve.get_replica_context().replica_id.unique_id
        self.router = ReplicaRouter(
            replica_handle, config.retry_after_s, link, config.block_size,
            with_text=config.routing == "prefix_approx",
            step_streams=StepStreams(replica_handle, ingress_id) if config.step_stream else None,
        )  # fmt: skip
        self.service = OpenAIService(config, Tokenizer(resolve_model(config.model)), self.router, tenants)
        store = BatchStore(config.data_dir, config.model_name)
        self._app = build_openai_app(self.service, self.gate, config, store, start_batch_job)
        self.listener = None
        if config.http_port is not None:
            self.listener = HttpListener(self._app, config.http_host, config.http_port)
            self.listener.start()  # Serve runs the constructor on the replica's event loop
        self.gc_frozen = freeze_startup_heap()

    def __serve_build_asgi_app__(self):
        return self._app

    async def __del__(self) -> None:
        listener = getattr(self, "listener", None)
        if listener is not None:
            await listener.stop()

    def drain(self) -> int:
        """Refuse new requests from now on (503); returns the number still in flight."""
        self.gate.draining = True
        return self.gate.num_inflight

    def num_inflight(self) -> int:
        return self.gate.num_inflight

    def routing_counts(self) -> dict[str, Any]:
        """Requests the scheduler placed, those routed without it (it was unreachable) and why, and how
        many step streams this ingress has opened (one per replica, again after each idle end)."""
        link = self.router.scheduler
        return {
            "scheduled": self.router.num_scheduled,
            "fallback": self.router.num_fallback,
            "link_up": link is not None and link.available(),
            "link_failures": link.num_failures if link is not None else 0,
            "link_error": link.last_error if link is not None else None,
            "step_subscriptions": self.router.step_streams.num_subscriptions if self.router.step_streams else 0,
        }

    async def replica_stats(self) -> list[dict[str, Any]]:
        """Every ModelReplica's load, as seen from this ingress."""
        return await self.router.replica_stats()


def build_app(config: ServeConfig) -> Application:
    """Deployment options from config, bound into the application graph."""
    env = {"env_vars": dict(REPLICA_ENV)}
    replica_options: dict[str, Any] = dict(
        name=REPLICA_NAME,
        max_ongoing_requests=config.replica_max_ongoing_requests,
        # Serve's router queue (all replicas at max_ongoing_requests) gets the same limit; -1 would be unbounded.
        max_queued_requests=max(1, config.max_queue_len),
        # Follows the head-node scheduler's choice (GenerateRequest.replica_hint); pow2 without one.
        request_router_config=RequestRouterConfig(request_router_class=SCHEDULED_ROUTER),
        # A stopping replica (scale-down) finishes every request it holds: see replica_graceful_shutdown_s.
        graceful_shutdown_timeout_s=config.replica_graceful_shutdown_s,
        # How often Serve checks whether a stopping replica is done (default 2 s): an idle one goes at once.
        graceful_shutdown_wait_loop_s=0.5,
        health_check_period_s=2.0,
        ray_actor_options={"num_cpus": config.replica_num_cpus, "num_gpus": config.replica_num_gpus, "runtime_env": env},
    )
    if config.tensor_parallel_size > 1:
        # One bundle per rank: the replica itself (rank 0) takes bundle 0, its
        # worker ranks the others (deployments/tensor_parallel.py).
        replica_options["placement_group_bundles"] = rank_bundles(
            config.tensor_parallel_size, config.replica_num_gpus > 0, config.replica_num_cpus
        )
        replica_options["placement_group_strategy"] = config.placement_strategy
    # Queue depth drives the replica count (autoscaling/serve_policy.py), with the app's scheduler queue when it runs.
    autoscaling = config.replica_autoscaling_config(scheduler_name("{app_name}"), DEFAULT_NAMESPACE)
    if autoscaling is not None:
        replica_options["autoscaling_config"] = autoscaling
    else:
        replica_options["num_replicas"] = config.num_replicas
    replica = serve.deployment(ServeModelReplica, **replica_options)
    ingress = serve.deployment(
        OpenAIIngress,
        name=INGRESS_NAME,
        num_replicas=config.num_ingress_replicas,
        # The ingress only parses and forwards: admission happens at the replicas.
        max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=config.graceful_shutdown_s,
        ray_actor_options=ingress_actor_options(config, env),
    )
    return ingress.bind(config, replica.bind(config))


def ingress_actor_options(config: ServeConfig, runtime_env: dict[str, Any]) -> dict[str, Any]:
    """Ray options of an ingress replica: no CPU reserved (it only parses and forwards); with its own
    HTTP listener (http_port), on the head node, where Serve's proxy would have listened."""
    options: dict[str, Any] = {"num_cpus": 0, "runtime_env": runtime_env}
    if config.http_port is not None:
        options["resources"] = {HEAD_NODE_RESOURCE: 0.001}
    return options


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files: `import_path: shardline.deployments.app:app_builder`, `args:` = ServeConfig."""
    return build_app(ServeConfig(**(args or {})))
