"""The scheduler wiring without a Ray cluster: a real ModelReplica (tiny random model) reports to
an in-process AsyncScheduler, and ReplicaRouter places through it over a fake Serve handle.

What a real cluster adds (the actor, Serve's request router, HTTP) is in test_serve_routing.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from shardline.cluster.async_scheduler import AsyncScheduler
from shardline.cluster.global_queue import QueueLimits
from shardline.cluster.scheduler import ClusterSchedulerConfig
from shardline.cluster.tenants import Tenant, TenantRegistry
from shardline.deployments.config import ServeConfig
from shardline.deployments.events import Admitted, Delta, GenerateRequest, Rejected
from shardline.deployments.replica import ModelReplica
from shardline.deployments.reporter import ReplicaReporter
from shardline.deployments.router import ReplicaRouter, route_request, salt_keys
from shardline.deployments.scheduling import SchedulerLink, SchedulerUnavailable, scheduler_config
from shardline.deployments.serve_router import ScheduledRequestRouter, pow2_candidates, replica_hint
from shardline.deployments.service import OpenAIService
from shardline.engine import SamplingParams
from shardline.engine.request import Request

BLOCK = 4


class FakeLink:
    """SchedulerLink's interface over an in-process AsyncScheduler; `down` makes calls fail."""

    def __init__(self, scheduler: AsyncScheduler):
        self.scheduler = scheduler
        self.down = False
        self.calls: list[str] = []

    def available(self) -> bool:
        return not self.down

    async def call(self, method, *args, timeout_s=None):
        self.calls.append(method)
        if self.down:
            raise SchedulerUnavailable("down")
        result = getattr(self.scheduler, method)(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def place(self, request):
        return await self.call("place", request)

    def notify(self, method, *args):
        self.calls.append(method)
        if not self.down:
            getattr(self.scheduler, method)(*args)


class FakeResponse:
    """A Serve streaming response over a ModelReplica's generator."""

    def __init__(self, gen):
        self._gen = gen
        self.cancelled = False

    def __aiter__(self):
        return self._gen.__aiter__()

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """DeploymentHandle.options(stream=True).generate.remote(request) over replicas by id."""

    def __init__(self, replicas: dict[str, ModelReplica]):
        self.replicas = replicas
        self.sent_to: list[str | None] = []
        self.generate = SimpleNamespace(remote=self._remote)

    def options(self, stream=False):
        return self

    def _remote(self, request: GenerateRequest):
        rid = request.replica_hint if request.replica_hint in self.replicas else sorted(self.replicas)[0]
        self.sent_to.append(request.replica_hint)
        return FakeResponse(self.replicas[rid].generate(request))


@pytest.fixture(scope="module")
def replicas(model_dir):
    config = ServeConfig(
        model=str(model_dir), max_model_len=256, num_kv_blocks=48, block_size=BLOCK, max_num_seqs=4, max_queue_len=8
    )
    reps = {rid: ModelReplica(config) for rid in ("r0", "r1")}
    for rid, r in reps.items():
        r.replica_id = rid
    yield config, reps
    for r in reps.values():
        r.shutdown()


def request(i: int, ids: list[int], salt=None, tenant="anonymous", max_tokens=3) -> GenerateRequest:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return GenerateRequest(f"q{i}", list(ids), params, cache_salt=salt, tenant_id=tenant)


async def drain(gen) -> list:
    return [event async for event in gen]


def index_of(scheduler: AsyncScheduler, rid: str) -> set[bytes]:
    return set(scheduler.core.index._replicas[rid].hashes)


def test_route_request_hashes_equal_the_engines_including_a_str_salt():
    ids = list(range(3, 3 + 4 * BLOCK + 2))
    for salt in (None, "acme-4f1c", b"acme-4f1c", "naïve"):
        engine_salt = salt.encode() if isinstance(salt, str) else salt
        req = Request("x", ids, max_tokens=1, cache_salt=engine_salt)
        req.init_block_hashes(BLOCK)
        routed = route_request(request(0, ids, salt), BLOCK)
        assert list(routed.block_hashes) == req.block_hashes and len(routed.block_hashes) == 4
        assert routed.num_prompt_tokens == len(ids) and routed.max_tokens == 3
    assert salt_keys("a") == (b"a",) and salt_keys(None) == () and salt_keys(b"") == ()
    assert route_request(request(0, ids, "s"), BLOCK).block_hashes != route_request(request(0, ids), BLOCK).block_hashes
    assert route_request(request(0, [65, 66]), BLOCK, with_text=True).prompt_text == "AB"


def test_reporter_keeps_the_index_exact_through_lost_reports_and_a_restart(replicas):
    config, reps = replicas
    replica = reps["r0"]

    async def main():
        sched = AsyncScheduler(scheduler_config(config))
        link = FakeLink(sched)
        rep = ReplicaReporter("r0", replica, link, heartbeat_s=0.0)
        assert await rep.report_once()
        prompt = list(range(10, 10 + 6 * BLOCK))
        await drain(replica.generate(request(1, prompt, salt="t1")))
        assert await rep.report_once()
        cached = set(replica.engine.engine.cached_block_hashes())
        assert index_of(sched, "r0") == cached
        assert set(route_request(request(2, prompt, salt="t1"), BLOCK).block_hashes) <= cached
        # A lost report leaves a gap: the next one gets resync, and the snapshot restores the index.
        await drain(replica.generate(request(3, list(range(100, 100 + 5 * BLOCK)))))
        link.down = True
        assert not await rep.report_once()
        link.down = False
        assert await rep.report_once() and rep.num_snapshots == 1
        assert index_of(sched, "r0") == set(replica.engine.engine.cached_block_hashes())
        # A restarted scheduler knows nothing and asks for a snapshot at the replica's first report.
        link.scheduler = fresh = AsyncScheduler(scheduler_config(config))
        assert await rep.report_once() and rep.num_snapshots == 2
        assert index_of(fresh, "r0") == set(replica.engine.engine.cached_block_hashes())
        assert not fresh.stats().replicas[0].stale_index

    asyncio.run(main())


def test_router_places_follows_and_reports_usage(replicas):
    config, reps = replicas

    async def main():
        sched = AsyncScheduler(scheduler_config(config))
        link = FakeLink(sched)
        reporters = {rid: ReplicaReporter(rid, r, link, heartbeat_s=0.0) for rid, r in reps.items()}
        for rep in reporters.values():
            await rep.report_once()
        handle = FakeHandle(reps)
        router = ReplicaRouter(handle, 1, link, BLOCK)
        context = list(range(200, 200 + 8 * BLOCK))
        first = await drain(router.generate(request(10, context + [7], tenant="a")))
        for rep in reporters.values():
            await rep.report_once()
        second_req = request(11, context + [8, 9], tenant="a")
        second = await drain(router.generate(second_req))
        assert isinstance(first[0], Admitted) and isinstance(second[-1], Delta) and second[-1].finished
        assert handle.sent_to[0] == handle.sent_to[1] is not None  # the cached replica, both times
        assert max(e.num_cached_tokens for e in second if isinstance(e, Delta)) == 8 * BLOCK
        assert second_req.expected_cached_tokens == 8 * BLOCK
        await asyncio.sleep(0)
        usage = sched.core.ledger.by_tenant()["a"]
        assert (usage.requests, usage.cached_tokens, usage.completion_tokens) == (2, 8 * BLOCK, 6)
        assert sched.stats().num_in_flight == 0 and router.num_scheduled == 2
        # The scheduler unreachable: Serve's own routing, and the request is served.
        link.down = True
        events = await drain(router.generate(request(12, context + [1], tenant="a")))
        assert events[-1].finished and handle.sent_to[-1] is None and router.num_fallback == 1

    asyncio.run(main())


def test_router_answers_rejections_and_cancels_a_queued_request(replicas):
    config, reps = replicas

    async def main():
        tenants = TenantRegistry(default=Tenant("anonymous", max_queued=1))
        sched = AsyncScheduler(ClusterSchedulerConfig(queue=QueueLimits(max_queued=100, default_retry_after_s=3)), tenants)
        link = FakeLink(sched)
        router = ReplicaRouter(FakeHandle(reps), 1, link, BLOCK)
        # No replica has reported: requests wait in the global queue.
        waiting = asyncio.create_task(drain(router.generate(request(20, [1, 2, 3]))))
        await asyncio.sleep(0.05)
        assert sched.stats().num_queued_interactive == 1
        refused = await drain(router.generate(request(21, [1, 2, 3])))
        assert isinstance(refused[0], Rejected) and refused[0].status == 429 and refused[0].retry_after_s >= 1
        waiting.cancel()  # the client left while queued
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert sched.stats().num_queued_interactive == 0 and "cancel" in link.calls

    asyncio.run(main())


def test_service_names_the_tenant_by_api_key_then_user(replicas, model_dir):
    from shardline.engine.tokenizer import Tokenizer

    from shardline.deployments.errors import APIError
    from shardline.deployments.protocol import CompletionRequest

    config, reps = replicas
    seen: list[GenerateRequest] = []

    class Recorder:
        async def generate(self, req):
            seen.append(req)
            async for event in reps["r0"].generate(req):
                yield event

    tenants = TenantRegistry.from_dict(
        {"tenants": [{"id": "acme", "api_keys": ["sk-acme"], "cache_salt": "acme-salt"}]}
    )
    service = OpenAIService(config, Tokenizer(model_dir), Recorder(), tenants)
    body = CompletionRequest(model=config.model_name, prompt="hello there", max_tokens=2, user="bob")
    asyncio.run(service.completions(body, "sk-acme"))
    asyncio.run(service.completions(body, "sk-unknown"))
    assert [(r.tenant_id, r.cache_salt) for r in seen] == [("acme", b"acme-salt"), ("user:bob", None)]
    strict = OpenAIService(config, Tokenizer(model_dir), Recorder(), TenantRegistry(require_api_key=True))
    with pytest.raises(APIError) as e:
        asyncio.run(strict.completions(body, None))
    assert e.value.status == 401


def test_serve_router_follows_the_hint_else_two_choices():
    import random

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u)) for u in ("a", "b", "c")]

    def pending(hint):
        return SimpleNamespace(args=[SimpleNamespace(replica_hint=hint)])

    router = SimpleNamespace(_rng=random.Random(0))
    choose = ScheduledRequestRouter.choose_replicas
    assert asyncio.run(choose(router, replicas, pending("b"))) == [[replicas[1]]]
    for hint in (None, "gone"):
        (rank,) = asyncio.run(choose(router, replicas, pending(hint)))
        assert len(rank) == 2 and len({id(r) for r in rank}) == 2
    assert replica_hint(None) is None and replica_hint(SimpleNamespace(args=[])) is None
    assert pow2_candidates([], random.Random(0)) == [] and pow2_candidates(replicas[:1], random.Random(0)) == [replicas[:1]]


