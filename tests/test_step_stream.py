"""The step stream (deployments/step_stream.py): outboxes alone, then the ingress's
ReplicaRouter over a real ModelReplica, in process.

`InProcessHandle` stands in for the ModelReplica DeploymentHandle: each call
runs the replica's generator in its own task, and `cancel()` cancels that
task, so the replica sees CancelledError at its next await as it does under
Serve. The Serve path itself is covered by tests/test_serve_e2e.py, whose
server runs with the step stream on (the default).
"""

from __future__ import annotations

import asyncio

import pytest

from shardline.deployments.config import ServeConfig
from shardline.deployments.events import Admitted, ChoiceDelta, Delta, Failed, GenerateRequest
from shardline.deployments.replica import ModelReplica
from shardline.deployments.router import ReplicaRouter
from shardline.deployments.step_stream import NotHere, Outboxes, StepStreams, Subscription
from shardline.engine.sampling_params import SamplingParams


def run(coro):
    return asyncio.run(coro)


# ---- outboxes ------------------------------------------------------------------


def test_one_batch_carries_every_request_of_a_step():
    async def go():
        boxes = Outboxes(idle_s=0.05)
        box = boxes.get("ingress-1")
        box.open_requests = 3
        stream = boxes.stream("ingress-1")
        for i in range(3):  # one engine step: three requests' deltas in one loop iteration
            box.put(f"r{i}", Delta([ChoiceDelta(0, "x", [i])]))
        first = await stream.__anext__()
        assert [rid for rid, _ in first] == ["r0", "r1", "r2"]
        for _ in range(3):
            box.request_ended()
        # Idle with nothing open: the subscription ends by itself.
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 1.0)

    run(go())


def test_a_new_subscription_supersedes_the_old_and_events_wait_for_a_reader():
    async def go():
        boxes = Outboxes(idle_s=5.0)
        box = boxes.get("ingress-1")
        box.open_requests = 1
        box.put("r0", Delta([ChoiceDelta(0, "a", [1])]))  # before anyone reads: kept
        old = boxes.stream("ingress-1")
        assert [rid for rid, _ in await old.__anext__()] == ["r0"]
        pending = asyncio.ensure_future(old.__anext__())
        await asyncio.sleep(0)
        new = boxes.stream("ingress-1")
        box.put("r0", Delta([ChoiceDelta(0, "b", [2])], finished=True))
        got = await new.__anext__()  # the newer subscription gets what follows
        assert got[0][1].finished
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 1.0)
        await new.aclose()

    run(go())


def test_orphaned_outboxes_are_forgotten():
    boxes = Outboxes(orphan_ttl_s=0.0)
    boxes.get("gone").put("r0", Delta())
    boxes.get("other")  # creating another sweeps the orphan (no reader, nothing open)
    assert len(boxes) == 1


# ---- the router over a real replica ---------------------------------------------------


class _Call:
    """One in-process handle call: the generator runs in its own task, like a Serve replica call."""

    def __init__(self, agen):
        self._items: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump(agen))

    async def _pump(self, agen):
        try:
            async for item in agen:
                self._items.put_nowait(("item", item))
            self._items.put_nowait(("end", None))
        except BaseException as e:
            self._items.put_nowait(("error", e))
            raise

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, value = await self._items.get()
        if kind == "item":
            return value
        self._items.put_nowait((kind, value))
        if kind == "end":
            raise StopAsyncIteration
        raise RuntimeError(f"replica call failed: {value!r}")

    def cancel(self):
        self._task.cancel()


class _Method:
    def __init__(self, fn, counter=None):
        self._fn, self._counter = fn, counter

    def remote(self, arg):
        agen = self._fn(arg)
        if self._counter is not None:
            agen = self._counter(agen)
        return _Call(agen)


