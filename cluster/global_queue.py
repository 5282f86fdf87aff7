"""The global queue: late binding, weighted fair share across tenants, two priorities.

Plain Python; the clock is an argument. Requests wait here, not on replicas:
`dispatch(try_place, now)` offers queued requests to a placement callback,
and a request leaves the queue only when the callback binds it to a replica
that can start it now (late binding). Whatever order requests arrive in, the
callback sees them in fair order:

Fairness: start-time fair queuing (SFQ, Goyal et al. 1996) over tenants,
one FIFO per tenant. A request gets a start tag `S = max(V, F_prev)` and a
finish tag `F = S + cost / weight` when it arrives, where `F_prev` is the
finish tag of the tenant's previous request, `V` the start tag of the last
request dispatched, `cost` = prompt tokens + max_tokens (at least 1), and
`weight` comes from the tenant record. Dispatch offers tenants' heads by
smallest start tag. A backlogged tenant so receives service in proportion to
its weight however many requests it queues, and a tenant returning from idle
starts at `V`: it cannot bank credit while away. A head that cannot be placed
now (its replicas are full, or it waits for its cached replica) skips its
tenant for the rest of this dispatch round; FIFO order within a tenant holds.

Priorities: one SFQ per class. Interactive requests are offered first; batch
requests only when no interactive request is left queued after that pass
(the scheduler also holds batch work below a utilisation ceiling).

Admission: past `max_queued` requests overall, or past the tenant's own
limit, `submit` returns a `Rejection` (HTTP 429) whose Retry-After is the
time the queue needs to drain the excess at its recent dispatch rate.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from shardline.cluster.placement import Priority, RouteRequest


@dataclass(slots=True, frozen=True)
class Rejection:
    """A request turned away: the ingress answers `status` with Retry-After."""

    request_id: str
    tenant_id: str
    # HTTP status: 429 (queue full), 400 (can never run), 503 (shutting down).
    status: int
    # Machine-readable: "queue_full", "tenant_queue_full", "too_large", "duplicate".
    reason: str
    message: str
    # Whole seconds, for the Retry-After header; 0 when retrying will not help.
    retry_after_s: int = 0


@dataclass(slots=True)
class QueuedRequest:
    """A request waiting in the global queue."""

    request: RouteRequest
    # Clock time of `submit`.
    arrival: float
    # SFQ tags (virtual time).
    start_tag: float
    finish_tag: float


@dataclass(slots=True)
class _TenantQueue:
    """One tenant's FIFO in one priority class."""

    items: deque[QueuedRequest] = field(default_factory=deque)
    # Finish tag of the tenant's last arrival.
    last_finish: float = 0.0


