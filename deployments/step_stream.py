"""One stream per (ingress, replica) pair that carries a whole engine step.

Without it every generated token crosses Ray Serve once per request: 64
streams decoding together are 64 gRPC messages per step between a replica
and the ingress, each with its own serialization, wake-ups and C++ work,
on the same cores as the model. vLLM's engine core sends its API server one
message per step for the same reason. Here:

- The request itself still goes through the ModelReplica handle
  (`generate`), so admission, Serve's routing and queue limits, cancellation
  (the client leaves: the call is cancelled, the replica aborts) and graceful
  shutdown are unchanged. A request sent with `subscriber` set gets its
  `Admitted` (or `Rejected`) on that call; its deltas go to the replica's
  `Outbox` for that subscriber, and the call ends when the request does.
- The ingress holds one `subscribe` call per replica (`StepStreams`): the
  replica yields, per wake-up, every (request id, event) its outbox gathered,
  which is one engine step's worth: the async engine hands a step's outputs
  to the event loop in one callback (engine/async_engine.py), so every
  request's delta is in the outbox before the subscriber runs.
- The ingress routes each batch's events to per-request queues. A
  subscription ends by itself once its outbox has stayed empty, with no
  request of its subscriber open, for `idle_s` (so a stopping replica is not
  held up); the ingress opens a new one with the next request there.

`Outboxes` is plain asyncio (the replica's side, tested without Ray);
`StepStreams` needs only a handle-like object with `options(stream=True)`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Optional

from shardline.deployments.events import Failed, ReplicaEvent

# How long a subscription with nothing to carry stays open.
IDLE_S = 2.0
# How long undelivered events of a subscriber that never (re)subscribes are kept.
ORPHAN_TTL_S = 120.0


@dataclass
class Subscription:
    """The argument of `subscribe`: who reads, and which replica must answer.

    `replica_hint` routes the call (serve_router.py reads it as it reads a
    GenerateRequest's); a replica that is not the hinted one answers
    `NotHere` and ends, since Serve routes elsewhere when the hinted replica
    has gone.
    """

    subscriber: str
    replica_hint: str


@dataclass(slots=True)
class NotHere:
    """The subscription reached another replica than the one it named."""

    replica_id: str


class Outbox:
    """Events for one subscriber, waiting for its `subscribe` call to take them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, ReplicaEvent]] = []
        self.open_requests = 0
        # Bumped by every new subscription: an older one then ends.
        self.generation = 0
        # Subscriptions reading it now (a superseded one until it notices).
        self.readers = 0
        self.last_taken = time.monotonic()
        self._waiters: list[asyncio.Future] = []

    def wake(self) -> None:
        """Let every waiting subscription look again."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def put(self, request_id: str, event: ReplicaEvent) -> None:
        self.items.append((request_id, event))
        self.wake()

    def request_ended(self) -> None:
        self.open_requests -= 1
        self.wake()  # an idle subscription may end now

    async def take(self, generation: int, idle_s: float) -> Optional[list[tuple[str, ReplicaEvent]]]:
        """Everything gathered so far (waiting for something); None when this
        subscription should end: superseded, or idle with no request open."""
        idle_since = time.monotonic()
        while True:
            if generation != self.generation:
                return None
            if self.items:
                items, self.items = self.items, []
                self.last_taken = time.monotonic()
                return items
            if self.open_requests <= 0 and time.monotonic() - idle_since >= idle_s:
                return None
            # A plain future, registered before anything else runs: no wake-up can be missed.
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(idle_s):
                    await waiter
            except TimeoutError:
                pass
            finally:
                self._waiters.remove(waiter)


class Outboxes:
    """A replica's outboxes, one per subscriber (ingress replica)."""

    def __init__(self, idle_s: float = IDLE_S, orphan_ttl_s: float = ORPHAN_TTL_S) -> None:
        self.idle_s = idle_s
        self.orphan_ttl_s = orphan_ttl_s
        self._boxes: dict[str, Outbox] = {}

    def get(self, subscriber: str) -> Outbox:
        """The subscriber's outbox (created on first use); forgets orphaned ones."""
        box = self._boxes.get(subscriber)
        if box is None:
            self._forget_orphans()
            box = self._boxes[subscriber] = Outbox()
        return box

    def _forget_orphans(self) -> None:
        now = time.monotonic()
        for name, box in list(self._boxes.items()):
            if not box.readers and box.open_requests <= 0 and now - box.last_taken > self.orphan_ttl_s:
                del self._boxes[name]

    def __len__(self) -> int:
        return len(self._boxes)

    async def stream(self, subscriber: str):
        """The batches for `subscriber`, until superseded or idle (an async generator)."""
        box = self.get(subscriber)
        box.generation += 1
        box.wake()  # a previous subscription sees it is superseded
        generation = box.generation
        box.readers += 1
        try:
            while True:
                items = await box.take(generation, self.idle_s)
                if items is None:
                    return
                yield items
        finally:
            box.readers -= 1
            box.last_taken = time.monotonic()


class StepStreams:
    """The ingress's side: one subscription per replica, events routed to each request's queue.

    Args:
        handle: the ModelReplica DeploymentHandle (anything with
            `options(stream=True).subscribe.remote(Subscription)`).
        subscriber: this ingress's id (its Serve replica id).
    """

    def __init__(self, handle: Any, subscriber: str) -> None:
        self._subscribe = handle.options(stream=True).subscribe
        self.subscriber = subscriber
        self._readers: dict[str, asyncio.Task] = {}
        # request id -> (its replica, its queue)
        self._open: dict[str, tuple[str, asyncio.Queue]] = {}
        self.num_subscriptions = 0

    def open(self, request_id: str) -> asyncio.Queue:
        """The queue `request_id`'s events will arrive in (open it before sending the request)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._open[request_id] = ("", queue)
        return queue

    def bind(self, request_id: str, replica_id: str) -> None:
        """`request_id` runs on `replica_id` (its Admitted said so): make sure that replica is read."""
        entry = self._open.get(request_id)
        if entry is not None:
            self._open[request_id] = (replica_id, entry[1])
        self._ensure(replica_id)

    def close(self, request_id: str) -> None:
        self._open.pop(request_id, None)

    def _ensure(self, replica_id: str) -> None:
        task = self._readers.get(replica_id)
        if task is None or task.done():
            self._readers[replica_id] = asyncio.get_running_loop().create_task(self._read(replica_id))

    def _waiting_on(self, replica_id: str) -> list[asyncio.Queue]:
        return [queue for rid, queue in self._open.values() if rid == replica_id]

    async def _read(self, replica_id: str) -> None:
        self.num_subscriptions += 1
        me = asyncio.current_task()
        error: Optional[str] = None
        try:
            async for batch in self._subscribe.remote(Subscription(self.subscriber, replica_id)):
                if isinstance(batch, NotHere):
                    error = f"replica {replica_id} is gone"
                    break
                for request_id, event in batch:
                    entry = self._open.get(request_id)
                    if entry is not None:
                        entry[1].put_nowait(event)
        except Exception as e:  # the replica died or could not be reached (CancelledError passes: not an Exception)
            error = f"lost the stream from replica {replica_id}: {type(e).__name__}: {e}"
        finally:
            if self._readers.get(replica_id) is me:
                del self._readers[replica_id]
        waiting = self._waiting_on(replica_id)
        if error is not None:
            for queue in waiting:
                queue.put_nowait(Failed(error))
        elif waiting:
            self._ensure(replica_id)  # it ended idle just as a request started there

    async def aclose(self) -> None:
        for task in list(self._readers.values()):
            task.cancel()
        self._readers.clear()
