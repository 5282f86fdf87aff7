"""Tensor-parallel worker ranks as Ray actors in a placement group.

Rank 0 stays in the calling process (a Serve ModelReplica, or the driver of
an offline `LLM`); ranks 1..N-1 are `TPWorkerActor`s pinned to bundles
1..N-1 of a placement group of N bundles (one per rank, a GPU each on GPU
nodes). Inside a Serve replica the group is the replica's own
(`placement_group_bundles`), so rank 0 holds bundle 0; elsewhere the
launcher reserves one. PACK keeps the ranks on one node, SPREAD (or
STRICT_SPREAD) spans nodes.

Steps reach the workers as torch.distributed broadcasts (engine/distributed.py),
never as a Ray call per step: Ray only starts, watches and stops them.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardline.engine.distributed import TPWorker, WorkerSpec

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@ray.remote(max_concurrency=2)
class TPWorkerActor:
    """One worker rank. `run` blocks until rank 0 broadcasts stop; `info` answers meanwhile."""

    def __init__(self):
        self._worker: TPWorker | None = None

    def run(self, spec: WorkerSpec, rank: int) -> int:
        self._worker = TPWorker(spec, rank)
        return self._worker.run()

    def info(self) -> dict[str, Any]:
        """Where this rank runs and how many weight bytes it holds (0 until built)."""
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "parameter_bytes": self._worker.parameter_bytes() if self._worker else 0,
        }


def rank_bundles(world_size: int, use_gpu: bool, cpus_per_rank: float = 1.0) -> list[dict[str, float]]:
    """One bundle per rank; GPU nodes declare a GPU per rank."""
    bundle: dict[str, float] = {"CPU": cpus_per_rank}
    if use_gpu:
        bundle["GPU"] = 1.0
    return [dict(bundle) for _ in range(world_size)]


class RayWorkerLauncher:
    """Starts ranks 1..N-1 as actors in a placement group (the current one, or a new one).

    Args:
        strategy: placement strategy when the launcher reserves the group itself.
        use_gpu: ask for a GPU per rank.
        cpus_per_rank: CPUs per bundle.
        threads_per_rank: torch threads per worker (default: cpus_per_rank rounded up).
        placement_group: use this group instead of the current one or a new one.
    """

    # How often `alive()` may ask Ray (it is called before every step).
    CHECK_INTERVAL_S = 0.5

    def __init__(
        self,
        strategy: str = "PACK",
        use_gpu: bool = False,
        cpus_per_rank: float = 1.0,
        threads_per_rank: int | None = None,
        placement_group: PlacementGroup | None = None,
        ready_timeout_s: float = 120.0,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        self.use_gpu = use_gpu
        self.cpus_per_rank = cpus_per_rank
        self.threads_per_rank = threads_per_rank or max(1, math.ceil(cpus_per_rank))
        self.ready_timeout_s = ready_timeout_s
        self._pg = placement_group
        self._own_pg = False
        self.actors: list[Any] = []
        self._runs: list[ray.ObjectRef] = []
        self._alive = True
        self._checked_at = 0.0
        # Worker actors are named shardline-tp-<group>-rank<r>, so operators can find them.
        self.group_id = uuid.uuid4().hex[:8]

    def rendezvous_host(self) -> str:
        return ray.util.get_node_ip_address()

    def start(self, spec: WorkerSpec) -> None:
        pg = self._pg or get_current_placement_group()
        if pg is None:
            pg = placement_group(rank_bundles(spec.world_size, self.use_gpu, self.cpus_per_rank), strategy=self.strategy)
            self._own_pg = True
        if len(pg.bundle_specs) < spec.world_size:
            raise ValueError(f"placement group has {len(pg.bundle_specs)} bundles; tensor parallelism needs {spec.world_size}")
        try:
            ray.get(pg.ready(), timeout=self.ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._release(pg)
            raise RuntimeError(
                f"could not reserve {spec.world_size} {self.strategy} bundles of {pg.bundle_specs[0]} within "
                f"{self.ready_timeout_s:.0f} s: the cluster lacks the resources"
            ) from None
        self._pg = pg
        spec.num_threads = spec.num_threads or self.threads_per_rank
        for rank in range(1, spec.world_size):
            bundle = pg.bundle_specs[rank]
            actor = TPWorkerActor.options(
                num_cpus=bundle.get("CPU", 0),
                num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank),
                name=f"shardline-tp-{self.group_id}-rank{rank}",
            ).remote()
            self.actors.append(actor)
            self._runs.append(actor.run.remote(spec, rank))

    def alive(self) -> bool:
        if not self._alive or not self._runs:
            return False
        now = time.monotonic()
        if now - self._checked_at >= self.CHECK_INTERVAL_S:
            self._checked_at = now
            done, _ = ray.wait(self._runs, num_returns=1, timeout=0)
            self._alive = not done  # a worker's run only returns (or fails) after stop
        return self._alive

    def worker_info(self) -> list[dict[str, Any]]:
        return ray.get([a.info.remote() for a in self.actors], timeout=30)

    def shutdown(self) -> None:
        if self._runs:
            ray.wait(self._runs, num_returns=len(self._runs), timeout=10)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors.clear()
        self._runs.clear()
        self._alive = False
        if self._own_pg and self._pg is not None:
            self._release(self._pg)
            self._pg = None

    @staticmethod
    def _release(pg: PlacementGroup) -> None:
        try:
            remove_placement_group(pg)
        except Exception:  # already gone with its job
            pass


def ray_launcher(placement_strategy: str = "PACK") -> RayWorkerLauncher:
    """The engine's "ray" backend (the `shardline.worker_launchers` entry point): worker ranks as
    actors, on the running Ray cluster or on a local one started here."""
    if not ray.is_initialized():
        ray.init()
    return RayWorkerLauncher(strategy=placement_strategy)
