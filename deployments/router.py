"""ReplicaRouter: the one place where the ingress picks a ModelReplica.

Today the pick is Serve's own (power of two choices over replicas' ongoing
requests, through a DeploymentHandle). The head-node scheduler (KV-aware,
late binding) replaces the body of `generate` and keeps its contract: take a
GenerateRequest, yield the chosen replica's events, and stop the replica's
work when the caller stops listening.

Serve's router refuses work past `max_queued_requests` with BackPressureError;
that becomes the same 429 the replicas' own admission gives (admission.py).
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from deployments.admission import queue_full
from deployments.events import GenerateRequest, ReplicaEvent


class ReplicaRouter:
    """Streams a request's events from a ModelReplica chosen through a DeploymentHandle.

    Args:
        handle: DeploymentHandle of the ModelReplica deployment.
        retry_after_s: Retry-After of the 429 when Serve's queue is full.
    """

    def __init__(self, handle: Any, retry_after_s: int):
        from ray.serve.exceptions import BackPressureError

        self._handle = handle
        self._stream = handle.options(stream=True)
        self._backpressure = BackPressureError
        self._retry_after_s = retry_after_s

    async def generate(self, request: GenerateRequest) -> AsyncIterator[ReplicaEvent]:
        """The replica's events for `request`; closing this early cancels it there."""
        response = self._stream.generate.remote(request)
        finished = False
        try:
            try:
                async for event in response:
                    yield event
            except self._backpressure:
                yield queue_full(self._retry_after_s, where="every replica")
            finished = True
        finally:
            if not finished:
                # The replica sees CancelledError at its next await and aborts the request.
                response.cancel()

    async def replica_stats(self) -> list[dict[str, Any]]:
        """Every running replica's `stats()`."""
        return list(await self._handle.broadcast("stats").results_async())