def test_link_fails_fast_while_down_and_looks_the_actor_up_again():
    now = [0.0]
    starts = []

    def start():
        starts.append(now[0])
        return None  # no actor yet

    link = SchedulerLink("x", start=start, retry_s=1.0, clock=lambda: now[0])
    with pytest.raises(SchedulerUnavailable):
        link.actor()
    assert not link.available()
    with pytest.raises(SchedulerUnavailable):
        link.actor()
    assert starts == [0.0]  # no second look-up while down
    now[0] = 1.5
    assert link.available()
    with pytest.raises(SchedulerUnavailable):
        link.actor()
    assert starts == [0.0, 1.5] and link.num_failures == 2
    link.notify("finished", "q", None)  # never raises


class ApplyActor:
    """A scheduler actor handle over an in-process AsyncScheduler that records each `apply` batch."""

    def __init__(self, scheduler: AsyncScheduler, fail: bool = False):
        self.batches: list[list[tuple[str, tuple]]] = []
        self.apply = SimpleNamespace(remote=self._apply)
        self.wait_placed = SimpleNamespace(remote=lambda *a: scheduler.wait_placed(*a))
        self.scheduler, self.fail = scheduler, fail

    def _apply(self, ops):
        from ray.exceptions import RayActorError

        self.batches.append(ops)
        if self.fail:
            raise RayActorError()
        answer = asyncio.get_running_loop().create_future()  # like an ObjectRef: awaitable, ready a turn later
        asyncio.get_running_loop().call_soon(answer.set_result, self.scheduler.apply(ops))
        return answer


