"""Replica metrics: vLLM's names and meanings, under a `shardline_` prefix.

Exported through ray.util.metrics, so Ray adds its `ray_` prefix and every
node's metrics agent serves them to Prometheus (e.g.
`ray_shardline_time_to_first_token_seconds_bucket`). Counters follow vLLM and
Prometheus in counting tokens, not requests, for the prefix cache.

`RequestTimings` turns one request's timestamps into the latencies; the
metric objects only record. A replica built without Ray uses `NullMetrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Histogram buckets, seconds (vLLM's boundaries, trimmed).
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0]


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """A finished request's latencies, from its wall-clock timestamps."""

    ttft_s: Optional[float]
    tpot_s: Optional[float]
    e2e_s: float
    queue_s: Optional[float]

    @classmethod
    def from_times(
        cls,
        arrival: float,
        first_scheduled: Optional[float],
        first_token: Optional[float],
        finished: float,
        num_output_tokens: int,
    ) -> "RequestTimings":
        ttft = None if first_token is None else max(0.0, first_token - arrival)
        tpot = None
        if first_token is not None and num_output_tokens > 1:
            tpot = max(0.0, finished - first_token) / (num_output_tokens - 1)
        queue = None if first_scheduled is None else max(0.0, first_scheduled - arrival)
        return cls(ttft, tpot, max(0.0, finished - arrival), queue)


class NullMetrics:
    """Records nothing: for a replica outside Ray (tests, offline use)."""

    def set_load(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        pass

    def record_request(
        self, prompt_tokens: int, cached_tokens: int, output_tokens: int, preemptions: int, timings: RequestTimings
    ) -> None:
        pass


class RayReplicaMetrics(NullMetrics):
    """The replica's metrics as Ray gauges, counters and histograms.

    Args:
        model_name: the served model's name, the `model_name` tag of every series.
    """

    def __init__(self, model_name: str):
        from ray.util import metrics

        tags = ("model_name",)
        self._tags = {"model_name": model_name}

        def gauge(name: str, doc: str):
            g = metrics.Gauge(f"shardline_{name}", description=doc, tag_keys=tags)
            g.set_default_tags(self._tags)
            return g

        def counter(name: str, doc: str):
            c = metrics.Counter(f"shardline_{name}", description=doc, tag_keys=tags)
            c.set_default_tags(self._tags)
            return c

        def histogram(name: str, doc: str, buckets: list[float]):
            h = metrics.Histogram(f"shardline_{name}", description=doc, boundaries=buckets, tag_keys=tags)
            h.set_default_tags(self._tags)
            return h

        self.running = gauge("num_requests_running", "Requests in the model execution batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be processed.")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV cache usage: 1 means 100 percent.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = counter("prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Generation tokens processed.")
        self.preemptions = counter("num_preemptions", "Cumulative number of preemptions.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Time per output token after the first.", _TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "Time a request waited before its first step.", _LATENCY_BUCKETS)

    def set_load(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)
        self.kv_usage.set(kv_usage)

    def record_request(
        self, prompt_tokens: int, cached_tokens: int, output_tokens: int, preemptions: int, timings: RequestTimings
    ) -> None:
        self.prefix_queries.inc(prompt_tokens)
        if cached_tokens:
            self.prefix_hits.inc(cached_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        if output_tokens:
            self.generation_tokens.inc(output_tokens)
        if preemptions:
            self.preemptions.inc(preemptions)
        if timings.ttft_s is not None:
            self.ttft.observe(timings.ttft_s)
        if timings.tpot_s is not None:
            self.tpot.observe(timings.tpot_s)
        if timings.queue_s is not None:
            self.queue.observe(timings.queue_s)
        self.e2e.observe(timings.e2e_s)
