"""Routing policies on a simulated cluster: the multi-tenant shared-context workload.

A sanity check before the real benchmark (benchmarks/routing.py, on Ray). Pure
Python, simulated time: each replica is the engine's own continuous-batching
`Scheduler` over its own `KVCacheManager` (the real prefix hashing, LRU
eviction and preemption), with no model: a step takes
`step_base_ms + step_token_ms * batched tokens` of simulated time and
samples a dummy token. The head node is the real `cluster.scheduler.ClusterScheduler`:
replicas report load, KV events and admitted ids after every step; requests
bind late from the global queue.

Workload (llm-d's shape, scaled down): `tenants` tenants, each with a shared
context of `context_tokens`, asking short questions (`question_tokens`,
answers of `output_tokens`), Poisson arrivals at `rate` requests/s, tenants
drawn uniformly. The contexts fill `kv_fill` of the cluster's KV cache.

Hit rate: prompt tokens served from replicas' prefix caches / prompt tokens.
Oracle: every request hits its tenant's whole context except each tenant's
first (an upper bound that ignores capacity).

    python benchmarks/routing_sim.py [--replicas 4 --tenants 10 --requests 1500 ...]

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: never shadows an installed package

from shardline.cluster.global_queue import QueueLimits  # noqa: E402
from shardline.cluster.placement import POLICIES, ReplicaLoad, RouteRequest  # noqa: E402
from shardline.cluster.scheduler import ReplicaReport, RequestUsage, ClusterScheduler, ClusterSchedulerConfig  # noqa: E402
from shardline.cluster.tenants import Tenant, TenantRegistry  # noqa: E402
from shardline.engine.kv_cache import KVCacheManager, hash_prompt_blocks  # noqa: E402
from shardline.engine.request import Request  # noqa: E402
from shardline.engine.scheduler import Scheduler as EngineScheduler  # noqa: E402
from shardline.engine.scheduler import SchedulerConfig as EngineSchedulerConfig  # noqa: E402


@dataclass
class Workload:
    replicas: int = 4
    tenants: int = 10
    requests: int = 1500
    rate: float = 40.0
    context_tokens: int = 2048
    question_tokens: tuple[int, int] = (24, 96)
    output_tokens: tuple[int, int] = (16, 64)
    block_size: int = 16
    kv_fill: float = 0.8
    max_num_seqs: int = 32
    max_batched_tokens: int = 2048
    step_base_ms: float = 5.0
    step_token_ms: float = 0.02
    seed: int = 0

    @property
    def blocks_per_replica(self) -> int:
        context_blocks = self.tenants * self.context_tokens // self.block_size
        return int(context_blocks / self.kv_fill / self.replicas)


@dataclass
class Arrival:
    time: float
    request_id: str
    tenant: int
    tokens: list[int]
    max_tokens: int


def make_arrivals(w: Workload) -> list[Arrival]:
    rng = random.Random(w.seed)
    contexts = [[rng.randrange(32000) for _ in range(w.context_tokens)] for _ in range(w.tenants)]
    t = 0.0
    out = []
    for i in range(w.requests):
        t += rng.expovariate(w.rate)
        tenant = rng.randrange(w.tenants)
        question = [rng.randrange(32000) for _ in range(rng.randint(*w.question_tokens))]
        out.append(Arrival(t, f"q{i}", tenant, contexts[tenant] + question, rng.randint(*w.output_tokens)))
    return out


@dataclass
class SimReplica:
    rid: str
    engine: EngineScheduler
    seq: int = 0
    busy_until: float = 0.0
    admitted: list[str] = field(default_factory=list)

    def load(self, max_num_seqs: int) -> ReplicaLoad:
        s = self.engine
        backlog = sum(max(0, r.num_tokens - r.num_computed_tokens - 1) for r in [*s.running, *s.waiting])
        return ReplicaLoad(
            len(s.running), len(s.waiting), s.kv.pool.num_free_blocks, s.kv.num_blocks, backlog, max_num_seqs
        )


def run_policy(w: Workload, policy: str, arrivals: list[Arrival], knobs: dict | None = None) -> dict:
    # No admission limits: the simulation measures queueing, not rejections.
    core = ClusterScheduler(
        ClusterSchedulerConfig(policy=policy, policy_knobs=knobs or {}, queue=QueueLimits(max_queued=1 << 30)),
        TenantRegistry(default=Tenant("anonymous", max_queued=1 << 30)),
    )
    replicas = {}
    for i in range(w.replicas):
        kv = KVCacheManager(w.blocks_per_replica, w.block_size)
        cfg = EngineSchedulerConfig(w.max_batched_tokens, w.max_num_seqs, max_model_len=w.context_tokens + 512)
        replicas[f"r{i}"] = SimReplica(f"r{i}", EngineScheduler(cfg, kv))
    by_id = {a.request_id: a for a in arrivals}
    first_token: dict[str, float] = {}
    done: dict[str, float] = {}
    cached: dict[str, int] = {}
    texts = {}
    # Events: (time, order, kind, payload)
    events: list[tuple[float, int, str, str]] = []
    order = 0
    for a in arrivals:
        events.append((a.time, order, "arrive", a.request_id))
        order += 1
    for rid in replicas:
        events.append((0.0, order, "step", rid))
        order += 1
    heapq.heapify(events)
    queued_s: list[float] = []
    preemptions = 0
    per_replica = {rid: 0 for rid in replicas}

    def report(r: SimReplica, now: float) -> None:
        reply = core.on_replica_report(
            ReplicaReport(r.rid, r.seq, r.load(w.max_num_seqs), tuple(r.engine.take_events()), tuple(r.admitted)), now
        )
        assert not reply.resync
        r.seq += 1
        r.admitted = []

    def poll(now: float) -> None:
        got = core.poll_assignments(now)
        for asg in got:
            queued_s.append(asg.queued_s)
            per_replica[asg.replica_id] += 1
            a = by_id[asg.request_id]
            r = replicas[asg.replica_id]
            r.engine.add_request(Request(a.request_id, list(a.tokens), a.max_tokens))
            r.admitted.append(a.request_id)

    def wake_idle(now: float) -> None:
        nonlocal order
        for rid in sorted(idle):
            if replicas[rid].engine.has_unfinished():
                idle.discard(rid)
                heapq.heappush(events, (now, order, "step", rid))
                order += 1

    for r in replicas.values():
        report(r, 0.0)
    idle = set(replicas)
    in_flight: dict[str, object] = {}
    while events:
        now, _, kind, key = heapq.heappop(events)
        if kind == "arrive":
            a = by_id[key]
            if a.tenant not in texts:
                texts[a.tenant] = " ".join(map(str, a.tokens[: w.context_tokens]))
            hashes = tuple(hash_prompt_blocks(a.tokens, w.block_size))
            text = texts[a.tenant] + " " + " ".join(map(str, a.tokens[w.context_tokens:]))
            result = core.submit(
                RouteRequest(a.request_id, f"t{a.tenant}", hashes, w.block_size, len(a.tokens), a.max_tokens,
                             prompt_text=text),
                now,
            )
            assert not hasattr(result, "status"), result
            poll(now)
            wake_idle(now)
            continue
        r = replicas[key]
        if kind == "done":  # the step started `dt` ago ends: tokens, finishes, report
            out = in_flight.pop(key)
            updated = r.engine.update_from_output(out, [0 if s.sample else None for s in out.scheduled])
            for req in updated:
                first_token.setdefault(req.request_id, now)
            for req in r.engine.take_finished():
                done[req.request_id] = now
                cached[req.request_id] = max(0, req.num_cached_tokens)
                preemptions += req.num_preemptions
                usage = RequestUsage(req.num_prompt_tokens, cached[req.request_id], req.num_output_tokens)
                core.on_request_finished(req.request_id, usage, now)
            report(r, now)
            poll(now)
            wake_idle(now)
        out = r.engine.schedule()
        if out.is_empty:
            report(r, now)
            poll(now)
            idle.add(key)
            continue
        in_flight[key] = out
        dt = (w.step_base_ms + w.step_token_ms * out.num_batched_tokens) / 1000.0
        heapq.heappush(events, (now + dt, order, "done", key))
        order += 1

    assert len(done) == len(arrivals), f"{len(done)} of {len(arrivals)} finished"
    prompt_tokens = sum(len(a.tokens) for a in arrivals)
    seen: set[int] = set()
    oracle = 0
    for a in arrivals:
        if a.tenant in seen:
            oracle += min(w.context_tokens // w.block_size, (len(a.tokens) - 1) // w.block_size) * w.block_size
        seen.add(a.tenant)
    ttft = sorted(first_token[a.request_id] - a.time for a in arrivals)
    e2e = sorted(done[a.request_id] - a.time for a in arrivals)
    makespan = max(done.values()) - arrivals[0].time
    out_tokens = sum(a.max_tokens for a in arrivals)
    hit = sum(cached.values()) / prompt_tokens
    return {
        "policy": policy,
        "hit_rate": round(hit, 4),
        "oracle_hit_rate": round(oracle / prompt_tokens, 4),
        "hit_vs_oracle": round(sum(cached.values()) / oracle, 4),
        "ttft_p50_s": round(statistics.median(ttft), 4),
        "ttft_p90_s": round(ttft[int(0.9 * len(ttft))], 4),
        "ttft_p99_s": round(ttft[int(0.99 * len(ttft))], 4),
        "e2e_p50_s": round(statistics.median(e2e), 4),
        "output_tok_per_s": round(out_tokens / makespan, 1),
        "queue_wait_p90_s": round(sorted(queued_s)[int(0.9 * len(queued_s))], 4),
        "preemptions": preemptions,
        "requests_per_replica": list(per_replica.values()),
    }


def measure_capacity(num_replicas: int, prompt_blocks: int = 128, n: int = 3000, seed: int = 0) -> dict:
    """Wall-clock cost of one kv_aware decision: submit + poll_assignments, one request at a time.

    Each replica's index holds one of 20 tenant contexts of `prompt_blocks`
    blocks; each request carries one of those contexts plus a question.
    """
    s = ClusterScheduler(ClusterSchedulerConfig(queue=QueueLimits(max_queued=1 << 30)))
    rng = random.Random(seed)
    contexts = [tuple(rng.randbytes(32) for _ in range(prompt_blocks)) for _ in range(20)]
    for r in range(num_replicas):
        load = ReplicaLoad(4, 0, 50_000, 100_000, 0, 1 << 20)
        s.on_replica_report(ReplicaReport(f"r{r}", 0, load, (("stored", contexts[r % 20]),)), 0.0)
    lat = []
    for i in range(n):
        hashes = contexts[i % 20] + (rng.randbytes(32), rng.randbytes(32))
        req = RouteRequest(f"q{i}", f"t{i % 20}", hashes, 16, len(hashes) * 16 + 7, 32)
        t0 = time.perf_counter()
        s.submit(req, 1.0)
        got = s.poll_assignments(1.0)
        lat.append(time.perf_counter() - t0)
        assert len(got) == 1
        s.on_request_finished(req.request_id, None, 1.0)
    lat.sort()
    return {
        "replicas": num_replicas,
        "decisions_per_s": round(n / sum(lat)),
        "latency_p50_us": round(lat[n // 2] * 1e6, 1),
        "latency_p99_us": round(lat[int(n * 0.99)] * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    w = Workload()
    for name in ("replicas", "tenants", "requests", "rate", "context_tokens", "kv_fill", "seed", "max_num_seqs"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(w, name)), default=getattr(w, name))
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--capacity-replicas", type=lambda v: [int(x) for x in v.split(",") if x], default=[4, 16, 64, 256],
                   help="replica counts for the scheduler capacity measurement (empty: skip)")
    p.add_argument("--kv-knobs", type=json.loads, default={}, help='kv_aware knobs as JSON, e.g. {"decode_weight": 4}')
    args = p.parse_args(argv)
    for name in ("replicas", "tenants", "requests", "rate", "context_tokens", "kv_fill", "seed", "max_num_seqs"):
        setattr(w, name, getattr(args, name))
    gc.collect()
    capacity = [measure_capacity(r) for r in args.capacity_replicas]
    for c in capacity:
        print(f"scheduler capacity {c}", file=sys.stderr)
    arrivals = make_arrivals(w)
    print(
        f"{w.replicas} replicas x {w.blocks_per_replica} blocks of {w.block_size}; {w.tenants} tenants x "
        f"{w.context_tokens}-token contexts ({w.kv_fill:.0%} of the cluster's KV); {w.requests} requests at {w.rate}/s",
        file=sys.stderr,
    )
    results = {}
    for policy in args.policies.split(","):
        t0 = time.perf_counter()
        results[policy] = run_policy(w, policy, arrivals, args.kv_knobs if policy == "kv_aware" else None)
        print(f"{policy:14s} {results[policy]}  ({time.perf_counter() - t0:.1f} s wall)", file=sys.stderr)
    workload = {k: getattr(w, k) for k in ("replicas", "tenants", "requests", "rate", "context_tokens", "kv_fill")}
    summary: dict = {"scheduler_capacity": capacity, "workload": workload, "results": results}
    if "round_robin" in results and "kv_aware" in results:
        rr, kv = results["round_robin"], results["kv_aware"]
        summary["kv_aware_vs_round_robin"] = {
            "ttft_p90_speedup": round(rr["ttft_p90_s"] / kv["ttft_p90_s"], 2),
            "throughput_ratio": round(kv["output_tok_per_s"] / rr["output_tok_per_s"], 3),
        }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
