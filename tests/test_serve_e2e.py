"""End to end: a real local Ray cluster (bound to 127.0.0.1), the real `openai` client and
raw httpx. One cluster and three apps for the whole module:

    "shardline"  the tiny random model (most tests), on its ingress's own HTTP listener
                 (http_port, as `shardline serve` runs it)
    /tight       SmolLM2 with one running slot, one queue slot, a 2 s timeout (429, 408),
    /smol        SmolLM2-135M-Instruct, the real model (a chat that knows Paris): both
                 behind Serve's HTTP proxy, as `serve run serve.yaml` runs them
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from shardline.deployments.config import REPLICA_NAME, SERVE_ENV, ServeConfig
from shardline.engine import LLM, SamplingParams
from shardline.engine.pull import pull_model
from shardline.engine.tokenizer import Tokenizer
from tests.models import make_model
from tests.serve_cluster import local_serve

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

MAIN = dict(max_model_len=1024, num_kv_blocks=256, block_size=16, max_num_seqs=64, max_queue_len=64, max_body_bytes=1 << 20)
TIGHT = dict(max_model_len=2048, num_kv_blocks=128, block_size=16, max_num_seqs=1, max_queue_len=1, request_timeout_s=2.0)
# Runs for many seconds on the tiny model (invalid UTF-8 makes its detokenizer slow) and
# far longer on SmolLM2 (real compute: a thousand decode steps of a 135M model on a CPU).
LONG = dict(model="tiny", prompt="hello", max_tokens=1000, ignore_eos=True)
LONG_SMOL = dict(LONG, model="smollm2-135m")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Start Ray + Serve once, deploy the three apps, tear everything down at the end."""
    from ray import serve
    from ray.serve.api import RunTarget

    from shardline.deployments.app import build_app
    from shardline.deployments.server import free_port

    pull_model("smollm2-135m", progress=False)
    tiny = make_model(tmp_path_factory.mktemp("serve-tiny"))
    env = dict(SERVE_ENV, RAY_metrics_report_interval_ms="1000")  # inherited by the raylet's workers
    metrics_port = free_port()
    direct_port = free_port()
    with local_serve(num_cpus=8, env=env, _metrics_export_port=metrics_port) as port:
        configs = {
            "shardline": ServeConfig(model=str(tiny), served_model_name="tiny", http_port=direct_port, **MAIN),
            "tight": ServeConfig(model="smollm2-135m", **TIGHT),
            "smol": ServeConfig(model="smollm2-135m", max_model_len=2048, num_kv_blocks=256),
        }
        prefixes = {"shardline": "/", "tight": "/tight", "smol": "/smol"}
        serve.run_many([RunTarget(build_app(c), name=n, route_prefix=prefixes[n]) for n, c in configs.items()])
        yield {
            "base": f"http://127.0.0.1:{direct_port}", "proxy": f"http://127.0.0.1:{port}",
            "tiny": tiny, "configs": configs, "metrics_port": metrics_port,
        }  # fmt: skip


def replica_stats(app: str) -> list[dict]:
    from ray import serve

    return list(serve.get_deployment_handle(REPLICA_NAME, app).broadcast("stats").results(timeout_s=10))


def base_url(server, prefix: str = "") -> str:
    """The main app on its own listener; a prefixed app behind Serve's proxy."""
    return f"{server['proxy']}{prefix}" if prefix else server["base"]


def client(server, prefix: str = "") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url(server, prefix)}/v1", api_key="unused", max_retries=0, timeout=120)


def aclient(server, prefix: str = "") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url(server, prefix)}/v1", api_key="unused", max_retries=0, timeout=120)


def sse_payloads(lines) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


# ---- the happy paths ---------------------------------------------------------------------


def test_ray_is_on_loopback_with_token_auth(server):
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert get_authentication_mode() == AuthenticationMode.TOKEN  # Ray 2.60's default for a local cluster, kept
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    r = httpx.get(f"{server['base']}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completion_stream_equals_non_stream_with_exact_usage(server):
    c = client(server)
    prompt = "To be, or not to be"
    plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(
        c.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert streamed == plain.choices[0].text and plain.choices[0].finish_reason == "length"
    n_prompt = len(Tokenizer(server["tiny"]).encode(prompt))
    for usage in (plain.usage, chunks[-1].usage):
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
        assert usage.prompt_tokens_details.cached_tokens is not None
    assert chunks[-1].choices == [] and all(ch.usage is None for ch in chunks[:-1])


def test_chat_async_stream_equals_non_stream(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}]

    async def main():
        c = aclient(server)
        plain = await c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        stream = await c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = [ch async for ch in stream]
        await c.close()
        return plain, chunks

    plain, chunks = asyncio.run(main())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 16  # the plain call cached the same prompt


def test_64_concurrent_requests_match_offline_greedy(server):
    prompts = [f"{i} quick brown foxes and {i % 7} lazy dogs" for i in range(64)]

    async def one(c, p):
        r = await c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
        return r.choices[0].text

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(c, p) for p in prompts))
        finally:
            await c.close()

    served = asyncio.run(main())
    config = server["configs"]["shardline"]
    llm = LLM(str(server["tiny"]), max_model_len=config.max_model_len, num_kv_blocks=config.num_kv_blocks, block_size=config.block_size)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert served == [o.outputs[0].text for o in offline]