class _RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._times: deque[float] = deque()

    def record(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        return len(self._times) / self.window_s

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()


class FairQueue:
    """Start-time fair queuing over tenants for one priority class."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantQueue] = {}
        self._vtime = 0.0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, request: RouteRequest, weight: float, now: float) -> QueuedRequest:
        tq = self._tenants.get(request.tenant_id)
        if tq is None:
            tq = self._tenants[request.tenant_id] = _TenantQueue()
        cost = max(1, request.num_prompt_tokens + request.max_tokens)
        start = max(self._vtime, tq.last_finish)
        item = QueuedRequest(request, now, start, start + cost / weight)
        tq.last_finish = item.finish_tag
        tq.items.append(item)
        self._len += 1
        return item

    def tenant_len(self, tenant_id: str) -> int:
        tq = self._tenants.get(tenant_id)
        return len(tq.items) if tq else 0

    def tenant_lens(self) -> dict[str, int]:
        return {t: len(tq.items) for t, tq in self._tenants.items() if tq.items}

    def remove(self, request_id: str, tenant_id: str) -> QueuedRequest | None:
        tq = self._tenants.get(tenant_id)
        if tq is None:
            return None
        for item in tq.items:
            if item.request.request_id == request_id:
                tq.items.remove(item)
                self._len -= 1
                return item
        return None

    def offer(self) -> Iterator[QueuedRequest]:
        """Tenants' heads in start-tag order; after a head is yielded, the caller
        either calls `pop_head(tenant)` (bound) or not (skip the tenant)."""
        idle = [t for t, tq in self._tenants.items() if not tq.items and tq.last_finish <= self._vtime]
        for t in idle:  # their next start tag is V anyway: forget them
            del self._tenants[t]
        heap = [(tq.items[0].start_tag, t) for t, tq in self._tenants.items() if tq.items]
        heapq.heapify(heap)
        while heap:
            _, tenant = heapq.heappop(heap)
            tq = self._tenants[tenant]
            head = tq.items[0]
            yield head
            if tq.items and tq.items[0] is not head:  # bound: offer the next one
                heapq.heappush(heap, (tq.items[0].start_tag, tenant))

    def pop_head(self, tenant_id: str) -> QueuedRequest:
        tq = self._tenants[tenant_id]
        item = tq.items.popleft()
        self._len -= 1
        self._vtime = max(self._vtime, item.start_tag)
        return item


@dataclass(slots=True, frozen=True)
class QueueLimits:
    """Admission limits of the global queue."""

    # Requests queued overall (both classes).
    max_queued: int = 4096
    # Window of the dispatch-rate meter behind Retry-After.
    rate_window_s: float = 10.0
    # Retry-After when nothing drained in the window.
    default_retry_after_s: int = 5
    max_retry_after_s: int = 60


class GlobalQueue:
    """Two fair queues (interactive, batch) with admission control.

    Args:
        limits: overall queue limit and Retry-After knobs.
    """

    def __init__(self, limits: QueueLimits = QueueLimits()):
        self.limits = limits
        self._classes = {Priority.INTERACTIVE: FairQueue(), Priority.BATCH: FairQueue()}
        # request id -> its class and tenant.
        self._where: dict[str, tuple[Priority, str]] = {}
        self._rate = _RateMeter(limits.rate_window_s)
        self._tenant_rates: dict[str, _RateMeter] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._where

    def num_queued(self, priority: Priority | None = None) -> int:
        if priority is None:
            return len(self._where)
        return len(self._classes[priority])

    def tenant_queued(self, tenant_id: str) -> int:
        return sum(q.tenant_len(tenant_id) for q in self._classes.values())

    def queued_by_tenant(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for q in self._classes.values():
            for t, n in q.tenant_lens().items():
                out[t] = out.get(t, 0) + n
        return out

    def submit(
        self, request: RouteRequest, weight: float, tenant_max_queued: int, now: float
    ) -> QueuedRequest | Rejection:
        """Queue a request, or reject it when the queue or the tenant's share is full."""
        if request.request_id in self._where:
            return Rejection(
                request.request_id, request.tenant_id, 400, "duplicate",
                f"request id {request.request_id!r} is already queued",
            )
        if weight <= 0:
            raise ValueError(f"tenant {request.tenant_id!r}: weight must be positive, got {weight}")
        total = len(self._where)
        if total >= self.limits.max_queued:
            retry = self._retry_after(total - self.limits.max_queued + 1, self._rate.rate(now))
            return Rejection(
                request.request_id, request.tenant_id, 429, "queue_full",
                f"the server queue is full ({total} requests waiting); retry in {retry} s", retry,
            )
        mine = self.tenant_queued(request.tenant_id)
        if mine >= tenant_max_queued:
            meter = self._tenant_rates.get(request.tenant_id)
            retry = self._retry_after(mine - tenant_max_queued + 1, meter.rate(now) if meter else 0.0)
            return Rejection(
                request.request_id, request.tenant_id, 429, "tenant_queue_full",
                f"tenant {request.tenant_id!r} has {mine} requests waiting, its limit; retry in {retry} s", retry,
            )
        item = self._classes[request.priority].push(request, weight, now)
        self._where[request.request_id] = (request.priority, request.tenant_id)
        return item

    def _retry_after(self, excess: int, rate: float) -> int:
        if rate <= 0:
            return self.limits.default_retry_after_s
        return max(1, min(self.limits.max_retry_after_s, math.ceil(excess / rate)))

    def cancel(self, request_id: str) -> QueuedRequest | None:
        """Take a queued request out (its client went away)."""
        where = self._where.pop(request_id, None)
        if where is None:
            return None
        priority, tenant = where
        return self._classes[priority].remove(request_id, tenant)

    def dispatch(
        self,
        try_place: Callable[[QueuedRequest], str | None],
        now: float,
        has_room: Callable[[], bool] = lambda: True,
    ) -> list[tuple[QueuedRequest, str]]:
        """Offer queued requests in fair order; bind those `try_place` places.

        `try_place` returns a replica id (bound: the request leaves the queue)
        or None (the tenant is skipped for this round). `has_room` stops the
        round early once no replica has a free slot.
        """
        bound: list[tuple[QueuedRequest, str]] = []
        for priority in (Priority.INTERACTIVE, Priority.BATCH):
            if priority is Priority.BATCH and len(self._classes[Priority.INTERACTIVE]):
                break  # batch takes only idle capacity
            fq = self._classes[priority]
            for head in fq.offer():
                if not has_room():
                    return bound
                replica_id = try_place(head)
                if replica_id is None:
                    continue
                fq.pop_head(head.request.tenant_id)
                del self._where[head.request.request_id]
                self._record(head.request.tenant_id, now)
                bound.append((head, replica_id))
        return bound

    def _record(self, tenant_id: str, now: float) -> None:
        self._rate.record(now)
        meter = self._tenant_rates.get(tenant_id)
        if meter is None:
            meter = self._tenant_rates[tenant_id] = _RateMeter(self.limits.rate_window_s)
        meter.record(now)

    def drain_rate(self, now: float) -> float:
        """Requests dispatched per second over the rate window."""
        return self._rate.rate(now)
