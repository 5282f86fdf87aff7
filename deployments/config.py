"""One validated config for the served app: the engine, the replicas and the HTTP edge.

`ServeConfig` is the only dict-shaped thing the deployments accept: `shardline
serve` builds it from flags, `serve run serve.yaml` from the application's
`args`. Everything else reads typed fields of it, so a typo in a YAML key
fails at deploy time, not at the first request.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shardline.autoscaling.policy import QueueDepthConfig
from shardline.cluster.placement import POLICIES

# Names of the Serve application and its two deployments.
APP_NAME = "shardline"
INGRESS_NAME = "OpenAIIngress"
REPLICA_NAME = "ModelReplica"

# Environment of every Serve process of the app (the raylet passes it to the
# controller and proxy; deployments get it in their runtime_env). Names as in
# ray/serve/_private/constants.py, Ray 2.60.
# - How often replicas and handles push autoscaling metrics to Serve's
#   controller (Serve's default is 10 s). NOTE: Ray 2.60 defines these two but
#   does not read them yet; what sets the interval is the deprecated
#   autoscaling_config.metrics_interval_s, which `replica_autoscaling_config`
#   sets to this same value.
# - Handles (proxy -> ingress -> ModelReplica) stream over the replicas' own
#   gRPC servers instead of Ray actor-task streaming, one of the settings of
#   Serve's throughput-optimized mode. Every token crosses two such hops: on
#   2 cores, serve_load at 64 streams went from 318 to 395 output tokens/s and
#   the ingress and proxy from 9.4 to 3.5 CPU-seconds per run. Replicas start
#   that server in any case (Ray 2.60), so it opens no new port.
# - Serve's controller runs its control loop every 0.25 s instead of 0.1 s.
#   Idle, the loop and the GCS calls it makes were the largest background CPU
#   of the app (controller 0.04 + GCS 0.02 cores of 2; at 0.25 s 0.02 and
#   0.012, at 0.5 s 0.015 and 0.009). Every core-second they take lands
#   mid-step on the model's two OpenMP threads, which then wait for each
#   other: a lone 128-token prefill took 104-108 ms on a quiet machine,
#   124-128 ms beside an idle `shardline serve`. The loop only reconciles
#   (replica starts and stops, autoscaling decisions, already delayed by
#   seconds), so a quarter second costs no request anything.
# REPLICA_ENV adds two more of that mode's settings, for the app's replicas
# only (their runtime_env): a replica runs our code on its own event loop, not
# on a second thread's loop, and a handle's router shares its caller's loop.
# Each streamed item then skips a cross-thread hand-off at each end of the
# ingress -> ModelReplica hop. Our code never blocks a loop for long: the
# engine steps on its own thread (engine/async_engine.py). Not process-wide: a
# handle whose router shares the caller's loop cannot be used outside one, and
# drivers (`shardline status`, a user's batch job) call handles synchronously.
METRICS_PUSH_INTERVAL_S = 0.5
SERVE_ENV: dict[str, str] = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25",
}
REPLICA_ENV: dict[str, str] = {
    **SERVE_ENV,
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


_POLICY = QueueDepthConfig()
# ServeConfig fields that set QueueDepthConfig knobs of the same name.
_POLICY_FIELDS = ("target_queue_depth", "upscale_delay_s", "downscale_delay_s", "downscale_to_zero_delay_s")


class ServeConfig(BaseModel):
    """Everything that shapes one served model: engine, replicas, HTTP limits.

    Args:
        model: see the field descriptions; every field has one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # ---- the model and its engine ------------------------------------------
    model: str = Field("smollm2-135m", description="Model folder or an alias pulled with `shardline pull`.")
    served_model_name: Optional[str] = Field(
        None, description="Name clients put in `model`; default: the alias, or the folder's name."
    )
    dtype: str = Field("float32", description='Weights and KV cache dtype: "float32" or "bfloat16".')
    max_model_len: Optional[int] = Field(None, ge=2, description="Context length; default: the model's.")
    max_num_seqs: int = Field(64, ge=1, description="Requests in one replica's running batch at most.")
    max_num_batched_tokens: int = Field(
        1536, ge=1, description="Tokens of new prompts (and decodes) one engine step runs at most. Every running "
        "stream waits a whole step for its next token, so this bounds the gaps a burst of new prompts puts in "
        "them: 64 prompts at once (serve_load, SmolLM2 bf16, 2 cores), 1536 against 2048: inter-token gap p99 "
        "1058 against 1357 ms, TTFT p99 5993 against 5886 ms, p50 and throughput level (mean of six runs).",
    )
    num_kv_blocks: Optional[int] = Field(None, ge=1, description="KV cache blocks per replica; default from kv_cache_memory_gb.")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="KV cache budget per replica when num_kv_blocks is unset.")
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    seed: Optional[int] = Field(0, description="Seed of unseeded sampling in each replica.")
    max_n: int = Field(16, ge=1, le=1024, description="Largest `n` (completions per prompt) a request may ask for.")
    first_token_pass_tokens: int = Field(
        512,
        ge=0,
        description="A step's new prompts run in passes of about this many tokens, each handing out its requests' "
        "first tokens as it ends (0: the whole step's prefills in one pass).",
    )
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` / `top_logprobs` a request may ask for.")
    torch_threads: Optional[int] = Field(
        None, ge=1, description="torch threads per replica (and per tensor-parallel rank); default: its CPU reservation."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks each replica's model is split over (rank 0 in the replica, the rest as Ray actors)."
    )
    placement_strategy: str = Field(
        "PACK", description="Where a replica's ranks go: PACK (one node), SPREAD, STRICT_PACK or STRICT_SPREAD."
    )

    # ---- replicas ----------------------------------------------------------
    num_replicas: int = Field(1, ge=1, description="ModelReplica count (ignored when autoscaling: max_replicas or autoscaling_config).")
    autoscaling_config: Optional[dict[str, Any]] = Field(
        None, description="Serve autoscaling_config for ModelReplica (min_replicas, max_replicas, ...), passed through."
    )
    min_replicas: Optional[int] = Field(
        None, ge=0, description="Autoscaling: the fewest ModelReplicas (default 1; 0 scales to zero when idle, and "
        "requests wait for a replica to start). Needs max_replicas."
    )
    max_replicas: Optional[int] = Field(
        None, ge=1, description="Autoscaling on queue depth (autoscaling/policy.py) up to this many ModelReplicas; "
        "unset: a fixed num_replicas."
    )
    target_queue_depth: float = Field(
        _POLICY.target_queue_depth, gt=0,
        description="Autoscaling: requests one replica should hold (running + waiting, plus its share of the global queue).",
    )
    upscale_delay_s: float = Field(
        _POLICY.upscale_delay_s, ge=0, description="Autoscaling: how long the queue must stay above target before replicas are added."
    )
    downscale_delay_s: float = Field(
        _POLICY.downscale_delay_s, ge=0, description="Autoscaling: how long the load must stay low before a replica is removed."
    )
    downscale_to_zero_delay_s: float = Field(
        _POLICY.downscale_to_zero_delay_s, ge=0,
        description="Autoscaling with min_replicas 0: how long without any request before the last replica goes.",
    )
    autoscaling_policy: dict[str, Any] = Field(
        default_factory=dict, description="Autoscaling: more knobs of the queue-depth policy, by name (QueueDepthConfig)."
    )
    drain_timeout_s: Optional[float] = Field(
        None, gt=0, description="How long a stopping ModelReplica (scale-down, redeploy) may take to finish the requests "
        "it holds before Serve kills it; default: request_timeout_s + 30 s (1 hour without a request timeout).",
    )
    replica_num_cpus: float = Field(
        1.0, ge=0, description="CPUs Ray reserves for each ModelReplica (each tensor-parallel rank); `shardline serve` "
        "on a cluster of its own defaults it to an equal share of the machine's cores.",
    )
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each ModelReplica.")
    num_ingress_replicas: int = Field(1, ge=1, description="OpenAI ingress replicas (HTTP parsing, tokenizing).")
    step_stream: bool = Field(
        True,
        description="Generated tokens reach each ingress on one stream per replica, a whole engine step per "
        "message (deployments/step_stream.py), instead of one message per token per request.",
    )

    # ---- the HTTP edge --------------------------------------------------------
    http_port: Optional[int] = Field(
        None, ge=1, le=65535,
        description="When set, the ingress replicas answer HTTP on http_host:http_port themselves, on the head node "
        "(deployments/http_listener.py), instead of behind Serve's HTTP proxy; `shardline serve` sets it to --port.",
    )
    http_host: str = Field("127.0.0.1", description="Bind address of the ingress replicas' own HTTP listener (http_port).")

    # ---- routing (the head-node scheduler, cluster/) -------------------------
    routing: str = Field(
        "kv_aware",
        description="Placement policy of the head-node scheduler: kv_aware (exact prefix cache), "
        "prefix_approx (prompt-text tree), pow2 or round_robin.",
    )
    tenants_file: Optional[str] = Field(
        None, description="Tenants YAML/JSON (API keys, fair-share weights, queue limits, cache salts); see cluster/tenants.py."
    )
    scheduler_report_interval_s: float = Field(
        0.05, gt=0, le=5, description="How often a replica sends the scheduler its load and KV events, when they changed."
    )

    # ---- admission, limits, shutdown ---------------------------------------
    max_queue_len: int = Field(
        256, ge=0, description="Waiting requests one replica holds beyond its running batch; more get 429."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After seconds sent with a 429.")
    request_timeout_s: Optional[float] = Field(
        600.0, gt=0, description="A request still unfinished after this many seconds gets 408 (None: no limit)."
    )
    max_body_bytes: int = Field(4 << 20, ge=1024, description="Largest request body; more gets 413.")
    max_header_bytes: int = Field(16 << 10, ge=1024, description="Largest total size of request headers; more gets 431.")
    data_dir: str = Field(
        "~/.cache/shardline/data",
        description="Where the Files and Batches API keeps uploads and batch jobs (on the ingress's node; shared "
        "storage when ingress replicas run on several nodes).",
    )
    graceful_shutdown_s: float = Field(
        30.0, ge=0, description="On shutdown, how long requests in flight may run before they are cut."
    )

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f'dtype must be "float32" or "bfloat16", got {self.dtype!r}')
        if self.routing not in POLICIES:
            raise ValueError(f"routing must be one of {', '.join(POLICIES)}, got {self.routing!r}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:  # a full batch could not decode in one step
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs ({self.max_num_seqs})"
            )
        self._check_autoscaling()
        return self

    def _check_autoscaling(self) -> None:
        if self.max_replicas is None:
            if self.min_replicas is not None or self.autoscaling_policy:
                raise ValueError("min_replicas and autoscaling_policy need max_replicas (autoscaling on queue depth)")
            return
        if self.autoscaling_config is not None:
            raise ValueError("set max_replicas (queue-depth autoscaling) or autoscaling_config (Serve's, passed through), not both")
        repeated = set(self.autoscaling_policy) & {"min_replicas", "max_replicas", *_POLICY_FIELDS}
        if repeated:
            raise ValueError(f"autoscaling_policy must not set {sorted(repeated)}: they are ServeConfig fields")
        self.autoscaling  # QueueDepthConfig validates the knobs (ValueError)

    @property
    def autoscaling(self) -> Optional[QueueDepthConfig]:
        """The queue-depth policy's knobs; None for a fixed replica count or a passed-through autoscaling_config."""
        if self.max_replicas is None:
            return None
        knobs = dict(self.autoscaling_policy, **{name: getattr(self, name) for name in _POLICY_FIELDS})
        min_replicas = 1 if self.min_replicas is None else self.min_replicas
        return QueueDepthConfig.from_dict(dict(knobs, min_replicas=min_replicas, max_replicas=self.max_replicas))

    def replica_autoscaling_config(
        self, scheduler_name: Optional[str] = None, scheduler_namespace: str = "shardline"
    ) -> Optional[dict[str, Any]]:
        """ModelReplica's Serve autoscaling_config, or None for a fixed num_replicas.

        With max_replicas: Serve's custom policy around `autoscaling`
        (autoscaling/serve_policy.py), metrics pushed every
        METRICS_PUSH_INTERVAL_S; it adds the global queue of the scheduler
        actor `scheduler_name` (`{app_name}` is filled in) while that runs.
        Otherwise the passed-through autoscaling_config, if any.
        """
        if self.autoscaling_config is not None:
            return dict(self.autoscaling_config)
        policy = self.autoscaling
        if policy is None:
            return None
        from shardline.autoscaling.serve_policy import serve_autoscaling_config

        return serve_autoscaling_config(
            policy,
            # Up and serving at once even with min_replicas 0; idle, it goes after downscale_to_zero_delay_s.
            initial_replicas=max(1, policy.min_replicas),
            push_interval_s=METRICS_PUSH_INTERVAL_S,
            scheduler_name=scheduler_name,
            scheduler_namespace=scheduler_namespace,
        )

    @property
    def max_model_replicas(self) -> int:
        """The most ModelReplicas this config may run at once."""
        if self.max_replicas is not None:
            return self.max_replicas
        if self.autoscaling_config is not None:
            return int(self.autoscaling_config.get("max_replicas", self.num_replicas))
        return self.num_replicas

    @property
    def replica_threads(self) -> int:
        """torch threads of one replica (or tensor-parallel rank): torch_threads, else its CPU reservation rounded up.

        Explicit rather than left to Ray's OMP_NUM_THREADS (an actor's num_cpus)
        or to torch's default (every core of the machine, shared by all replicas).
        """
        return self.torch_threads or max(1, math.ceil(self.replica_num_cpus))

    def share_cpus(self, num_cpus: int) -> "ServeConfig":
        """This config with each replica rank reserving an equal share of `num_cpus` (at least 1).

        For a cluster that is one machine: with the default reservation of one
        CPU, a single replica on an 8-core machine would run its engine on one
        core. Every rank of every replica the config may run at once gets a share.
        """
        ranks = self.max_model_replicas * self.tensor_parallel_size
        return self.model_copy(update={"replica_num_cpus": float(max(1, num_cpus // ranks))})

    @property
    def replica_graceful_shutdown_s(self) -> float:
        """Serve's graceful_shutdown_timeout_s for ModelReplica: long enough to finish every request it holds.

        A replica that a scale-down stops takes no new requests (Serve's
        routers drop STOPPING replicas) and is killed only once its requests
        are done or this time is up. Any request ends within the request
        timeout (the ingress cancels it there), so that plus a margin cuts none.
        """
        drain = self.drain_timeout_s
        if drain is None:
            drain = 3600.0 if self.request_timeout_s is None else self.request_timeout_s + 30.0
        return max(drain, self.graceful_shutdown_s)

    @property
    def model_name(self) -> str:
        """The name clients send in `model`."""
        return self.served_model_name or Path(self.model.rstrip("/")).name

    def engine_kwargs(self, model_folder: str) -> dict[str, Any]:
        """EngineConfig keyword arguments for one replica's engine."""
        return dict(
            model=model_folder,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            max_n=self.max_n,
            first_token_pass_tokens=self.first_token_pass_tokens,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    @property
    def global_queue_limit(self) -> int:
        """Requests the scheduler's global queue holds: `max_queue_len` per replica, at most replicas."""
        return max(1, self.max_queue_len * self.max_model_replicas)

    @property
    def replica_max_ongoing_requests(self) -> int:
        """Serve's per-replica cap: the running batch plus its queue plus room for rejections.

        The replica, not Serve's router, decides admission (see admission.py);
        the slack lets a request through to be told 429 instead of waiting
        unseen in the router.
        """
        return self.max_num_seqs + self.max_queue_len + 16 + self.num_ingress_replicas  # + each ingress's step stream
