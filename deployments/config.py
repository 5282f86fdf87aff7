"""One validated config for the served app: the engine, the replicas and the HTTP edge.

`ServeConfig` is the only dict-shaped thing the deployments accept: `shardline
serve` builds it from flags, `serve run serve.yaml` from the application's
`args`. Everything else reads typed fields of it, so a typo in a YAML key
fails at deploy time, not at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.placement import POLICIES

# Names of the Serve application and its two deployments.
APP_NAME = "shardline"
INGRESS_NAME = "OpenAIIngress"
REPLICA_NAME = "ModelReplica"

# Serve reads these at import time in every replica, proxy and handle: short
# intervals make replicas report load to the controller within about a second
# (the defaults are 10 s). Names as in ray/serve/_private/constants.py, Ray 2.60.
SERVE_METRIC_ENV: dict[str, str] = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


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
    num_kv_blocks: Optional[int] = Field(None, ge=1, description="KV cache blocks per replica; default from kv_cache_memory_gb.")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="KV cache budget per replica when num_kv_blocks is unset.")
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    seed: Optional[int] = Field(0, description="Seed of unseeded sampling in each replica.")
    max_n: int = Field(16, ge=1, le=1024, description="Largest `n` (completions per prompt) a request may ask for.")
    max_logprobs: int = Field(20, ge=0, description="Largest `logprobs` / `top_logprobs` a request may ask for.")
    torch_threads: Optional[int] = Field(None, ge=1, description="torch threads per replica; default: torch's choice.")
    tensor_parallel_size: int = Field(
        1, ge=1, description="Ranks each replica's model is split over (rank 0 in the replica, the rest as Ray actors)."
    )
    placement_strategy: str = Field(
        "PACK", description="Where a replica's ranks go: PACK (one node), SPREAD, STRICT_PACK or STRICT_SPREAD."
    )

    # ---- replicas ----------------------------------------------------------
    num_replicas: int = Field(1, ge=1, description="ModelReplica count (ignored when autoscaling_config is set).")
    autoscaling_config: Optional[dict[str, Any]] = Field(
        None, description="Serve autoscaling_config for ModelReplica (min_replicas, max_replicas, ...), passed through."
    )
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs Ray reserves for each ModelReplica.")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs Ray reserves for each ModelReplica.")
    num_ingress_replicas: int = Field(1, ge=1, description="OpenAI ingress replicas (HTTP parsing, tokenizing).")

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
        return self

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
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            block_size=self.block_size,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            max_n=self.max_n,
            tensor_parallel_size=self.tensor_parallel_size,
        )

    @property
    def global_queue_limit(self) -> int:
        """Requests the scheduler's global queue holds: `max_queue_len` per replica, at most replicas."""
        replicas = self.num_replicas
        if self.autoscaling_config is not None:
            replicas = int(self.autoscaling_config.get("max_replicas", replicas))
        return max(1, self.max_queue_len * replicas)

    @property
    def replica_max_ongoing_requests(self) -> int:
        """Serve's per-replica cap: the running batch plus its queue plus room for rejections.

        The replica, not Serve's router, decides admission (see admission.py);
        the slack lets a request through to be told 429 instead of waiting
        unseen in the router.
        """
        return self.max_num_seqs + self.max_queue_len + 16
