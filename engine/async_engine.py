"""An asyncio front for LLMEngine: many coroutines, one stepping thread.

The engine steps in a dedicated background thread so that the event loop
(HTTP handlers, Ray Serve's replica loop) stays responsive while the model
runs. Coroutines talk to it through a command queue; outputs come back to
each request's asyncio.Queue with `call_soon_threadsafe`.

Given a factory instead of an engine, the stepping thread builds it, so that
one thread starts every OpenMP region of the process (loading packs weights
and faults in the KV cache in parallel, warm-up runs the model). libgomp keeps
a worker pool per thread that starts regions, and with more pool threads than
cores its workers sleep right after each region: every one of the hundreds of
regions of a decode step then pays a wake-up. SmolLM2 bf16, batch-1 decode
step on 2 cores: 11.1-12.3 ms built on another thread, 9.5-10.6 ms here.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

from shardline.engine.kv_cache import KVEvent
from shardline.engine.llm_engine import EngineConfig, LLMEngine, PromptType
from shardline.engine.outputs import RequestOutput
from shardline.engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can run on this engine any more."""


@dataclass
class _Add:
    request_id: str
    prompt: PromptType
    params: SamplingParams
    cache_salt: str | bytes | None
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class AsyncLLMEngine:
    """Streams RequestOutputs to coroutines while one thread steps the engine.

    Args:
        engine: the engine, or a function that builds it (run on the stepping
            thread; the constructor waits for it and re-raises its error).
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        self._commands: deque[_Add | _Abort] = deque()
        self._wake = threading.Condition()
        self._queues: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._kv_events: deque[KVEvent] = deque()
        self._stopped = False
        self._error: BaseException | None = None
        build = engine if callable(engine) else (lambda: engine)
        built = threading.Event()
        build_error: list[BaseException] = []

        def build_then_run() -> None:
            try:
                self.engine = build()
                self._stats: dict[str, float] = self.engine.stats()
            except BaseException as e:
                build_error.append(e)
                return
            finally:
                built.set()
            self._run()

        self._thread = threading.Thread(target=build_then_run, name="shardline-engine", daemon=True)
        self._thread.start()
        built.wait()
        if build_error:
            raise build_error[0]

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(lambda: LLMEngine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        """Whether the stepping thread is alive and accepting requests (a health check)."""
        return self._error is None and not self._stopped and self._thread.is_alive()

    async def generate(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        cache_salt: str | bytes | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs of one request until it finishes.

        A bad request raises ValueError before anything is queued. Leaving the
        iterator early (a client disconnect, a cancellation) aborts the request
        and frees its KV blocks.
        """
        if self._error is not None or self._stopped:
            raise EngineDeadError(f"engine is not running: {self._error!r}")
        params = params or SamplingParams()
        _, ids = self.engine.tokenize_prompt(prompt)
        self.engine.validate(ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._submit(_Add(request_id, prompt, params, cache_salt, queue, loop))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed before the next step."""
        self._submit(_Abort(request_id))

    def _submit(self, command: _Add | _Abort) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    def stats(self) -> dict[str, float]:
        """The engine's load as of the batch it is running (see LLMEngine.stats and `step(on_scheduled=)`)."""
        return dict(self._stats, num_pending=len(self._commands))

    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call."""
        events = []
        while self._kv_events:
            events.append(self._kv_events.popleft())
        return events

    def shutdown(self) -> None:
        """Stop the stepping thread; in-flight requests get EngineDeadError."""
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ---- the engine thread -------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._commands and not self.engine.has_unfinished_requests() and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                self._apply(command)
            if not self.engine.has_unfinished_requests():
                self._publish_stats()
                continue
            try:
                outputs = self.engine.step(on_scheduled=self._publish_stats, on_first_tokens=self._deliver_outputs)
            except BaseException as e:  # a model error must not hang the requests in flight
                self._fail_all(e)
                continue
            self._deliver_outputs(outputs)
        self._fail_all(EngineDeadError("engine shut down"))

    def _deliver_outputs(self, outputs: list[RequestOutput]) -> None:
        """After a step, or each of its early passes: KV events and load first, so a report never lags the outputs."""
        self._kv_events.extend(self.engine.take_kv_events())
        self._publish_stats()
        self._deliver((out.request_id, out, out.finished) for out in outputs)

    def _publish_stats(self) -> None:
        self._stats = self.engine.stats()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self.engine.abort_request(command.request_id)
            self._queues.pop(command.request_id, None)
            return
        self._queues[command.request_id] = (command.queue, command.loop)
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.cache_salt)
        except Exception as e:
            self._deliver([(command.request_id, e, True)])

    def _deliver(self, items: Iterable[tuple[str, RequestOutput | BaseException, bool]]) -> None:
        """Hand (request id, output or error, last) items to their requests' queues.

        One hand-over per event loop: a step's outputs wake each caller's loop
        once, not once per request.
        """
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for request_id, item, done in items:
            entry = self._queues.get(request_id)
            if entry is None:
                continue
            if done:
                del self._queues[request_id]
            queue, loop = entry
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                pass  # the caller's loop is closed; nobody is listening

    def _fail_all(self, error: BaseException) -> None:
        self.engine.abort_request(self.engine.unfinished_request_ids())
        if not isinstance(error, EngineDeadError):
            error = RuntimeError(f"engine step failed: {error!r}")
        self._deliver([(request_id, error, True) for request_id in list(self._queues)])


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
