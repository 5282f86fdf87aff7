"""AsyncLLMEngine: one stepping thread serving many coroutines."""

from __future__ import annotations

import asyncio

import pytest

from shardline.engine import AsyncLLMEngine, EngineConfig, LLM, SamplingParams


@pytest.fixture(scope="module")
def async_engine(model_dir):
    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(model_dir), num_kv_blocks=128, block_size=4, max_model_len=256))
    yield engine
    engine.shutdown()


async def collect(engine, rid, prompt, params):
    outs = [out async for out in engine.generate(rid, prompt, params)]
    return outs


def test_concurrent_streams_match_offline(async_engine, model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(3 + i, 20 + 2 * i))} for i in range(6)]

    async def main():
        return await asyncio.gather(*(collect(async_engine, f"r{i}", p, params) for i, p in enumerate(prompts)))

    streams = asyncio.run(main())
    offline = LLM(str(model_dir), num_kv_blocks=128, block_size=4, max_model_len=256).generate(prompts, params, use_tqdm=False)
    for stream, ref in zip(streams, offline):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == ref.outputs[0].token_ids
        # cumulative outputs grow one token per step
        assert [len(o.outputs[0].token_ids) for o in stream] == list(range(1, 9))


def test_streamed_text_never_shrinks_with_stop_strings(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=["zzzz-never"])

    async def main():
        return await collect(async_engine, "stop-stream", "The quick brown fox", params)

    texts = [o.outputs[0].text for o in asyncio.run(main())]
    for a, b in zip(texts, texts[1:]):
        assert b.startswith(a)


def test_abort_on_disconnect_frees_blocks(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        got = 0
        async for _ in async_engine.generate("leaver", {"prompt_token_ids": list(range(3, 60))}, params):
            got += 1
            if got == 3:
                break  # the client goes away
        for _ in range(100):
            await asyncio.sleep(0.02)
            if async_engine.stats()["num_running"] == 0 and async_engine.stats()["num_free_blocks"] == 128:
                return True
        return False

    assert asyncio.run(main())
    assert not async_engine.engine.has_unfinished_requests()


def test_bad_request_raises_and_others_continue(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def main():
        good = asyncio.create_task(collect(async_engine, "good", {"prompt_token_ids": [5, 6, 7]}, params))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await collect(async_engine, "bad", {"prompt_token_ids": [5, 99999]}, params)
        return await good

    outs = asyncio.run(main())
    assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 6


def test_a_factory_builds_the_engine_on_the_stepping_thread(model_dir):
    import threading

    from shardline.engine import LLMEngine

    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=32, block_size=4, max_model_len=64))

    engine = AsyncLLMEngine(build)
    try:
        assert built_on == [engine._thread.name] and built_on[0] != threading.current_thread().name
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        outs = asyncio.run(collect(engine, "f", {"prompt_token_ids": [5, 6, 7]}, params))
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
    finally:
        engine.shutdown()


def test_a_factory_that_fails_raises_in_the_constructor(tmp_path):
    def build():
        raise FileNotFoundError(f"no model at {tmp_path / 'missing'}")

    with pytest.raises(FileNotFoundError, match="no model at"):
        AsyncLLMEngine(build)


def test_a_request_in_the_running_step_counts_as_running(model_dir):
    """Load is published once the step's batch is chosen, not only after the model ran.

    A router reading `stats()` during a long prefill must see the request
    running (a free slot is still free), not waiting: the head-node scheduler
    binds nothing to a replica that reports waiting requests.
    """
    import threading
    import time

    from shardline.engine import LLMEngine

    gate = threading.Event()

    def build():
        engine = LLMEngine(EngineConfig(model=str(model_dir), num_kv_blocks=32, block_size=4, max_model_len=64))
        execute = engine.runner.execute

        def held_execute(sched):
            gate.wait(timeout=60)  # the model "runs" until the test has looked
            return execute(sched)

        engine.runner.execute = held_execute
        return engine

    engine = AsyncLLMEngine(build)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

        async def main():
            task = asyncio.ensure_future(collect(engine, "long-prefill", {"prompt_token_ids": list(range(3, 40))}, params))
            deadline = time.monotonic() + 5
            while engine.stats()["num_running"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            during = engine.stats()
            gate.set()
            return during, await task

        during, outs = asyncio.run(main())
        assert (during["num_running"], during["num_waiting"], during["num_pending"]) == (1, 0, 0)
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2
    finally:
        gate.set()
        engine.shutdown()
