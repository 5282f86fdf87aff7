"""The head-node scheduler core: global queue, KV index, replica loads, a placement policy.

Plain Python, the clock an argument of every call that needs one; the Ray
actor (`cluster.scheduler_actor`) and Serve's request router wrap it. It is
the single writer of the index and the queue.

The protocol, as the wrappers drive it:

1. The ingress tokenizes a prompt, hashes its full blocks with the engine's
   `hash_prompt_blocks(token_ids, block_size, tenant.extra_keys)` and calls
   `submit(RouteRequest, now)`: a `Ticket` (queued) or a `Rejection` (429
   with Retry-After, or 400 when no replica could ever hold the prompt).
2. `poll_assignments(now)` binds queued requests to replicas that can start
   them now (late binding) in fair order, and returns `Assignment`s. The
   wrapper calls it after every submit, report and finish, and on a short
   timer (a request waiting for its cached replica times out by the clock).
3. The ingress sends the request to its replica, passing the scheduler's
   request id; the replica's engine uses that id.
4. Each replica reports periodically and whenever its KV cache changes:
   `on_replica_report(ReplicaReport, now)` with its load, the KV events since
   its last report (numbered by `seq`, see `cluster.kv_index`) and the ids of
   requests that reached it since its last report. If the reply says
   `resync`, the replica sends `replace_replica_index(replica_id, all_hashes,
   seq)` with every hash it caches as of report `seq`.
5. When the stream ends, the ingress calls `on_request_finished(request_id,
   RequestUsage, now)`: usage is charged to tenant, model and replica.

Bindings a replica has not reported yet ("pending") count against its load:
one more running request, the blocks and prefill tokens the request needs,
so that a burst of submits between two reports does not all land on the one
replica that looked free. A pending binding ends when the replica lists the
request in `admitted_ids`, when the request finishes, or after
`pending_ttl_s` (a lost request).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from shardline.cluster.global_queue import GlobalQueue, QueuedRequest, QueueLimits, Rejection
from shardline.cluster.kv_index import ApplyResult, IndexStats, KVIndex, RunningPrompts, WireEvent
from shardline.cluster.placement import (
    DEFAULT_POLICY,
    Priority,
    ReplicaLoad,
    RouteRequest,
    StartLimits,
    blocks_needed,
    has_slot,
    make_policy,
    start_columns,
)
from shardline.cluster.replica_load import ReplicaTable
from shardline.cluster.tenants import TenantRegistry, Usage, UsageKey, UsageLedger


@dataclass(frozen=True)
class ClusterSchedulerConfig:
    """Knobs of the scheduler.

    Args:
        model: the model name usage is charged to.
        policy: placement policy name (`cluster.placement.POLICIES`).
        policy_knobs: keyword arguments of the policy's class.
        queue: overall queue limit and Retry-After knobs.
        interactive_limits: when a replica can start an interactive request.
        batch_limits: the same for batch requests: held below a utilisation
            ceiling so that batch work only takes idle capacity.
        pending_ttl_s: a binding the replica never reports stops counting
            against its load after this long.
        replica_timeout_s: a replica silent this long gets no new requests.
        resync_retry_s: a stale replica is asked again for a snapshot after this long.
    """

    model: str = "default"
    policy: str = DEFAULT_POLICY
    policy_knobs: Mapping[str, object] = field(default_factory=dict)
    queue: QueueLimits = QueueLimits()
    interactive_limits: StartLimits = StartLimits()
    batch_limits: StartLimits = StartLimits(max_seq_util=0.75, max_kv_util=0.75)
    pending_ttl_s: float = 10.0
    replica_timeout_s: float = 30.0
    resync_retry_s: float = 5.0


@dataclass(slots=True, frozen=True)
class ReplicaReport:
    """What a replica sends: its load, its KV events, the requests that reached it."""

    # Unique for the replica's life (Serve's replica ids are never reused).
    replica_id: str
    # 0 at replica start, +1 per report; orders `events` (see cluster.kv_index).
    # NOTE: a replica whose engine restarts (its cache empty) keeps counting
    # and sends `replace_replica_index(replica_id, [], seq)`.
    seq: int
    load: ReplicaLoad
    # KV events since the previous report, oldest first (wire tuples or engine events).
    events: tuple[WireEvent, ...] = ()
    # ClusterScheduler request ids that reached the replica since its previous report.
    admitted_ids: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class ReportReply:
    """The scheduler's answer to a report."""

    # Send `replace_replica_index` with a full snapshot.
    resync: bool = False


@dataclass(slots=True, frozen=True)
class Ticket:
    """A queued request."""

    request_id: str
    tenant_id: str
    priority: Priority
    # Requests queued overall, this one included.
    queue_depth: int