def test_link_sends_one_turns_places_and_notices_as_one_call():
    from shardline.cluster.scheduler import ReplicaReport
    from shardline.cluster.placement import ReplicaLoad, RouteRequest

    async def main():
        sched = AsyncScheduler(tick_s=0.001)
        sched.report(ReplicaReport("r0", 0, ReplicaLoad(0, 0, 1000, 1000, 0, 2)))
        actor = ApplyActor(sched)
        link = SchedulerLink("x", start=lambda: actor)

        def rr(rid):
            return RouteRequest(rid, "t", (), 16, 64, 8)

        # Three places in one turn (the third given up before the batch leaves) and a notice.
        tasks = [asyncio.create_task(link.place(rr(f"q{i}"))) for i in range(3)]
        await asyncio.sleep(0)  # the tasks queue their places
        tasks[2].cancel()
        link.notify("finished", "q0", None)
        got = await asyncio.gather(*tasks, return_exceptions=True)
        assert [op[0] for op in actor.batches[0]] == ["place", "place", "finished"] and len(actor.batches) == 1
        assert [a.replica_id for a in got[:2]] == ["r0", "r0"] and isinstance(got[2], asyncio.CancelledError)
        assert sched.stats().num_in_flight == 1  # q0 finished in the same call that placed it; q1 runs

        # The replica is full: the batch parks the place, `wait_placed` collects it once there is room.
        link.notify("finished", "q1", None)
        sched.report(ReplicaReport("r0", 1, ReplicaLoad(2, 0, 1000, 1000, 0, 2)))
        task = asyncio.create_task(link.place(rr("q3")))
        await asyncio.sleep(0.01)
        assert not task.done() and actor.batches[-2:] == [[("finished", ("q1", None))], [("place", (rr("q3"),))]]
        sched.report(ReplicaReport("r0", 2, ReplicaLoad(0, 0, 1000, 1000, 0, 2)))
        assert (await asyncio.wait_for(task, 1.0)).replica_id == "r0"

        # A parked place whose client leaves: cancel in the next batch; its wait answers 499.
        sched.report(ReplicaReport("r0", 3, ReplicaLoad(2, 0, 1000, 1000, 0, 2)))
        task = asyncio.create_task(link.place(rr("q4")))
        await asyncio.sleep(0.01)
        link.notify("cancel", "q4")
        assert (await asyncio.wait_for(task, 1.0)).status == 499
        assert sched.stats().num_queued_interactive == 0

        # A batch that fails takes the link down and fails its places the way `call` does.
        down = SchedulerLink("y", start=lambda: ApplyActor(sched, fail=True))
        with pytest.raises(SchedulerUnavailable):
            await down.place(rr("q5"))
        assert not down.available() and down.num_failures == 1

    asyncio.run(main())


