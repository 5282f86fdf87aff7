"""A discrete-event simulator of a shardline deployment under an autoscaling policy.

What it models, and how:

- Arrivals come from a trace (`traces.py`). A request waits in the head-node
  global queue until some ready replica has an empty queue of its own, a free
  batch slot and KV blocks for its prompt (late binding, as `cluster`'s
  scheduler does), then goes to the one with the least prefill work ahead of
  it (`cluster.placement.KVAwarePolicy`'s cost, without prefix hits).
- Each replica runs the engine's iteration-level scheduler (continuous
  batching): per step, running requests first (a decode is one token, a
  prefill a chunk of the token budget), then waiting ones FCFS while the batch
  has slots, budget and KV blocks; the newest running request is preempted
  (recompute) when the cache runs out. A step's duration comes from the
  calibrated `ReplicaCostModel`.
- Scaling: an `Autoscaler` samples the cluster every `record_interval_s`, sees
  those samples only after its push delay, and decides every
  `control_interval_s`. New replicas are ready `startup_s` later (and cost from
  the moment they are asked for). A replica picked for removal drains: it takes
  no new request and stops when its last one finishes; no request is lost.
  Starting replicas are cancelled before ready ones are drained.
- Scale from zero: requests arriving at zero replicas are held in the global
  queue; the arrival triggers an immediate report and decision (as Serve's
  handle pushes at once when a deployment is scaled to zero).

Results: per-request TTFT and TPOT, SLO attainment, replica-hours, cost.
Everything is deterministic given the trace.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from shardline.autoscaling.calibration import ReplicaCostModel
from shardline.autoscaling.policy import ClusterLoad, PolicyState, QueueDepthConfig, ReplicaMetrics, decide
from shardline.autoscaling.serve_default import ServeDefaultConfig, ServeDefaultState, WindowedMean, serve_default_decide
from shardline.autoscaling.traces import TraceRequest

# ---- autoscalers as the simulator drives them --------------------------------


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cluster as a metrics sample sees it."""

    t: float
    replicas: tuple[ReplicaMetrics, ...]  # ready, non-draining replicas
    global_queue: int


class Autoscaler(Protocol):
    name: str
    record_interval_s: float
    control_interval_s: float

    def initial_replicas(self) -> int: ...

    def record(self, snap: Snapshot, *, push_now: bool = False) -> None: ...

    def decide(self, now: float, ready: int, target: int) -> int: ...


class StaticAutoscaler:
    """A fixed replica count: provisioning for the peak."""

    record_interval_s = math.inf
    control_interval_s = math.inf

    def __init__(self, num_replicas: int):
        if num_replicas < 1:
            raise ValueError(f"a static deployment needs at least 1 replica, got {num_replicas}")
        self.n = num_replicas
        self.name = f"static-{num_replicas}"

    def initial_replicas(self) -> int:
        return self.n

    def record(self, snap: Snapshot, *, push_now: bool = False) -> None:
        pass

    def decide(self, now: float, ready: int, target: int) -> int:
        return self.n


class QueueDepthAutoscaler:
    """This project's policy (`policy.decide`) behind a metrics push delay.

    Args:
        config: the policy's knobs.
        push_interval_s: replicas and the scheduler push their last sample this often.
        record_interval_s: how often a sample is taken (Serve: 0.2 * look_back_period_s).
        control_interval_s: how often the controller decides.
        initial: replicas ready at t=0 (default: max(min_replicas, 1)).
    """

    def __init__(
        self,
        config: QueueDepthConfig,
        push_interval_s: float = 0.5,  # as deployed: deployments.config.METRICS_PUSH_INTERVAL_S
        record_interval_s: float = 0.5,
        control_interval_s: float = 0.5,
        initial: int | None = None,
        name: str = "queue-depth",
    ):
        self.config = config
        self.push_interval_s = push_interval_s
        self.record_interval_s = record_interval_s
        self.control_interval_s = control_interval_s
        self.name = name
        self._initial = max(config.min_replicas, 1) if initial is None else initial
        self._samples: deque[Snapshot] = deque()
        self._forced: Snapshot | None = None
        self.state = PolicyState()

    def initial_replicas(self) -> int:
        return self._initial

    def record(self, snap: Snapshot, *, push_now: bool = False) -> None:
        self._samples.append(snap)
        while len(self._samples) > 2 and self._samples[1].t <= snap.t - 2 * self.push_interval_s:
            self._samples.popleft()
        if push_now:
            self._forced = snap

    def _visible(self, now: float) -> Snapshot | None:
        last_push = math.floor(now / self.push_interval_s + 1e-9) * self.push_interval_s
        seen = None
        for s in self._samples:
            if s.t <= last_push + 1e-9:
                seen = s
        if self._forced is not None and (seen is None or self._forced.t > seen.t):
            seen = self._forced
        return seen

    def decide(self, now: float, ready: int, target: int) -> int:
        snap = self._visible(now)
        replicas = snap.replicas if snap else ()
        load = ClusterLoad(replicas, snap.global_queue if snap else 0, ready, target)
        d = decide(self.config, load, self.state, now)
        self.state = d.state
        self._forced = None
        return d.num_replicas