@dataclass(slots=True, frozen=True)
class Assignment:
    """A request bound to a replica: the ingress sends it there now."""

    request_id: str
    replica_id: str
    tenant_id: str
    # Prompt tokens the index expects the replica to serve from its cache.
    cached_tokens: int
    # Seconds the request waited in the global queue.
    queued_s: float


@dataclass(slots=True, frozen=True)
class RequestUsage:
    """A finished request's token counts, as the replica reported them."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass(slots=True, frozen=True)
class ReplicaStats:
    replica_id: str
    # Reported load plus pending bindings.
    load: ReplicaLoad
    num_pending: int
    # Requests bound there and not finished.
    num_in_flight: int
    num_indexed_blocks: int
    stale_index: bool
    draining: bool
    seconds_since_report: float


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    policy: str
    num_queued_interactive: int
    num_queued_batch: int
    queued_by_tenant: dict[str, int]
    num_in_flight: int
    # Global queue plus every replica's own waiting requests (the autoscaler's signal).
    queue_depth: int
    replicas: tuple[ReplicaStats, ...]
    num_bound: int
    num_rejected: int
    # Requests bound per second, recently.
    drain_rate: float
    # Sums over bound requests: prompt tokens and the cached part the index predicted.
    bound_prompt_tokens: int
    predicted_cached_tokens: int
    # Sums over finished requests, as the replicas counted them.
    finished_prompt_tokens: int
    finished_cached_tokens: int
    index: IndexStats


@dataclass(slots=True)
class _Binding:
    """A request bound to a replica, until it finishes."""

    request: RouteRequest
    replica_id: str
    arrival: float
    bound_at: float
    # KV blocks and prefill tokens it takes there (counted while pending).
    blocks: int
    tokens: int
    pending: bool = True


@dataclass(slots=True)
class _Replica:
    load: ReplicaLoad
    last_report: float
    draining: bool = False
    # Bindings not yet reported by the replica, by request id.
    pending: dict[str, _Binding] = field(default_factory=dict)
    pending_blocks: int = 0
    pending_tokens: int = 0

    def effective_load(self) -> ReplicaLoad:
        return self.load.with_pending(len(self.pending), self.pending_blocks, self.pending_tokens)

    def add_pending(self, b: _Binding) -> None:
        self.pending[b.request.request_id] = b
        self.pending_blocks += b.blocks
        self.pending_tokens += b.tokens

    def end_pending(self, request_id: str) -> None:
        b = self.pending.pop(request_id, None)
        if b is not None:
            b.pending = False
            self.pending_blocks -= b.blocks
            self.pending_tokens -= b.tokens


class ClusterScheduler:
    """Global queue + exact KV index + replica loads + placement policy.

    Args:
        config: knobs (policy name, limits, timeouts).
        tenants: tenant records (weights, queue limits, prices); default: anonymous only.
    """

    def __init__(self, config: ClusterSchedulerConfig = ClusterSchedulerConfig(), tenants: TenantRegistry | None = None):
        self.config = config
        self.tenants = tenants or TenantRegistry()
        self.policy = make_policy(config.policy, **dict(config.policy_knobs))
        self.index = KVIndex(resync_retry_s=config.resync_retry_s)
        self.queue = GlobalQueue(config.queue)
        self.ledger = UsageLedger(self.tenants)
        self._replicas: dict[str, _Replica] = {}
        # Replicas that may hold pending bindings (a superset; see `_expire_pending`).
        self._pending_replicas: set[str] = set()
        # The replicas' effective loads as columns, kept current (see `_sync`).
        self._table = ReplicaTable()
        # Prompts of the requests bound and not finished (see `_matches`).
        self._running = RunningPrompts()
        self._bindings: dict[str, _Binding] = {}
        self._num_bound = 0
        self._num_rejected = 0
        self._bound_prompt_tokens = 0
        self._predicted_cached_tokens = 0
        self._finished_prompt_tokens = 0
        self._finished_cached_tokens = 0

    def reconfigure(self, config: ClusterSchedulerConfig, tenants: TenantRegistry | None = None) -> None:
        """Take new knobs (an app redeployed with other settings) and keep the index and queue.

        The policy object is replaced only when its name or knobs change, so
        a stateful policy (prefix_approx's tree) survives a no-op reconfigure.
        """
        if (config.policy, dict(config.policy_knobs)) != (self.config.policy, dict(self.config.policy_knobs)):
            self.policy = make_policy(config.policy, **dict(config.policy_knobs))
        self.config = config
        self.queue.limits = config.queue
        if tenants is not None:
            self.tenants = tenants
            self.ledger.registry = tenants

    # ---- requests ----------------------------------------------------------

    def submit(self, request: RouteRequest, now: float) -> Ticket | Rejection:
        """Queue a request for late binding, or reject it."""
        if request.request_id in self._bindings:
            return self._reject(
                Rejection(request.request_id, request.tenant_id, 400, "duplicate",
                          f"request id {request.request_id!r} is already running")
            )
        too_large = self._too_large(request)
        if too_large is not None:
            return self._reject(too_large)
        tenant = self.tenants.get(request.tenant_id)
        result = self.queue.submit(request, tenant.weight, tenant.max_queued, now)
        if isinstance(result, Rejection):
            return self._reject(result)
        return Ticket(request.request_id, request.tenant_id, request.priority, len(self.queue))

    def _reject(self, rejection: Rejection) -> Rejection:
        self._num_rejected += 1
        return rejection

    def _too_large(self, request: RouteRequest) -> Rejection | None:
        """A prompt no replica could ever hold (only checked once replicas are known)."""
        if not self._replicas:
            return None
        need = blocks_needed(request.num_prompt_tokens, request.block_size, 0)
        blocks = self._table.num_blocks
        room = int((blocks - np.floor(self.config.interactive_limits.kv_watermark * blocks)).max())
        if need <= room:
            return None
        return Rejection(
            request.request_id, request.tenant_id, 400, "too_large",
            f"prompt of {request.num_prompt_tokens} tokens needs {need} KV blocks; the largest replica has {room}",
        )

    def cancel(self, request_id: str) -> bool:
        """Drop a queued request (its client went away); False if it is not queued."""
        return self.queue.cancel(request_id) is not None

    def poll_assignments(self, now: float) -> list[Assignment]:
        """Bind every queued request some replica can start now, in fair order."""
        self._expire_pending(now)
        if not self._replicas or not len(self.queue):
            return []
        table = self._table
        eligible = table.eligible(now, self.config.replica_timeout_s)
        if not eligible.any():
            return []
        uses_kv = self.policy.uses_kv
        # Rows that could start some request (a one-token prompt, no utilisation ceiling): kept
        # current as requests bind, and dispatch stops when none is left.
        any_request = StartLimits(max_replica_waiting=self.config.interactive_limits.max_replica_waiting)
        room = eligible & has_slot(table, 1, any_request)
        out: list[Assignment] = []

        def try_place(item: QueuedRequest) -> str | None:
            req = item.request
            limits = self.config.batch_limits if req.priority is Priority.BATCH else self.config.interactive_limits
            matches = self._matches(req.block_hashes)
            cached, start = start_columns(req, table, matches, limits, check_kv=uses_kv)
            rid = self.policy.choose_columns(req, table, cached, start, eligible, now - item.arrival)
            if rid is None:
                return None
            assert rid in self._replicas, f"policy {self.policy.name} chose unknown replica {rid!r}"
            row = table.row(rid)
            num_cached = int(cached[row])
            binding = _Binding(
                request=req,
                replica_id=rid,
                arrival=item.arrival,
                bound_at=now,
                blocks=blocks_needed(req.num_prompt_tokens, req.block_size, num_cached),
                tokens=req.num_prompt_tokens - num_cached * req.block_size,
            )
            self._bind(binding)
            room[row] = has_slot(table.load(row), 1, any_request)
            self.policy.on_placed(req, rid)
            out.append(
                Assignment(req.request_id, rid, req.tenant_id, num_cached * req.block_size, now - item.arrival)
            )
            return rid

        self.queue.dispatch(try_place, now, lambda: bool(room.any()))
        return out

    def _matches(self, block_hashes: Sequence[bytes]) -> dict[str, int]:
        """Leading prompt blocks each replica has: cached (the index) or held by a request running there.

        The second term covers a prefill in progress: its blocks reach the
        index only after it (see `RunningPrompts`).
        """
        matches = self.index.matches(block_hashes)
        for rid, held in self._running.matches(block_hashes).items():
            if held > matches.get(rid, 0):
                matches[rid] = held
        return matches

    def _sync(self, replica_id: str) -> None:
        """The table takes the replica's effective load (after any change to it)."""
        self._table.set_load(replica_id, self._replicas[replica_id].effective_load())

    def _bind(self, b: _Binding) -> None:
        self._bindings[b.request.request_id] = b
        replica = self._replicas[b.replica_id]
        replica.add_pending(b)
        self._pending_replicas.add(b.replica_id)
        self._sync(b.replica_id)
        self._running.hold(b.replica_id, b.request.block_hashes)
        self._num_bound += 1
        self._bound_prompt_tokens += b.request.num_prompt_tokens
        self._predicted_cached_tokens += b.request.num_prompt_tokens - b.tokens

    def _expire_pending(self, now: float) -> None:
        ttl = self.config.pending_ttl_s
        for replica_id in list(self._pending_replicas):
            r = self._replicas.get(replica_id)
            if r is not None:
                expired = [rid for rid, b in r.pending.items() if now - b.bound_at > ttl]
                for rid in expired:
                    r.end_pending(rid)
                if expired:
                    self._sync(replica_id)
            if r is None or not r.pending:
                self._pending_replicas.discard(replica_id)

    def on_request_finished(self, request_id: str, usage: RequestUsage | None, now: float) -> bool:
        """A bound request ended (done, failed or aborted); charge its usage. False if unknown."""
        b = self._bindings.pop(request_id, None)
        if b is None:
            return False
        if b.replica_id in self._replicas:
            self._replicas[b.replica_id].end_pending(request_id)
            self._sync(b.replica_id)
            self._running.release(b.replica_id, b.request.block_hashes)
        if usage is not None:
            self.ledger.charge(
                b.request.tenant_id, self.config.model, b.replica_id,
                usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, max(0.0, now - b.bound_at),
            )
            self._finished_prompt_tokens += usage.prompt_tokens
            self._finished_cached_tokens += usage.cached_tokens
        return True

    # ---- replicas ----------------------------------------------------------

    def on_replica_report(self, report: ReplicaReport, now: float) -> ReportReply:
        """Take a replica's load, KV events and admitted requests (registers new replicas)."""
        replica = self._replicas.get(report.replica_id)
        if replica is None:
            replica = self._replicas[report.replica_id] = _Replica(report.load, now)
        replica.load = report.load
        replica.last_report = now
        for request_id in report.admitted_ids:
            replica.end_pending(request_id)
        result = self.index.apply(report.replica_id, report.seq, report.events, now)
        self._sync(report.replica_id)
        self._table.set_last_report(report.replica_id, now)
        self._table.set_indexed(report.replica_id, self.index.block_count(report.replica_id))
        return ReportReply(resync=result is ApplyResult.RESYNC)

    def replace_replica_index(self, replica_id: str, all_hashes: Iterable[bytes], seq: int) -> ReportReply:
        """A replica's full snapshot, as of its report `seq` (after a resync request)."""
        result = self.index.replace_replica(replica_id, all_hashes, seq)
        if replica_id in self._table:
            self._table.set_indexed(replica_id, self.index.block_count(replica_id))
        return ReportReply(resync=result is not ApplyResult.APPLIED)

    def set_draining(self, replica_id: str, draining: bool = True) -> None:
        """A draining replica finishes its requests but gets no new ones."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            raise ValueError(f"unknown replica {replica_id!r}; known: {sorted(self._replicas)}")
        replica.draining = draining
        self._table.set_draining(replica_id, draining)

    def remove_replica(self, replica_id: str) -> list[str]:
        """Forget a replica; returns the ids of requests bound there and not finished."""
        lost = [rid for rid, b in self._bindings.items() if b.replica_id == replica_id]
        for rid in lost:
            del self._bindings[rid]
        self._running.forget_replica(replica_id)
        self._replicas.pop(replica_id, None)
        self._table.remove(replica_id)
        self.index.remove_replica(replica_id)
        self.policy.remove_replica(replica_id)
        return lost

    def replica_ids(self) -> list[str]:
        return list(self._replicas)

    # ---- observability -----------------------------------------------------

    def queue_depth(self) -> int:
        """Global queue plus every replica's own waiting requests."""
        return len(self.queue) + sum(r.load.num_waiting for r in self._replicas.values())

    def stats(self, now: float) -> SchedulerStats:
        in_flight: dict[str, int] = {}
        for b in self._bindings.values():
            in_flight[b.replica_id] = in_flight.get(b.replica_id, 0) + 1
        counts = self.index.block_counts()
        replicas = tuple(
            ReplicaStats(
                replica_id=rid,
                load=r.effective_load(),
                num_pending=len(r.pending),
                num_in_flight=in_flight.get(rid, 0),
                num_indexed_blocks=counts.get(rid, 0),
                stale_index=self.index.is_stale(rid),
                draining=r.draining,
                seconds_since_report=now - r.last_report,
            )
            for rid, r in self._replicas.items()
        )
        return SchedulerStats(
            policy=self.policy.name,
            num_queued_interactive=self.queue.num_queued(Priority.INTERACTIVE),
            num_queued_batch=self.queue.num_queued(Priority.BATCH),
            queued_by_tenant=self.queue.queued_by_tenant(),
            num_in_flight=len(self._bindings),
            queue_depth=self.queue_depth(),
            replicas=replicas,
            num_bound=self._num_bound,
            num_rejected=self._num_rejected,
            drain_rate=self.queue.drain_rate(now),
            bound_prompt_tokens=self._bound_prompt_tokens,
            predicted_cached_tokens=self._predicted_cached_tokens,
            finished_prompt_tokens=self._finished_prompt_tokens,
            finished_cached_tokens=self._finished_cached_tokens,
            index=self.index.stats(),
        )

    def take_usage(self) -> dict[UsageKey, Usage]:
        """Usage charged since the last call (see `UsageLedger.take_usage`)."""
        return self.ledger.take_usage()
