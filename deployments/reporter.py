"""ReplicaReporter: a replica's load, KV events and admitted requests, to the scheduler.

Plain asyncio over two small interfaces, so tests drive it without Ray:

- the replica: `routing_load()`, `take_admitted()`, and its engine's
  `take_kv_events()` and `engine.cached_block_hashes()` (replica.py);
- the link: `await call(method, *args, timeout_s=...)`, raising
  `SchedulerUnavailable` when the scheduler cannot be reached (scheduling.py).

Every `interval_s`, and at once when the replica pokes it (a request got its
first output, so its prompt blocks are cached; or a request ended), the
reporter drains the engine's KV events and sends one `ReplicaReport` if
anything changed (events, admitted ids, load), and at least every
`heartbeat_s` (the scheduler stops placing on a silent replica). Pokes are
coalesced: at most one report per `min_gap_s`.
Reports are numbered by `seq`, +1 per report built, sent or not: a report
that never arrives leaves a gap, the scheduler drops the replica's index
entries and asks for a snapshot (`reply.resync`), and the reporter sends
`replace_replica_index` with every hash the engine caches. A restarted
scheduler, seeing a replica it does not know at `seq > 0`, asks the same way,
so its index rebuilds itself from the replicas.

NOTE: the snapshot is taken after the report `seq` it answers, so it may
already hold blocks whose events travel in a later report. The index replays
those batches after the snapshot; storing a hash twice or removing a hash it
lacks is harmless, so the result is exact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

from shardline.cluster.kv_index import to_wire
from shardline.cluster.scheduler import ReplicaReport

logger = logging.getLogger(__name__)


class ReplicaReporter:
    """Reports one replica to the scheduler in small batches.

    Args:
        replica_id: the Serve replica id the scheduler routes to.
        replica: the ModelReplica (see the module docstring for what it must have).
        link: the scheduler link (`call`, `notify`).
        interval_s: how often to look for news.
        heartbeat_s: longest silence.
        min_gap_s: shortest time between two reports.
        timeout_s: a report not answered within this long counts as lost.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        replica_id: str,
        replica: Any,
        link: Any,
        interval_s: float = 0.05,
        heartbeat_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        min_gap_s: float = 0.005,
    ):
        self.replica_id = replica_id
        self.replica = replica
        self.link = link
        self.interval_s = interval_s
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.min_gap_s = min_gap_s
        self._clock = clock
        self._wake: Optional[asyncio.Event] = None
        self.seq = 0
        self._last_load: Any = None
        self._last_sent = float("-inf")
        self._task: Optional[asyncio.Task] = None
        # Counters for tests and logs.
        self.num_sent = 0
        self.num_lost = 0
        self.num_snapshots = 0

    def start(self) -> bool:
        """Run in this thread's event loop until `stop`; False when no loop runs here."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return True

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def poke(self) -> None:
        """Report soon: the replica's cache or load just changed (call on the reporter's loop)."""
        if self._wake is not None:
            self._wake.set()

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            self._wake.clear()
            try:
                await self.report_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not stop the reports for good
                logger.exception("replica %s: report failed", self.replica_id)
            await asyncio.sleep(self.min_gap_s)
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, self.interval_s - self.min_gap_s))
            except asyncio.TimeoutError:
                pass

    async def report_once(self, force: bool = False) -> bool:
        """Send one report if there is news (or `force`); True when the scheduler took it."""
        from shardline.deployments.scheduling import SchedulerUnavailable

        events = tuple(to_wire(e) for e in self.replica.engine.take_kv_events())
        admitted = tuple(self.replica.take_admitted())
        load = self.replica.routing_load()
        now = self._clock()
        quiet = not events and not admitted and load == self._last_load
        if quiet and not force and now - self._last_sent < self.heartbeat_s:
            return False
        report = ReplicaReport(self.replica_id, self.seq, load, events, admitted)
        self.seq += 1
        self._last_load, self._last_sent = load, now
        try:
            reply = await self.link.call("report", report, timeout_s=self.timeout_s)
        except SchedulerUnavailable:
            # Its events are lost: the next report's seq shows the gap, and the
            # scheduler asks for a snapshot then.
            self.num_lost += 1
            return False
        self.num_sent += 1
        if reply.resync:
            await self._send_snapshot(report.seq)
        return True

    async def _send_snapshot(self, seq: int) -> None:
        from shardline.deployments.scheduling import SchedulerUnavailable

        hashes = self.replica.engine.engine.cached_block_hashes()
        try:
            await self.link.call("replace_replica_index", self.replica_id, hashes, seq, timeout_s=self.timeout_s)
            self.num_snapshots += 1
        except SchedulerUnavailable:
            pass  # the scheduler asks again at a later report

    def leave(self) -> None:
        """The replica is going away: the scheduler forgets it (best effort)."""
        self.stop()
        self.link.notify("remove_replica", self.replica_id)
