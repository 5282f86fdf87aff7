"""Queue-limit admission: the one rule that turns load into 429 + Retry-After.

A replica runs up to `max_num_seqs` requests in its batch; the rest wait in
its engine's queue. A new request is refused when it would make more than
`max_queue_len` requests wait at that replica.

The waiting count is the larger of two views: what the replica has accepted
beyond a full batch (exact and current, but blind to a batch held back by a
full KV cache) and what the engine reported waiting after its last step
(sees the KV limit, but is one step old). A burst of arrivals is thus counted
at once, and a cache-bound replica still reads as loaded.

The replica applies the rule to its own load (replica.py); Serve's router
applies the same limit to requests it could not hand to any replica
(`max_queued_requests`, answered with the same 429 in router.py). A later
head-node scheduler replaces the per-replica view with a global queue but
keeps this contract. Pure: load in, decision out; no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

from shardline.deployments.events import Rejected


@dataclass(frozen=True, slots=True)
class AdmissionLoad:
    """One replica's load, as admission, routing and `shardline status` read it."""

    # Requests the replica accepted and has not finished.
    num_inflight: int
    # The replica's batch limit (EngineConfig.max_num_seqs).
    max_num_seqs: int
    # Running and waiting requests as of the engine's last step.
    num_running: int = 0
    num_engine_waiting: int = 0
    num_free_blocks: int = 0
    num_blocks: int = 0

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not (yet) in the running batch."""
        beyond_batch = self.num_inflight - self.max_num_seqs
        return max(0, min(self.num_inflight, max(beyond_batch, self.num_engine_waiting)))

    def plus_one(self) -> "AdmissionLoad":
        """The load once one more request is accepted (it queues behind any waiting one)."""
        waiting = self.num_engine_waiting + 1 if self.num_engine_waiting else 0
        return replace(self, num_inflight=self.num_inflight + 1, num_engine_waiting=waiting)


def queue_full(retry_after_s: int, where: str = "the replica") -> Rejected:
    """The 429 every queue limit answers with."""
    return Rejected(
        429,
        f"server is busy: the request queue of {where} is full; retry after {retry_after_s} s",
        retry_after_s=retry_after_s,
    )


def admit(load: AdmissionLoad, max_queue_len: int, retry_after_s: int) -> Optional[Rejected]:
    """None to admit one more request, or the 429 to answer with."""
    if load.plus_one().queue_depth > max_queue_len:
        return queue_full(retry_after_s)
    return None
