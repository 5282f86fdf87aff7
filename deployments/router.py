"""ReplicaRouter: the one place where the ingress picks a ModelReplica.

With a head-node scheduler (the default), one request goes:

1. hash the prompt's full blocks with the engine's own function and the
   tenant's salt (`engine.kv_cache.hash_prompt_blocks`), so the hashes equal
   the replicas' bit for bit;
2. `await link.place(RouteRequest)` (every place and notice of one event-loop
   turn goes to the scheduler as one call): the request waits in the global
   queue until some replica can start it, and comes back bound to the best
   one (`Assignment`), or refused (`Rejection`: 429 with Retry-After, 400 or
   503, answered as the replica's own rejections are);
3. send it through the ModelReplica handle with the chosen replica's id in
   `replica_hint`: Serve's request router (serve_router.py) delivers it there;
   the call answers Admitted or Rejected, and the deltas come back on this
   ingress's step stream from that replica (step_stream.py), or on the call
   itself when the step stream is off;
4. when the stream ends, however it ends, `finished(id, usage)`; a request
   whose client leaves while it is queued is cancelled in the queue.

If the scheduler cannot be reached (dead, restarting, or a Ray error), the
request goes without a hint, so Serve's power of two choices picks the
replica, and serving goes on; the link retries the scheduler a moment later.
Without a scheduler (`scheduler=None`) every request goes that way.

Serve's router refuses work past `max_queued_requests` with BackPressureError;
that becomes the same 429 the replicas' own admission gives (admission.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Optional

from shardline.cluster.global_queue import Rejection
from shardline.cluster.placement import Priority, RouteRequest
from shardline.cluster.scheduler import Assignment, RequestUsage
from shardline.deployments.admission import queue_full
from shardline.deployments.events import Admitted, Delta, Failed, GenerateRequest, Rejected, ReplicaEvent
from shardline.deployments.step_stream import StepStreams
from shardline.engine.kv_cache import hash_prompt_blocks


def salt_keys(cache_salt: Optional[str | bytes]) -> tuple[bytes, ...]:
    """The engine's `extra_keys` for a salt, encoded exactly as the engine encodes it (str -> UTF-8)."""
    if not cache_salt:
        return ()
    return (cache_salt.encode() if isinstance(cache_salt, str) else bytes(cache_salt),)


def route_request(request: GenerateRequest, block_size: int, with_text: bool = False) -> RouteRequest:
    """What the scheduler needs to place `request`.

    With `with_text` (the prefix_approx policy) the prompt "text" is one
    character per token id: the character-prefix tree then matches token
    prefixes, as SGLang's router matches text, without any cache knowledge.
    """
    ids = request.prompt_token_ids
    params = request.params
    return RouteRequest(
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        block_hashes=tuple(hash_prompt_blocks(ids, block_size, salt_keys(request.cache_salt))),
        block_size=block_size,
        num_prompt_tokens=len(ids),
        max_tokens=(params.max_tokens or 0) * max(1, params.n),
        priority=Priority(request.priority),
        prompt_text="".join(map(chr, ids)) if with_text else "",
    )


def rejected(r: Rejection) -> Rejected:
    """The scheduler's refusal as the replica-style event the service answers with."""
    retry = r.retry_after_s if r.status in (429, 503) and r.retry_after_s else None
    param = "prompt" if r.reason == "too_large" else None
    return Rejected(r.status, r.message, param, retry)


class _Usage:
    """Token counts of one request, from the events that passed through."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.admitted = False

    def see(self, event: ReplicaEvent) -> None:
        if isinstance(event, Admitted):
            self.admitted = True
        elif isinstance(event, Delta):
            self.cached_tokens = max(self.cached_tokens, event.num_cached_tokens)
            self.completion_tokens += sum(len(c.token_ids) for c in event.choices)

    def final(self) -> Optional[RequestUsage]:
        if not self.admitted:
            return None
        return RequestUsage(self.prompt_tokens, min(self.cached_tokens, self.prompt_tokens), self.completion_tokens)


async def _watch(response: Any, queue: asyncio.Queue) -> None:
    """Run out a request's own call (it ends with the request); its error fails the request."""
    try:
        async for _ in response:
            pass
    except Exception as e:  # the replica died: the step stream may never say so for this request
        queue.put_nowait(Failed(f"replica call failed: {type(e).__name__}: {str(e).strip()[:200]}"))


