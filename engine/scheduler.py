"""Iteration-level scheduler (continuous batching) over a paged KV cache.

Plain Python. Each `schedule()` call builds one step under two budgets,
`max_num_batched_tokens` and `max_num_seqs`:

1. Running requests first, oldest first: one token for a decode, the next
   chunk for a request still in prefill. When the pool is short, the newest
   running request is preempted (its blocks freed, recomputed later from the
   prefix cache) until the older one fits.
2. Then waiting requests, first come first served: prefix-cache hits are
   looked up, and the rest of the prompt is scheduled, chunked to the budget
   when `enable_chunked_prefill`.

`update_from_output()` appends the sampled tokens and applies stop conditions.
Policy (what runs) lives here; mechanism (which blocks) lives in
`KVCacheManager`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from shardline.engine.kv_cache import BlockId, KVCacheManager, KVEvent
from shardline.engine.request import Request, RequestStatus


@dataclass(slots=True)
class SchedulerConfig:
    """Budgets for one step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.max_model_len < 2:
            raise ValueError(f"invalid scheduler budgets: {self}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step."""

    request: Request
    # First position computed this step (tokens before it are in the cache).
    start_pos: int
    num_new_tokens: int
    # The full block table after allocation.
    block_ids: list[BlockId]
    # True when this step reaches the end of the known tokens: sample one.
    sample: bool


@dataclass(slots=True)
class SchedulerOutput:
    """What the model runner executes in one step."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    # Requests preempted while building this step.
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides which requests run each step and keeps their KV blocks."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager):
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Requests finished inside the scheduler since the last `take_finished()`.
        self._finished: list[Request] = []

    # ---- admission -------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a validated request (see `check_fits`)."""
        assert request.request_id not in self.requests, f"duplicate request id {request.request_id}"
        request.init_block_hashes(self.kv.block_size)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def check_fits(self, num_prompt_tokens: int) -> str | None:
        """Why a prompt of this length can never run, or None when it can."""
        if num_prompt_tokens >= self.config.max_model_len:
            return (
                f"prompt has {num_prompt_tokens} tokens; this model's context is "
                f"{self.config.max_model_len} tokens, which must also hold at least one generated token"
            )
        if not self.kv.can_fit_alone(num_prompt_tokens + 1):
            return (
                f"prompt of {num_prompt_tokens} tokens needs more KV blocks than the whole cache holds "
                f"({self.kv.num_blocks} blocks of {self.kv.block_size} tokens)"
            )
        return None

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop on a stop string) requests wherever they are."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    # ---- scheduling ------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Build the next step: running requests first, then waiting ones."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        out.num_batched_tokens = sum(s.num_new_tokens for s in out.scheduled)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, f"running request {request.request_id} has nothing to compute"
            while not self._allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                self._add_scheduled(out, request, num_new)
                budget -= num_new
                i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self.kv.get_computed_blocks(request.block_hashes, request.num_tokens)
            num_cached = len(hits) * self.kv.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            request.num_computed_tokens = num_cached
            if not self._allocate(request, num_new, hits):
                request.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_scheduled(out, request, num_new)
            budget -= num_new

    def _allocate(self, request: Request, num_new: int, hits: Sequence[BlockId] = ()) -> bool:
        return self.kv.allocate_slots(
            request.request_id, request.num_computed_tokens, num_new, request.block_hashes, hits
        )

    def _add_scheduled(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        out.scheduled.append(
            ScheduledRequest(
                request=request,
                start_pos=start,
                num_new_tokens=num_new,
                block_ids=self.kv.block_ids(request.request_id),
                sample=request.num_computed_tokens == request.num_tokens,
            )
        )

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks; it recomputes from the prefix cache later.

        A request that cannot fit even with every other request preempted
        would preempt itself forever: it finishes with "length" instead.
        """
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        if not self.running and not self.kv.can_fit_alone(request.num_tokens + 1):
            self._finish(request, RequestStatus.FINISHED_LENGTH, free=False)
            return
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)

    # ---- results ---------------------------------------------------------

    def update_from_output(self, out: SchedulerOutput, sampled: Sequence[int | None]) -> list[Request]:
        """Append sampled tokens (aligned with `out.scheduled`); return requests that got one."""
        updated = []
        for sched, token_id in zip(out.scheduled, sampled, strict=True):
            request = sched.request
            if not sched.sample or request.is_finished:
                continue
            assert token_id is not None
            request.append_output_token(token_id)
            updated.append(request)
            status = self._check_stop(request, token_id)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        if request.num_output_tokens >= request.min_tokens and token_id in request.stop_token_ids:
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus, free: bool = True) -> None:
        if free:
            self.kv.free(request.request_id)
        request.status = status
        del self.requests[request.request_id]
        self._finished.append(request)

    def take_finished(self) -> list[Request]:
        """Requests finished since the last call (stops, aborts, lengths)."""
        finished, self._finished = self._finished, []
        return finished

    def take_events(self) -> list[KVEvent]:
        return self.kv.take_events()

    # ---- introspection ---------------------------------------------------

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)
