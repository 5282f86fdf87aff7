"""Serve's request router for ModelReplica: send each request where the scheduler placed it.

The ingress (router.py) asks the head-node scheduler for a replica, writes the
chosen Serve replica id into the request (`GenerateRequest.replica_hint`) and
calls the ModelReplica deployment handle. This router, installed on the
ModelReplica deployment through `request_router_config` (app.py), reads the
hint from the pending request's first argument and offers that replica alone.
Without a hint (the scheduler was unreachable), or when the hinted replica is
not among the running ones (it died or is stopping), it does what Serve's
default router does: power of two choices on queue length.

NOTE: the base `RequestRouter` hands a chosen replica to the very request it
was chosen for (matched by internal request id). `FIFOMixin` would hand it to
the oldest pending request instead, sending other requests to this one's
cached replica, so this router must not use it.
"""

from __future__ import annotations

import random
from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def replica_hint(pending_request: Optional[PendingRequest]) -> Optional[str]:
    """The replica id the scheduler chose for this request, if any."""
    if pending_request is None or not pending_request.args:
        return None
    hint: Any = getattr(pending_request.args[0], "replica_hint", None)
    return hint if isinstance(hint, str) else None


def pow2_candidates(candidates: List[RunningReplica], rng: random.Random) -> List[List[RunningReplica]]:
    """Two random replicas as one rank: Serve picks the one with the shorter queue."""
    if len(candidates) <= 2:
        return [list(candidates)] if candidates else []
    return [rng.sample(candidates, 2)]


class ScheduledRequestRouter(RequestRouter):
    """Follows the head-node scheduler's choice; power of two choices without one."""

    def initialize_state(self, seed: Optional[int] = None, **kwargs: Any) -> None:
        self._rng = random.Random(seed)

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        hint = replica_hint(pending_request)
        if hint is not None:
            for replica in candidate_replicas:
                if replica.replica_id.unique_id == hint:
                    return [[replica]]
        return pow2_candidates(candidate_replicas, getattr(self, "_rng", random))