class ServeDefaultAutoscaler:
    """Serve's default policy (`serve_default.py`) with its metric averaging and push delay."""

    def __init__(self, config: ServeDefaultConfig, control_interval_s: float = 0.5, initial: int | None = None, name: str = "serve-default"):
        self.config = config
        self.record_interval_s = config.record_interval_s
        self.control_interval_s = control_interval_s
        self.name = name
        self._initial = max(config.min_replicas, 1) if initial is None else initial
        self._window = WindowedMean(config)
        self._forced_total: float | None = None
        self.state = ServeDefaultState()

    def initial_replicas(self) -> int:
        return self._initial

    def record(self, snap: Snapshot, *, push_now: bool = False) -> None:
        total = snap.global_queue + sum(r.num_waiting + r.num_running for r in snap.replicas)
        self._window.record(snap.t, total)
        if push_now:
            self._forced_total = total

    def decide(self, now: float, ready: int, target: int) -> int:
        total = self._window.mean(now)
        if self._forced_total is not None:  # the handle's immediate push at zero replicas
            total = max(total, self._forced_total)
            self._forced_total = None
        n, self.state = serve_default_decide(self.config, total, ready, target, self.state, now)
        return n


# ---- the data plane -------------------------------------------------------------


class _Req:
    __slots__ = ("idx", "arrival", "prompt", "output", "computed", "generated", "blocks", "first_token", "finish", "preemptions")

    def __init__(self, idx: int, r: TraceRequest):
        self.idx = idx
        self.arrival = r.arrival_s
        self.prompt = r.prompt_tokens
        self.output = r.output_tokens
        self.computed = 0  # tokens whose KV is in the cache
        self.generated = 0  # tokens sampled so far
        self.blocks = 0  # KV blocks held
        self.first_token = -1.0
        self.finish = -1.0
        self.preemptions = 0


_STARTING, _READY, _DRAINING, _STOPPED = range(4)


class _Replica:
    __slots__ = ("rid", "state", "started_at", "ready_at", "stopped_at", "running", "waiting", "free_blocks", "waiting_blocks", "busy", "step_plan")

    def __init__(self, rid: int, now: float, ready_at: float, num_blocks: int):
        self.rid = rid
        self.state = _STARTING
        self.started_at = now
        self.ready_at = ready_at
        self.stopped_at: float | None = None
        self.running: list[_Req] = []
        self.waiting: deque[_Req] = deque()
        self.free_blocks = num_blocks
        self.waiting_blocks = 0  # blocks the waiting requests' prompts will need
        self.busy = False
        self.step_plan: list[tuple[_Req, int]] = []

    @property
    def load(self) -> int:
        return len(self.running) + len(self.waiting)


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


# ---- results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SLO:
    """Latency targets of one request: time to first token and time per output token."""

    ttft_s: float
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        if not self.ttft_s > 0 or (self.tpot_s is not None and not self.tpot_s > 0):
            raise ValueError(f"SLO targets must be > 0, got ttft={self.ttft_s}, tpot={self.tpot_s}")


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100.0 * len(s)) - 1))]


@dataclass(slots=True)
class SimResult:
    """What one run measured."""

    policy: str
    num_requests: int
    completed: int
    slo_attainment: float  # fraction of requests meeting TTFT and TPOT targets
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p99_s: float
    replica_hours: float
    cost_usd: float
    peak_replicas: int
    mean_replicas: float
    scale_events: int
    preemptions: int
    duration_s: float
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (time, replicas asked for)

    def summary(self) -> dict:
        keys = (
            "policy", "num_requests", "completed", "slo_attainment", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s",
            "tpot_p99_s", "replica_hours", "cost_usd", "peak_replicas", "mean_replicas", "scale_events", "preemptions",
        )  # fmt: skip
        out = {k: getattr(self, k) for k in keys}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


# ---- the simulator ----------------------------------------------------------------

_ARRIVAL, _STEP, _READY_EV, _RECORD, _CONTROL = range(5)