def test_scheduler_config_from_serve_config():
    c = ServeConfig(routing="prefix_approx", num_replicas=3, max_queue_len=10, retry_after_s=2)
    s = scheduler_config(c)
    assert (s.policy, s.queue.max_queued, s.queue.default_retry_after_s) == ("prefix_approx", 30, 2)
    auto = ServeConfig(autoscaling_config={"min_replicas": 1, "max_replicas": 5}, max_queue_len=4)
    assert auto.global_queue_limit == 20
    with pytest.raises(ValueError, match="routing must be one of"):
        ServeConfig(routing="random")


def test_cli_routing_and_tenants_flags(tmp_path, model_dir):
    from shardline.cli import main
    from shardline.deployments.cli import build_config

    tenants = tmp_path / "tenants.yaml"
    tenants.write_text("tenants:\n  - id: acme\n    api_keys: [sk-1]\n    cache_salt: s1\n")

    class Args:
        config = None
        model = "b"
        served_model_name = dtype = max_model_len = num_kv_blocks = max_num_seqs = num_replicas = None
        request_timeout = grace_period = max_queue_len = host = port = address = None
        routing = "round_robin"
        tenants = "tenants.yaml"

    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        config, _ = build_config(Args)
    finally:
        os.chdir(cwd)
    assert config.routing == "round_robin" and config.tenants_file == str(tenants)  # absolute: replicas run elsewhere
    # A bad tenants file fails before Ray starts, with exit status 2.
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  - id: x\n    weight: -1\n")
    assert main(["serve", "--model", str(model_dir), "--tenants", str(bad)]) == 2
    import argparse

    from shardline.deployments.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["serve", "--routing", "prefix_approx"]).routing == "prefix_approx"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--routing", "random"])


def test_status_shows_the_schedulers_global_queue():
    from shardline.deployments.status import render_text, scheduler_summary, summarize

    sched = AsyncScheduler(ClusterSchedulerConfig(policy="kv_aware"))
    sched.core.submit(route_request(request(1, list(range(40))), BLOCK), 0.0)  # no replica yet: it waits
    details = {"applications": {"a": {"status": "RUNNING", "deployments": {}}}}
    report = summarize(details, "a", [], scheduler_summary(sched.stats()))
    assert report["scheduler"]["global_queue"] == 1 and report["scheduler"]["queued_by_tenant"] == {"anonymous": 1}
    assert "scheduler: kv_aware, global queue 1 (interactive 1, batch 0)" in render_text(report)
    assert "scheduler: not running" in render_text(summarize(details, "a", []))