class ReplicaRouter:
    """Streams a request's events from the ModelReplica the scheduler chose.

    Args:
        handle: DeploymentHandle of the ModelReplica deployment.
        retry_after_s: Retry-After of the 429 when Serve's queue is full.
        scheduler: a `deployments.scheduling.SchedulerLink`, or None for Serve's own routing.
        block_size: the replicas' KV block size (hashes are per block).
        with_text: send prompt text too (the prefix_approx policy reads it).
    """

    def __init__(
        self,
        handle: Any,
        retry_after_s: int,
        scheduler: Any = None,
        block_size: int = 16,
        with_text: bool = False,
        step_streams: Optional[StepStreams] = None,
    ):
        from ray.serve.exceptions import BackPressureError

        self._handle = handle
        self._stream = handle.options(stream=True)
        self._backpressure = BackPressureError
        self._retry_after_s = retry_after_s
        self.scheduler = scheduler
        self.block_size = block_size
        self.with_text = with_text
        self.step_streams = step_streams
        # Requests routed by the scheduler, and without it (it was unreachable).
        self.num_scheduled = 0
        self.num_fallback = 0

    async def generate(self, request: GenerateRequest) -> AsyncIterator[ReplicaEvent]:
        """The replica's events for `request`; closing this early cancels it there (or in the queue)."""
        placed = await self._place(request)
        if isinstance(placed, Rejection):
            yield rejected(placed)
            return
        if placed is not None:
            request.replica_hint = placed.replica_id
            request.expected_cached_tokens = placed.cached_tokens
            self.num_scheduled += 1
        else:
            self.num_fallback += 1
        usage = _Usage(len(request.prompt_token_ids))
        events = self._events(request) if self.step_streams is None else self._step_stream_events(request)
        try:
            async for event in events:
                usage.see(event)
                yield event
        finally:
            await events.aclose()  # left early: cancels the request at its replica
            if placed is not None:
                self.scheduler.notify("finished", request.request_id, usage.final())

    async def _events(self, request: GenerateRequest) -> AsyncIterator[ReplicaEvent]:
        """Every event on the request's own call."""
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

    async def _step_stream_events(self, request: GenerateRequest) -> AsyncIterator[ReplicaEvent]:
        """Admitted (or Rejected) on the request's own call, then its deltas from the replica's step stream."""
        streams = self.step_streams
        queue = streams.open(request.request_id)
        request.subscriber = streams.subscriber
        response = self._stream.generate.remote(request)
        watcher: Optional[asyncio.Task] = None
        finished = False
        try:
            try:
                first = await response.__anext__()
            except self._backpressure:
                first = queue_full(self._retry_after_s, where="every replica")
            except StopAsyncIteration:
                first = Failed("the replica ended the request without answering")
            yield first
            if not isinstance(first, Admitted):
                finished = True
                return
            streams.bind(request.request_id, first.replica_id)
            watcher = asyncio.get_running_loop().create_task(_watch(response, queue))
            while True:
                event = await queue.get()
                yield event
                if isinstance(event, Failed) or (isinstance(event, Delta) and event.finished):
                    break
            finished = True
        finally:
            streams.close(request.request_id)
            if watcher is not None:
                watcher.cancel()
            if not finished:
                response.cancel()

    async def _place(self, request: GenerateRequest) -> Assignment | Rejection | None:
        """The scheduler's answer, or None to route without it."""
        from shardline.deployments.scheduling import SchedulerUnavailable

        link = self.scheduler
        if link is None or not link.available():
            return None
        try:
            return await link.place(route_request(request, self.block_size, self.with_text))
        except SchedulerUnavailable:
            return None
        except BaseException:  # the client left (or the deadline passed) while the request was queued
            link.notify("cancel", request.request_id)
            link.notify("finished", request.request_id, None)  # in case it was bound just then
            raise

    async def replica_stats(self) -> list[dict[str, Any]]:
        """Every running replica's `stats()`."""
        return list(await self._handle.broadcast("stats").results_async())