class Simulator:
    """One run of a trace against a replica cost model and an autoscaler.

    Args:
        trace: requests sorted by arrival.
        cost: the replica cost model (see `calibration.py`).
        autoscaler: a StaticAutoscaler, QueueDepthAutoscaler or ServeDefaultAutoscaler.
        slo: the latency targets that SLO attainment counts.
        price_per_replica_hour: dollars per replica-hour.
        duration_s: the trace's nominal length (default: its last arrival); cost is
            counted until the later of this and the last completion.
    """

    def __init__(
        self,
        trace: Sequence[TraceRequest],
        cost: ReplicaCostModel,
        autoscaler: Autoscaler,
        slo: SLO,
        price_per_replica_hour: float = 1.0,
        duration_s: float | None = None,
    ):
        if price_per_replica_hour < 0:
            raise ValueError(f"price_per_replica_hour must be >= 0, got {price_per_replica_hour}")
        max_blocks = cost.kv_capacity_tokens // cost.block_size
        for r in trace:
            if _blocks(r.prompt_tokens + r.output_tokens, cost.block_size) > max_blocks:
                raise ValueError(f"a request of {r.prompt_tokens}+{r.output_tokens} tokens does not fit one replica's KV cache")
        self.trace = list(trace)
        self.cost = cost
        self.scaler = autoscaler
        self.slo = slo
        self.price = price_per_replica_hour
        self.duration_s = duration_s if duration_s is not None else (self.trace[-1].arrival_s if self.trace else 0.0)
        self.num_blocks = max_blocks
        self._events: list[tuple[float, int, int, int]] = []
        self._order = 0
        self.reqs = [_Req(i, r) for i, r in enumerate(self.trace)]
        self.queue: deque[_Req] = deque()
        self.replicas: list[_Replica] = []
        self.done = 0
        self.scale_events = 0
        self.timeline: list[tuple[float, int]] = []
        self.now = 0.0

    # -- events --
    def _push(self, t: float, kind: int, arg: int = 0) -> None:
        self._order += 1
        heapq.heappush(self._events, (t, self._order, kind, arg))

    def run(self) -> SimResult:
        for _ in range(self.scaler.initial_replicas()):
            rep = self._new_replica(0.0, ready_at=0.0)
            rep.state = _READY
        self.timeline.append((0.0, self._target()))
        for r in self.reqs:
            self._push(r.arrival, _ARRIVAL, r.idx)
        if math.isfinite(self.scaler.record_interval_s):
            self._push(0.0, _RECORD)
        if math.isfinite(self.scaler.control_interval_s):
            self._push(self.scaler.control_interval_s, _CONTROL)
        while self._events:
            t, _, kind, arg = heapq.heappop(self._events)
            self.now = t
            if kind == _ARRIVAL:
                self._on_arrival(self.reqs[arg])
            elif kind == _STEP:
                self._on_step_end(self.replicas[arg])
            elif kind == _READY_EV:
                self._on_ready(self.replicas[arg])
            elif kind == _RECORD:
                self.scaler.record(self._snapshot())
                if not self._finished():
                    self._push(t + self.scaler.record_interval_s, _RECORD)
            elif kind == _CONTROL:
                self._control()
                if not self._finished():
                    self._push(t + self.scaler.control_interval_s, _CONTROL)
        return self._result()

    def _finished(self) -> bool:
        return self.done == len(self.reqs) and self.now >= self.duration_s

    # -- cluster --
    def _target(self) -> int:
        return sum(1 for r in self.replicas if r.state in (_STARTING, _READY))

    def _new_replica(self, now: float, ready_at: float) -> _Replica:
        rep = _Replica(len(self.replicas), now, ready_at, self.num_blocks)
        self.replicas.append(rep)
        return rep

    def _snapshot(self) -> Snapshot:
        loads = tuple(
            ReplicaMetrics(len(r.waiting), len(r.running), 1.0 - r.free_blocks / self.num_blocks)
            for r in self.replicas
            if r.state == _READY
        )
        return Snapshot(self.now, loads, len(self.queue))

    def _control(self) -> None:
        ready = sum(1 for r in self.replicas if r.state == _READY)
        target = self._target()
        want = self.scaler.decide(self.now, ready, target)
        if want != target:
            self._scale_to(want, target)

    def _scale_to(self, want: int, target: int) -> None:
        self.scale_events += 1
        if want > target:
            for _ in range(want - target):
                rep = self._new_replica(self.now, self.now + self.cost.startup_s)
                self._push(rep.ready_at, _READY_EV, rep.rid)
        else:
            excess = target - want
            starting = sorted((r for r in self.replicas if r.state == _STARTING), key=lambda r: -r.started_at)
            for rep in starting[:excess]:
                rep.state, rep.stopped_at = _STOPPED, self.now
            excess -= min(excess, len(starting))
            ready = sorted((r for r in self.replicas if r.state == _READY), key=lambda r: (r.load, -r.rid))
            for rep in ready[:excess]:
                rep.state = _DRAINING
                self._maybe_stop(rep)
        self.timeline.append((self.now, want))

    def _maybe_stop(self, rep: _Replica) -> None:
        if rep.state == _DRAINING and not rep.busy and rep.load == 0:
            rep.state, rep.stopped_at = _STOPPED, self.now

    def _on_ready(self, rep: _Replica) -> None:
        if rep.state != _STARTING:
            return  # cancelled while starting
        rep.state = _READY
        self._dispatch()

    def _on_arrival(self, req: _Req) -> None:
        self.queue.append(req)
        if self._target() == 0:
            # Held at zero replicas: the scheduler reports at once and the controller acts.
            self.scaler.record(self._snapshot(), push_now=True)
            self._control()
        self._dispatch()

    # -- routing: late binding from the global queue --
    def _dispatch(self) -> None:
        """Bind queued requests, oldest first, as cluster.scheduler does with `kv_aware` placement.

        A replica can start a request when nothing waits in its own queue, it has a
        free batch slot and KV blocks for the prompt (StartLimits defaults); among
        those, the lowest cost wins: prompt tokens + its prefill backlog + 8 x its
        active requests (KVAwarePolicy without prefix hits), skipping a replica far
        busier than the least busy one (balance_abs 8, balance_rel 1.5).
        """
        bs, max_batch = self.cost.block_size, self.cost.max_batch_size
        watermark = int(0.01 * self.num_blocks)
        while self.queue:
            ready = [r for r in self.replicas if r.state == _READY]
            if not ready:
                return
            req = self.queue[0]
            need = _blocks(req.prompt + 1, bs)
            min_active = min(r.load for r in ready)
            best, best_cost = None, math.inf
            for rep in ready:
                active = rep.load
                if rep.waiting or active >= max_batch or rep.free_blocks - need < watermark:
                    continue
                if active - min_active > 8 and active > 1.5 * min_active:
                    continue
                backlog = sum(q.prompt + q.generated - q.computed for q in rep.running if q.prompt + q.generated - q.computed > 1)
                cost = req.prompt + backlog + 8.0 * active
                if cost < best_cost:
                    best, best_cost = rep, cost
            if best is None:
                return
            self.queue.popleft()
            best.waiting.append(req)
            best.waiting_blocks += need
            if not best.busy:
                self._start_step(best)

    # -- one engine step --
    def _start_step(self, rep: _Replica) -> None:
        cost, bs = self.cost, self.cost.block_size
        budget = cost.max_batched_tokens
        plan: list[tuple[_Req, int]] = []
        decode_batch = prefill_tokens = ctx = 0
        # Running requests first, oldest first; preempt the newest when blocks run out.
        i = 0
        while i < len(rep.running) and budget > 0:
            req = rep.running[i]
            pending = req.prompt + req.generated - req.computed
            n = min(pending, budget)
            extra = _blocks(req.computed + n, bs) - req.blocks
            while extra > rep.free_blocks and len(rep.running) - 1 > i:
                self._preempt(rep, rep.running[-1])
            if extra > rep.free_blocks:
                assert i > 0, "a request alone always fits (checked at construction)"
                self._preempt(rep, req)
                break
            rep.free_blocks -= extra
            req.blocks += extra
            plan.append((req, n))
            budget -= n
            if pending == 1:
                decode_batch += 1
                ctx += req.computed
            else:
                prefill_tokens += n
            i += 1
        # Then waiting requests, first come first served.
        while rep.waiting and budget > 0 and len(rep.running) < cost.max_batch_size:
            req = rep.waiting[0]
            pending = req.prompt + req.generated - req.computed
            n = min(pending, budget)
            need = _blocks(req.computed + n, bs) - req.blocks
            if need > rep.free_blocks:
                break
            rep.waiting.popleft()
            rep.waiting_blocks -= _blocks(req.prompt + 1, bs)
            rep.running.append(req)
            rep.free_blocks -= need
            req.blocks += need
            plan.append((req, n))
            budget -= n
            prefill_tokens += n
        if not plan:
            rep.busy = False
            return
        rep.busy = True
        rep.step_plan = plan
        self._push(self.now + cost.step_time(decode_batch, prefill_tokens, ctx), _STEP, rep.rid)

    def _preempt(self, rep: _Replica, req: _Req) -> None:
        rep.running.remove(req)
        rep.free_blocks += req.blocks
        req.blocks = 0
        req.computed = 0
        req.preemptions += 1
        rep.waiting.appendleft(req)
        rep.waiting_blocks += _blocks(req.prompt + 1, self.cost.block_size)

    def _on_step_end(self, rep: _Replica) -> None:
        now = self.now
        finished = False
        for req, n in rep.step_plan:
            req.computed += n
            if req.computed == req.prompt + req.generated:
                req.generated += 1
                if req.generated == 1:
                    req.first_token = now
                if req.generated >= req.output:
                    req.finish = now
                    rep.running.remove(req)
                    rep.free_blocks += req.blocks
                    req.blocks = 0
                    self.done += 1
                    finished = True
        rep.step_plan = []
        rep.busy = False
        if rep.running or rep.waiting:
            self._start_step(rep)
        self._maybe_stop(rep)
        if finished and self.queue:
            self._dispatch()

    # -- results --
    def _result(self) -> SimResult:
        end = max(self.duration_s, max((r.finish for r in self.reqs), default=0.0))
        replica_s = sum((min(r.stopped_at, end) if r.stopped_at is not None else end) - r.started_at for r in self.replicas)
        ttft, tpot, ok = [], [], 0
        for r in self.reqs:
            if r.finish < 0:
                continue
            t1 = r.first_token - r.arrival
            t2 = (r.finish - r.first_token) / (r.output - 1) if r.output > 1 else 0.0
            ttft.append(t1)
            tpot.append(t2)
            if t1 <= self.slo.ttft_s and (self.slo.tpot_s is None or t2 <= self.slo.tpot_s):
                ok += 1
        # Time-weighted mean of replicas asked for.
        area, peak = 0.0, 0
        for (t0, n), (t1, _) in zip(self.timeline, self.timeline[1:] + [(end, 0)]):
            area += n * (min(t1, end) - min(t0, end))
            peak = max(peak, n)
        n_req = len(self.reqs)
        return SimResult(
            policy=self.scaler.name,
            num_requests=n_req,
            completed=self.done,
            slo_attainment=ok / n_req if n_req else 1.0,
            ttft_p50_s=_pct(ttft, 50),
            ttft_p99_s=_pct(ttft, 99),
            tpot_p50_s=_pct(tpot, 50),
            tpot_p99_s=_pct(tpot, 99),
            replica_hours=replica_s / 3600.0,
            cost_usd=replica_s / 3600.0 * self.price,
            peak_replicas=peak,
            mean_replicas=area / end if end > 0 else 0.0,
            scale_events=self.scale_events,
            preemptions=sum(r.preemptions for r in self.reqs),
            duration_s=end,
            timeline=list(self.timeline),
        )