class InProcessHandle:
    """ModelReplica's handle, in process: `generate` and `subscribe` of one replica."""

    def __init__(self, replica: ModelReplica):
        self.replica = replica
        self.num_batches = 0
        self.generate = _Method(replica.generate)
        self.subscribe = _Method(replica.subscribe, self._count)

    async def _count(self, agen):
        async for batch in agen:
            self.num_batches += 1
            yield batch

    def options(self, stream: bool = False):
        return self


@pytest.fixture(scope="module")
def replica(model_dir):
    config = ServeConfig(model=str(model_dir), max_model_len=128, num_kv_blocks=64, block_size=4, max_num_seqs=8)
    replica = ModelReplica(config)
    yield replica
    replica.shutdown()


def _request(i: int, max_tokens: int = 12) -> GenerateRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return GenerateRequest(f"req-{i}", [5 + i, 17, 33, 2 + i], params)


async def _collect(router: ReplicaRouter, request: GenerateRequest) -> tuple[list[int], list]:
    tokens, events = [], []
    async for event in router.generate(request):
        events.append(event)
        if isinstance(event, Delta):
            tokens += [t for c in event.choices for t in c.token_ids]
    return tokens, events


def test_step_stream_gives_the_same_tokens_in_far_fewer_messages(replica):
    async def go(step_stream: bool):
        handle = InProcessHandle(replica)
        streams = StepStreams(handle, "ingress-1") if step_stream else None
        router = ReplicaRouter(handle, retry_after_s=1, step_streams=streams)
        results = await asyncio.gather(*(_collect(router, _request(i)) for i in range(8)))
        if streams is not None:
            await streams.aclose()
        return results, handle.num_batches

    direct, _ = run(go(False))
    streamed, num_batches = run(go(True))
    assert [tokens for tokens, _ in streamed] == [tokens for tokens, _ in direct]
    for tokens, events in streamed:
        assert len(tokens) == 12
        assert isinstance(events[0], Admitted) and events[0].replica_id == replica.replica_id
        assert isinstance(events[-1], Delta) and events[-1].finished
    num_deltas = sum(len(events) - 1 for _, events in streamed)
    # 8 requests decoding together: one message per step, not one per request per step.
    assert num_batches * 3 <= num_deltas, (num_batches, num_deltas)
    assert len(replica.outboxes) == 1 and replica.stats()["num_inflight"] == 0


def test_leaving_mid_stream_aborts_at_the_replica_and_frees_blocks(replica):
    async def go():
        handle = InProcessHandle(replica)
        streams = StepStreams(handle, "ingress-2")
        router = ReplicaRouter(handle, retry_after_s=1, step_streams=streams)
        before = replica.stats()
        stream = router.generate(_request(0, max_tokens=100))
        seen = 0
        async for event in stream:
            seen += isinstance(event, Delta)
            if seen == 2:
                break
        await stream.aclose()
        for _ in range(200):
            s = replica.stats()
            if s["num_inflight"] == 0 and s["num_running"] == 0 and s["num_free_blocks"] == s["num_blocks"]:
                break
            await asyncio.sleep(0.02)
        assert s["num_aborted"] == before["num_aborted"] + 1
        assert s["num_free_blocks"] == s["num_blocks"]
        # The next request still runs through the same subscription.
        tokens, _ = await _collect(router, _request(1, max_tokens=4))
        assert len(tokens) == 4
        await streams.aclose()

    run(go())


def test_a_subscription_that_reaches_another_replica_fails_the_requests_waiting_on_it(replica):
    async def go():
        assert [b async for b in replica.subscribe(Subscription("ingress-3", "someone-else"))] == [NotHere(replica.replica_id)]
        handle = InProcessHandle(replica)
        streams = StepStreams(handle, "ingress-3")
        queue = streams.open("req-x")
        streams.bind("req-x", "someone-else")  # Serve routed the subscription elsewhere: that replica is gone
        event = await asyncio.wait_for(queue.get(), 5.0)
        assert isinstance(event, Failed) and "gone" in event.message
        await streams.aclose()

    run(go())