def test_repeated_long_prompt_reports_cached_tokens(server):
    c = client(server)
    prompt = "Paris is the capital of France, and Berlin is the capital of Germany. " * 4
    first = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    second = c.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
    n = second.usage.prompt_tokens
    assert n > 48
    assert second.usage.prompt_tokens_details.cached_tokens >= 16 * ((n - 1) // 16)
    assert first.choices[0].text == second.choices[0].text


def test_smollm2_chat_knows_paris(server):
    r = client(server, "/smol").chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=32, temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0


# ---- disconnects, status ---------------------------------------------------------------


def test_replicas_froze_their_startup_heap(server):
    """A full GC collection in a replica would walk Ray's, Serve's and torch's objects with the
    GIL held; the replica freezes them once its engine is warm (freeze_startup_heap)."""
    for app in ("shardline", "tight"):
        assert all(s["gc_frozen"] > 10_000 for s in replica_stats(app))


def test_client_disconnect_mid_stream_frees_blocks(server):
    before = replica_stats("shardline")[0]
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", f"{server['base']}/v1/completions", json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while True:
        stats = replica_stats("shardline")[0]
        idle = stats["num_inflight"] == 0 and stats["num_running"] == 0
        if idle and stats["num_free_blocks"] == stats["num_blocks"]:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    assert stats["num_aborted"] == before["num_aborted"] + 1  # cut short, not run to its end
    # The same, as an operator sees it.
    import ray

    address = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-m", "shardline", "status", "--json", "--address", address],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    replica = next(d for d in report["deployments"] if d["name"] == REPLICA_NAME)
    assert (replica["running_replicas"], replica["target_replicas"], replica["queue_depth"]) == (1, 1, 0)
    assert replica["replicas"][0]["num_free_blocks"] == replica["replicas"][0]["num_blocks"]
    assert {d["name"] for d in report["deployments"]} == {"OpenAIIngress", REPLICA_NAME}
    scheduler = report["scheduler"]  # the app's head-node scheduler, with the global queue
    assert (scheduler["policy"], scheduler["global_queue"], scheduler["num_in_flight"]) == ("kv_aware", 0, 0)
    assert [r["stale_index"] for r in scheduler["replicas"]] == [False]


# ---- errors ------------------------------------------------------------------------------

_JSON = {"content-type": "application/json"}
ERROR_CASES = [
    # (id, raw body or dict, status, param)
    ("malformed-json", '{"model": "tiny", "prompt": ', 400, None),
    ("body-is-string", '"hello"', 400, None),
    ("body-is-list", '[{"model": "tiny"}]', 400, None),
    ("body-is-number", "42", 400, None),
    ("body-is-null", "null", 400, None),
    ("missing-prompt", {"model": "tiny"}, 400, "prompt"),
    ("wrong-type", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("unknown-model", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("beyond-context", {"model": "tiny", "prompt": "x", "max_tokens": 1024}, 400, "max_tokens"),
    ("temperature-range", {"model": "tiny", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("top-p-range", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("empty-prompt", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("prompt-id-out-of-vocab", {"model": "tiny", "prompt": [1, 2, 100000]}, 400, "prompt"),
    ("prompt-id-negative", {"model": "tiny", "prompt": [1, -5]}, 400, "prompt"),
    ("stop-token-out-of-vocab", {"model": "tiny", "prompt": "x", "stop_token_ids": [70000]}, 400, "stop_token_ids"),
    ("logit-bias-out-of-vocab", {"model": "tiny", "prompt": "x", "logit_bias": {"70000": 5}}, 400, "logit_bias"),
    ("logit-bias-negative", {"model": "tiny", "prompt": "x", "logit_bias": {"-1": 5}}, 400, "logit_bias"),
    ("n-above-cap", {"model": "tiny", "prompt": "x", "n": 17}, 400, "n"),
]


@pytest.mark.parametrize("case_id, body, status, param", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_requests_get_openai_error_bodies(server, case_id, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server['base']}/v1/completions", content=content, headers=_JSON, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def test_chat_errors_and_the_server_answers_normally_after(server):
    base = f"{server['base']}/v1/chat/completions"
    r = httpx.post(base, json={"model": "tiny", "messages": [{"role": "user", "content": 5}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(base, json={"model": "tiny", "messages": "hi"})
    assert r.status_code == 400
    r = httpx.get(f"{server['base']}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    ok = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert ok.choices[0].message.role == "assistant"


def test_oversized_body_and_headers(server):
    big = json.dumps({"model": "tiny", "prompt": "x" * (2 << 20)})
    r = httpx.post(f"{server['base']}/v1/completions", content=big, headers=_JSON, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(f"{server['base']}/v1/models", headers={"x-padding": "p" * (32 << 10)})
    assert r.status_code == 431 and r.json()["error"]["code"] == "request_header_fields_too_large"
    assert httpx.get(f"{server['base']}/v1/models").status_code == 200


def test_bad_requests_do_not_disturb_requests_in_flight(server):
    good = {"model": "tiny", "prompt": "Café naïve façade", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    reference = client(server).completions.create(**{k: v for k, v in good.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})

    async def stream_text(c: httpx.AsyncClient) -> str:
        parts = []
        async with c.stream("POST", f"{server['base']}/v1/completions", json={**good, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    parts.append(json.loads(line[6:])["choices"][0]["text"])
        return "".join(parts)

    async def bad(c: httpx.AsyncClient, body) -> int:
        content = body if isinstance(body, str) else json.dumps(body)
        return (await c.post(f"{server['base']}/v1/completions", content=content, headers=_JSON)).status_code

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            goods = [asyncio.create_task(stream_text(c)) for _ in range(4)]
            await asyncio.sleep(0.05)
            statuses = await asyncio.gather(*(bad(c, body) for _, body, _, _ in ERROR_CASES * 2))
            return await asyncio.gather(*goods), statuses

    texts, statuses = asyncio.run(main())
    assert all(400 <= s < 500 for s in statuses)
    assert texts == [reference.choices[0].text] * 4


# ---- queue limit and timeouts (the /tight app: one running slot, one queue slot, 2 s) ----------


def global_queue(app: str) -> int:
    import ray

    from shardline.cluster.scheduler_actor import get_scheduler, scheduler_name

    stats = ray.get(get_scheduler(scheduler_name(app)).stats.remote(), timeout=10)
    return stats.num_queued_interactive + stats.num_queued_batch


def test_queue_full_is_429_and_slow_requests_time_out(server):
    """The second request waits in the scheduler's global queue (its limit: one per replica), the
    third is refused; the waiting one leaves the queue at its deadline without reaching the replica."""
    url = f"{base_url(server, '/tight')}/v1/completions"
    aborted_before = replica_stats("tight")[0]["num_aborted"]

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", url, json={**LONG_SMOL, "stream": True}) as running:
                assert running.status_code == 200
                lines = running.aiter_lines()
                async for line in lines:  # it is running once its first chunk arrives
                    if line.startswith("data: "):
                        break
                # Waits behind the first, then runs once the first is cut: past its own deadline either way.
                waiting = asyncio.create_task(c.post(url, json=LONG_SMOL))
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    if await asyncio.to_thread(global_queue, "tight") >= 1:
                        break
                refused = await c.post(url, json={"model": "smollm2-135m", "prompt": "hi", "max_tokens": 5})
                tail = [line async for line in lines]
            return refused, await waiting, tail

    refused, waited, tail = asyncio.run(main())
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert waited.status_code == 408 and waited.json()["error"]["code"] == "request_timeout"
    events = sse_payloads(tail)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "request_timeout"
    # Both cut requests left (the replica and the queue); it serves the next one normally.
    ok = httpx.post(url, json={"model": "smollm2-135m", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    stats = replica_stats("tight")[0]
    assert stats["num_inflight"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
    # The first was cut at the replica; the queued one too if it was bound there once the first left
    # (usually), or it left the queue at its deadline before that.
    assert stats["num_aborted"] in (aborted_before + 1, aborted_before + 2)
    assert global_queue("tight") == 0


# ---- metrics -------------------------------------------------------------------------------


def test_prometheus_metrics_have_vllm_names(server):
    names = ("ray_shardline_time_to_first_token_seconds", "ray_shardline_prompt_tokens", "ray_shardline_num_requests_running")
    deadline = time.monotonic() + 40
    while True:
        text = httpx.get(f"http://127.0.0.1:{server['metrics_port']}/metrics", timeout=10).text
        missing = [n for n in names if n not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, f"missing {missing}"
        time.sleep(1)
    assert 'model_name="tiny"' in text