def simulate(
    trace: Sequence[TraceRequest],
    cost: ReplicaCostModel,
    autoscaler: Autoscaler,
    slo: SLO,
    price_per_replica_hour: float = 1.0,
    duration_s: float | None = None,
) -> SimResult:
    """Run one trace under one autoscaler (see `Simulator`)."""
    return Simulator(trace, cost, autoscaler, slo, price_per_replica_hour, duration_s).run()


def min_static_replicas(
    trace: Sequence[TraceRequest],
    cost: ReplicaCostModel,
    slo: SLO,
    attainment: float = 0.99,
    max_replicas: int = 64,
    duration_s: float | None = None,
) -> tuple[int, SimResult]:
    """The fewest static replicas meeting `attainment` on this trace, and that run.

    Attainment grows with the replica count (more replicas never slow a
    request under least-loaded routing), so the search doubles, then bisects.
    Raises ValueError when even `max_replicas` falls short.
    """
    runs: dict[int, SimResult] = {}

    def ok(n: int) -> bool:
        if n not in runs:
            runs[n] = simulate(trace, cost, StaticAutoscaler(n), slo, duration_s=duration_s)
        return runs[n].slo_attainment >= attainment

    hi = 1
    while not ok(hi):
        if hi >= max_replicas:
            raise ValueError(
                f"even {max_replicas} static replicas reach only {runs[hi].slo_attainment:.1%} SLO attainment "
                f"(want {attainment:.1%}): loosen the SLO or lower the rate"
            )
        hi = min(hi * 2, max_replicas)
    lo = hi // 2 + 1 if hi > 1 else 1
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi, runs[hi]
