"""ModelReplica: one AsyncLLMEngine behind admission, streaming small deltas.

A plain class (no Ray in it): app.py wraps it as the Serve deployment, and
tests drive it directly. For each request it

1. validates what the engine would refuse, naming the request field at fault
   (token ids outside the vocabulary, n above the cap, prompt plus max_tokens
   beyond the context, a prompt the cache cannot hold),
2. applies the queue limit (admission.py),
3. yields `Admitted`, then one `Delta` per engine step with only the new
   text, token ids and logprobs, the last one `finished`; for a request with
   a `subscriber` the deltas go to that ingress's outbox instead, which
   `subscribe` streams a whole engine step at a time (step_stream.py).

Leaving the stream early (a client disconnect reaches here as CancelledError
or GeneratorExit at the next await) aborts the engine request, which frees its
KV blocks. `stats()` and `record_autoscaling_stats()` expose the load that
routing, autoscaling and `shardline status` read; `routing_load()` and
`take_admitted()` are what the replica reports to the head-node scheduler
(reporter.py), and `on_routing_news` asks for a report as soon as a
request's prompt blocks are cached or a request ends.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Union

from shardline.cluster.placement import ReplicaLoad
from shardline.deployments.admission import AdmissionLoad, admit
from shardline.deployments.config import ServeConfig
from shardline.deployments.events import Admitted, ChoiceDelta, Delta, Failed, GenerateRequest, Rejected, ReplicaEvent
from shardline.deployments.metrics import NullMetrics, RequestTimings
from shardline.deployments.step_stream import NotHere, Outboxes, Subscription
from shardline.engine import AsyncLLMEngine, EngineConfig, LLMEngine, RequestOutput


@dataclass
class _Sent:
    """How much of one completion the client has already been sent."""

    text_len: int = 0
    num_tokens: int = 0
    done: bool = False


def take_delta(out: RequestOutput, sent: dict[int, _Sent]) -> Delta:
    """What `out` (cumulative) adds to what was sent; updates `sent`."""
    choices = []
    for o in out.outputs:
        s = sent.setdefault(o.index, _Sent())
        if s.done:
            continue
        text = o.text[s.text_len :]
        token_ids = o.token_ids[s.num_tokens :]
        if not text and not token_ids and o.finish_reason is None:
            continue
        logprobs = o.logprobs[s.num_tokens :] if o.logprobs is not None else None
        s.text_len, s.num_tokens, s.done = len(o.text), len(o.token_ids), o.finish_reason is not None
        choices.append(ChoiceDelta(o.index, text, list(token_ids), logprobs, o.finish_reason))
    return Delta(choices, out.num_cached_tokens, out.finished)


class ModelReplica:
    """One model replica: engine, admission and load reporting.

    Args:
        config: the app's ServeConfig (engine shape, queue limit).
        engine: an engine to use instead of building one from config (tests).
        metrics: where request metrics go (RayReplicaMetrics under Serve).
    """

    def __init__(self, config: ServeConfig, engine: Optional[AsyncLLMEngine] = None, metrics: Any = None):
        self.config = config
        if engine is None:
            engine = self._build_engine(config)
        self.engine = engine
        self.metrics = metrics or NullMetrics()
        self.replica_id = "local"
        self._num_inflight = 0
        # Requests whose caller left before they finished (client disconnects, timeouts).
        self._num_aborted = 0
        # For the head-node scheduler (reporter.py): ids admitted since the last
        # report, and the prompt tokens still to prefill of requests without output yet.
        self._admitted: deque[str] = deque(maxlen=100_000)
        self._prefill_backlog: dict[str, int] = {}
        # Called when a request's prompt blocks became cached or a request ended (a report is due).
        self.on_routing_news: Optional[Callable[[], None]] = None
        # Deltas of requests whose ingress reads them from its step stream.
        self.outboxes = Outboxes()

    @staticmethod
    def _build_engine(config: ServeConfig) -> AsyncLLMEngine:
        import torch

        from shardline.engine.pull import resolve_model

        engine_config = EngineConfig(**config.engine_kwargs(resolve_model(config.model)))
        launcher = None
        if config.tensor_parallel_size > 1:
            from shardline.deployments.tensor_parallel import RayWorkerLauncher

            # Inside a Serve replica the launcher uses the replica's own placement group.
            launcher = RayWorkerLauncher(
                strategy=config.placement_strategy,
                use_gpu=config.replica_num_gpus > 0,
                cpus_per_rank=config.replica_num_cpus,
                threads_per_rank=config.replica_threads,
            )

        def build() -> LLMEngine:
            torch.set_num_threads(config.replica_threads)
            engine = LLMEngine(engine_config, launcher)
            engine.warm_up()
            return engine

        # Built on the stepping thread: one OpenMP master per process (see engine/async_engine.py).
        return AsyncLLMEngine(build)

    # ---- load ----------------------------------------------------------------

    def load(self) -> AdmissionLoad:
        s = self.engine.stats()
        return AdmissionLoad(
            num_inflight=self._num_inflight,
            max_num_seqs=self.engine.engine.config.max_num_seqs,
            num_running=int(s["num_running"]),
            num_engine_waiting=int(s["num_waiting"] + s.get("num_pending", 0)),
            num_free_blocks=int(s["num_free_blocks"]),
            num_blocks=int(s["num_blocks"]),
        )

    def stats(self) -> dict[str, Any]:
        """This replica's load, JSON-ready (for `shardline status` and tests)."""
        load = self.load()
        kv_usage = 1.0 - load.num_free_blocks / load.num_blocks if load.num_blocks else 0.0
        return {
            "replica_id": self.replica_id,
            "num_inflight": load.num_inflight,
            "num_running": load.num_running,
            "num_waiting": load.queue_depth,
            "num_free_blocks": load.num_free_blocks,
            "num_blocks": load.num_blocks,
            "kv_usage": kv_usage,
            "num_aborted": self._num_aborted,
        }

    def routing_load(self) -> ReplicaLoad:
        """The load the head-node scheduler places by (cluster.placement.ReplicaLoad)."""
        s = self.engine.stats()
        running = int(s["num_running"])
        # Requests accepted but not yet seen by the engine count as waiting.
        waiting = max(int(s["num_waiting"] + s.get("num_pending", 0)), self._num_inflight - running, 0)
        return ReplicaLoad(
            num_running=running,
            num_waiting=waiting,
            num_free_blocks=int(s["num_free_blocks"]),
            num_blocks=int(s["num_blocks"]),
            num_tokens_in_flight=sum(self._prefill_backlog.values()),
            max_num_seqs=self.engine.engine.config.max_num_seqs,
            max_step_tokens=self.engine.engine.scheduler.config.max_num_batched_tokens,
        )

    def _routing_news(self) -> None:
        if self.on_routing_news is not None:
            self.on_routing_news()

    def take_admitted(self) -> tuple[str, ...]:
        """Request ids admitted since the last call (the scheduler's pending bindings end there)."""
        out = tuple(self._admitted)
        self._admitted.clear()
        return out

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook: pushed to the controller when autoscaling is on."""
        s = self.stats()
        return {k: float(s[k]) for k in ("num_inflight", "num_running", "num_waiting", "num_free_blocks", "kv_usage")}

    def model_info(self) -> dict[str, Any]:
        e = self.engine.engine
        return {"max_model_len": e.max_model_len, "vocab_size": e.vocab_size, "max_n": e.config.max_n}

    def check_health(self) -> None:
        """Raise when the engine loop has died (Serve then replaces this replica)."""
        if not self.engine.is_running:
            raise RuntimeError("the engine loop is not running")
        if not self.engine.engine.healthy():
            raise RuntimeError("a tensor-parallel shard of this replica died")

    def _publish_load(self) -> None:
        s = self.stats()
        self.metrics.set_load(s["num_running"], s["num_waiting"], s["kv_usage"])

    # ---- requests --------------------------------------------------------------

    def validate(self, request: GenerateRequest) -> Optional[Rejected]:
        """The 400 this request deserves, naming the field at fault; None when it can run."""
        ids, params = request.prompt_token_ids, request.params
        engine = self.engine.engine
        vocab = engine.vocab_size
        checks = [
            (request.prompt_param, ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias or {})),
        ]
        for param, token_ids in checks:
            bad = next((t for t in token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                return Rejected(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param)
        if params.n > engine.config.max_n:
            return Rejected(400, f"n={params.n} exceeds this server's limit of {engine.config.max_n}", "n")
        if params.max_tokens is not None and len(ids) + params.max_tokens > engine.max_model_len:
            return Rejected(
                400,
                f"this model's context is {engine.max_model_len} tokens; the prompt has {len(ids)} and "
                f"max_tokens asks for {params.max_tokens} more",
                "max_tokens",
            )
        try:
            engine.validate(ids, params)
        except ValueError as e:
            return Rejected(400, str(e), request.prompt_param)
        return None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[ReplicaEvent]:
        """Admit and run one request: Rejected, or Admitted then Deltas (or Failed)."""
        rejected = self.validate(request) or admit(self.load(), self.config.max_queue_len, self.config.retry_after_s)
        if rejected is not None:
            yield rejected
            return
        self._num_inflight += 1
        self._admitted.append(request.request_id)
        self._prefill_backlog[request.request_id] = max(
            1, len(request.prompt_token_ids) - request.expected_cached_tokens
        ) * request.params.n
        self._publish_load()
        finished = False
        try:
            yield Admitted(len(request.prompt_token_ids), self.replica_id)
            outbox = None
            if request.subscriber is not None:
                outbox = self.outboxes.get(request.subscriber)
                outbox.open_requests += 1
            prompt = {"prompt_token_ids": request.prompt_token_ids}
            sent: dict[int, _Sent] = {}
            last: Optional[RequestOutput] = None
            try:
                async for out in self.engine.generate(request.request_id, prompt, request.params, request.cache_salt):
                    if self._prefill_backlog.pop(request.request_id, None) is not None:
                        self._routing_news()
                    last = out
                    delta = take_delta(out, sent)
                    finished = out.finished
                    if delta.choices or delta.finished:
                        if outbox is None:
                            yield delta
                        else:
                            outbox.put(request.request_id, delta)
            except (ValueError, RuntimeError) as e:  # EngineDeadError is a RuntimeError
                finished = True
                failed = Failed(f"engine error: {e}")
                if outbox is None:
                    yield failed
                else:
                    outbox.put(request.request_id, failed)
                return
            finally:
                if outbox is not None:
                    outbox.request_ended()
            if last is not None:
                self._record(request, last)
        finally:
            if not finished:
                self.engine.abort(request.request_id)
                self._num_aborted += 1
            self._prefill_backlog.pop(request.request_id, None)
            self._num_inflight -= 1
            self._routing_news()
            self._publish_load()

    async def subscribe(self, subscription: Subscription) -> AsyncIterator[Union[list, NotHere]]:
        """The step stream of one ingress: lists of (request id, event), one per engine step (step_stream.py)."""
        if subscription.replica_hint != self.replica_id:
            yield NotHere(self.replica_id)
            return
        async for batch in self.outboxes.stream(subscription.subscriber):
            yield batch

    def _record(self, request: GenerateRequest, out: RequestOutput) -> None:
        m = out.metrics
        num_output = sum(len(o.token_ids) for o in out.outputs)
        timings = RequestTimings.from_times(
            arrival=request.arrival_time or m.get("arrival_time", time.time()),
            first_scheduled=m.get("first_scheduled_time"),
            first_token=m.get("first_token_time"),
            finished=time.time(),
            num_output_tokens=max((len(o.token_ids) for o in out.outputs), default=0),
        )
        self.metrics.record_request(
            len(out.prompt_token_ids), out.num_cached_tokens, num_output, int(m.get("num_preemptions", 0)), timings
        )

    def shutdown(self) -> None:
        self.engine.shutdown()
