"""The serving layer without Ray: admission, deltas, response shapes, status, configs, and
the FastAPI app in process over a real ModelReplica (tiny random model)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from shardline.deployments.admission import AdmissionLoad, admit
from shardline.deployments.config import ServeConfig
from shardline.deployments.events import Admitted, ChoiceDelta, Delta, Failed, GenerateRequest
from shardline.deployments.batch_api import BatchStore
from shardline.deployments.ingress import Gate, build_openai_app
from shardline.deployments.openai_format import ResponseBuilder
from shardline.deployments.replica import ModelReplica, take_delta
from shardline.deployments.service import OpenAIService
from shardline.deployments.status import render_text, summarize
from shardline.engine import CompletionOutput, Logprob, RequestOutput, SamplingParams
from shardline.engine.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent


# ---- admission -------------------------------------------------------------------


def test_admission_counts_a_burst_at_once():
    # 4 slots in the batch, 2 may wait: the 7th request in flight is refused,
    # even before the engine has stepped (num_running still 0).
    for inflight in range(6):
        assert admit(AdmissionLoad(num_inflight=inflight, max_num_seqs=4), 2, 1) is None
    rejected = admit(AdmissionLoad(num_inflight=6, max_num_seqs=4), 2, 3)
    assert rejected.status == 429 and rejected.retry_after_s == 3


def test_admission_sees_a_cache_bound_replica():
    # Batch not full, but the engine reports requests waiting (no KV blocks).
    load = AdmissionLoad(num_inflight=3, max_num_seqs=8, num_running=1, num_engine_waiting=2)
    assert load.queue_depth == 2
    assert admit(load, 2, 1) is not None
    assert admit(load, 3, 1) is None
    assert AdmissionLoad(num_inflight=0, max_num_seqs=8).queue_depth == 0
    assert admit(AdmissionLoad(num_inflight=0, max_num_seqs=1), 0, 1) is None  # no queue, free batch


# ---- deltas and response shapes ---------------------------------------------------


def _out(texts, tokens, finish=None, finished=False, cached=0):
    outs = [CompletionOutput(i, t, list(ids), finish_reason=f) for i, (t, ids, f) in enumerate(zip(texts, tokens, finish or [None] * len(texts)))]
    return RequestOutput("r", None, [1, 2, 3], outs, finished=finished, num_cached_tokens=cached)


def test_take_delta_sends_only_what_is_new():
    sent: dict = {}
    d1 = take_delta(_out(["He", "A"], [[5], [7]]), sent)
    assert [(c.index, c.text, c.token_ids) for c in d1.choices] == [(0, "He", [5]), (1, "A", [7])]
    d2 = take_delta(_out(["Hello", "A"], [[5, 6], [7]], finish=[None, "length"]), sent)
    assert [(c.index, c.text, c.token_ids, c.finish_reason) for c in d2.choices] == [(0, "llo", [6], None), (1, "", [], "length")]
    d3 = take_delta(_out(["Hello!", "A"], [[5, 6, 8], [7]], finish=["stop", "length"], finished=True, cached=16), sent)
    assert [(c.index, c.text) for c in d3.choices] == [(0, "!")] and d3.finished and d3.num_cached_tokens == 16


def _lp(chosen, alt, names=("a", "b")):
    return {chosen: Logprob(-0.1, 1, names[0]), alt: Logprob(-2.0, 2, names[1])}


def test_response_builder_batches_and_usage():
    b = ResponseBuilder("completion", "cmpl-1", 0, "m", n=2, top_logprobs=None)
    b.admitted(0, 3)
    b.admitted(1, 4)
    b.add(0, ChoiceDelta(0, "x", [1, 2], None, "length"), 0)
    b.add(0, ChoiceDelta(1, "y", [3], None, "stop"), 0)
    b.add(1, ChoiceDelta(1, "z", [4], None, "stop"), 2)
    body = b.final_body()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][3]["text"] == "z" and body["choices"][2]["finish_reason"] is None
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11, "prompt_tokens_details": {"cached_tokens": 2}}


def test_logprobs_shapes():
    chat = ResponseBuilder("chat", "c", 0, "m", n=1, top_logprobs=1)
    chat.admitted(0, 1)
    chat.add(0, ChoiceDelta(0, "a", [5], [_lp(5, 6)], "stop"), 0)
    content = chat.final_body()["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]}]}]
    comp = ResponseBuilder("completion", "c", 0, "m", n=1, top_logprobs=2)
    comp.admitted(0, 1)
    comp.add(0, ChoiceDelta(0, "ab", [5, 6], [_lp(5, 6), _lp(6, 5, ("b", "a"))], "stop"), 0)
    lp = comp.final_body()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-0.1, -0.1] and lp["text_offset"] == [0, 1]
    assert lp["top_logprobs"][0] == {"a": -0.1, "b": -2.0}


# ---- status ---------------------------------------------------------------------


def test_status_summary_counts_replica_states_and_queue():
    details = {
        "applications": {
            "shardline": {
                "status": "RUNNING",
                "deployments": {
                    "ModelReplica": {
                        "status": "UPSCALING",
                        "target_num_replicas": 3,
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}, {"state": "STOPPING"}],
                    },
                    "OpenAIIngress": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
                },
            }
        }
    }
    stats = [{"replica_id": "a", "num_waiting": 2, "num_running": 4, "num_free_blocks": 1, "num_blocks": 9}]
    report = summarize(details, "shardline", stats)
    assert json.loads(json.dumps(report)) == report
    ingress, replica = report["deployments"]
    assert ingress["name"] == "OpenAIIngress" and ingress["running_replicas"] == 1 and ingress["queue_depth"] == 0
    assert {k: replica[k] for k in ("running_replicas", "starting_replicas", "draining_replicas", "target_replicas", "queue_depth")} == {
        "running_replicas": 1, "starting_replicas": 1, "draining_replicas": 1, "target_replicas": 3, "queue_depth": 2,
    }
    text = render_text(report)
    assert "DRAINING" in text and "ModelReplica   UPSCALING  1        1         1         3       2" in text
    with pytest.raises(ValueError, match="no Serve application"):
        summarize(details, "other", [])


# ---- configs ------------------------------------------------------------------------


def test_serve_yaml_is_a_valid_serve_config_for_the_same_app():
    from ray.serve.schema import ServeDeploySchema

    from shardline.deployments.app import app_builder
    from shardline.deployments.cli import load_config_file

    raw = yaml.safe_load((REPO / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.applications[0].import_path == "shardline.deployments.app:app_builder"
    fields, http = load_config_file(str(REPO / "serve.yaml"))
    config = ServeConfig(**fields)
    assert config.model == "smollm2-135m" and http["port"] == 8000
    from shardline.deployments.config import REPLICA_ENV

    assert raw["applications"][0]["runtime_env"]["env_vars"] == REPLICA_ENV  # what `shardline serve` sets
    app = app_builder(fields)  # builds the graph without a cluster
    assert app is not None
    with pytest.raises(Exception, match="extra"):
        app_builder({"modle": "typo"})


def test_cli_flags_override_the_config_file(tmp_path):
    from shardline.deployments.cli import build_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "a", "max_queue_len": 3, "num_replicas": 2}))

    class Args:
        config = str(cfg)
        model = "b"
        served_model_name = dtype = max_model_len = num_kv_blocks = max_num_seqs = None
        request_timeout = grace_period = max_queue_len = host = port = address = None
        num_replicas = 4
        max_num_batched_tokens = 1024

    config, options = build_config(Args)
    assert (config.model, config.max_queue_len, config.num_replicas) == ("b", 3, 4)
    assert config.engine_kwargs("folder")["max_num_batched_tokens"] == 1024  # reaches the engine's scheduler
    Args.max_num_seqs = 2048  # a full batch would not decode in one step
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        build_config(Args)
    Args.max_num_seqs = None
    assert (options.host, options.port) == ("127.0.0.1", 8000)
    Args.num_replicas = 0
    with pytest.raises(ValueError, match="num_replicas"):
        build_config(Args)


def test_replicas_of_a_local_cluster_share_the_machines_cores(tmp_path):
    """Ray sets an actor's OMP_NUM_THREADS to its num_cpus: one reserved CPU is one core of the engine."""
    from shardline.deployments.cli import build_config

    class Args:
        config = None
        model = "m"
        num_replicas = 2
        address = host = port = None

    cores = os.cpu_count() or 1
    config, _ = build_config(Args)
    assert config.replica_num_cpus == max(1, cores // 2)
    assert config.replica_threads == max(1, cores // 2)
    Args.replica_num_cpus, Args.torch_threads = 0.5, 3  # explicit settings win
    config, _ = build_config(Args)
    assert (config.replica_num_cpus, config.replica_threads) == (0.5, 3)
    del Args.replica_num_cpus, Args.torch_threads
    Args.address = "auto"  # joining a cluster: its nodes are not this machine
    config, _ = build_config(Args)
    assert (config.replica_num_cpus, config.replica_threads) == (1.0, 1)


def test_cpu_shares_count_every_rank_and_never_fall_below_one():
    config = ServeConfig(model="m", max_replicas=2, tensor_parallel_size=2).share_cpus(16)
    assert (config.replica_num_cpus, config.replica_threads) == (4.0, 4)
    assert ServeConfig(model="m", num_replicas=3).share_cpus(2).replica_num_cpus == 1.0
    assert ServeConfig(model="m", replica_num_cpus=1.5).replica_threads == 2


def test_serve_settings_are_names_ray_reads():
    import ray.serve._private.constants as constants

    from shardline.deployments.config import REPLICA_ENV, SERVE_ENV

    source = Path(constants.__file__).read_text()
    assert REPLICA_ENV.items() >= SERVE_ENV.items()
    for name, value in REPLICA_ENV.items():
        assert f'"{name}"' in source, f"Ray no longer reads {name}"
        if name.endswith("_INTERVAL_S"):
            assert float(value) <= 1.0
    assert SERVE_ENV["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"


def test_serve_processes_stream_over_grpc():
    """What SERVE_ENV turns on, read the way Serve reads it (a fresh interpreter): gRPC between
    replicas, and in the replicas (REPLICA_ENV) our code and the handles' routers on the replica's
    own event loop, but not in other processes, whose handles are called synchronously."""
    from shardline.deployments.config import REPLICA_ENV, SERVE_ENV

    code = (
        "import ray.serve._private.constants as c; print(c.RAY_SERVE_USE_GRPC_BY_DEFAULT, c.RAY_SERVE_PROXY_USE_GRPC,"
        " c.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD, c.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP)"
    )
    def read(env: dict[str, str]) -> list[str]:
        env = dict(os.environ, **env)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()

    assert read(REPLICA_ENV) == ["True", "True", "False", "False"]
    assert read(SERVE_ENV) == ["True", "True", "True", "True"]


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    assert raw["provider"]["type"] == "local"
    config = prepare_config(raw)  # fills defaults; contacts no host
    validate_config(config)
    assert config["available_node_types"]["local.cluster.node"]["max_workers"] == len(raw["provider"]["worker_ips"])
    assert any("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"])
    assert any("RAY_AUTH_MODE=token" in c and "--num-gpus" in c for c in config["worker_start_ray_commands"])
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("shardline serve" in c for c in config["head_start_ray_commands"])
    from shardline.deployments.config import SERVE_ENV

    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        ray_start = next(c for c in commands if "ray start" in c)
        for name, value in SERVE_ENV.items():  # every Serve process of every node gets the app's settings
            assert f"{name}={value}" in ray_start, name


# ---- the app in process ----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_app(model_dir):
    config = ServeConfig(
        model=str(model_dir), max_model_len=128, num_kv_blocks=64, block_size=4, max_num_seqs=8,
        max_queue_len=8, max_body_bytes=4096, max_header_bytes=2048,
    )
    replica = ModelReplica(config)
    gate = Gate()
    app = build_openai_app(OpenAIService(config, Tokenizer(model_dir), replica), gate, config)
    yield app, replica, gate, config
    replica.shutdown()


def call(app, method, path, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


def sse_payloads(text: str) -> list:
    events = [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def test_stream_equals_non_stream_and_usage_is_exact(local_app, model_dir):
    app, _, _, config = local_app
    body = {"model": config.model_name, "prompt": "The quick brown fox", "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    plain = call(app, "POST", "/v1/completions", json=body).json()
    streamed = sse_payloads(call(app, "POST", "/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}).text)
    assert streamed[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in streamed[:-2])
    assert text == plain["choices"][0]["text"]
    n_prompt = len(Tokenizer(model_dir).encode("The quick brown fox"))
    assert plain["usage"]["prompt_tokens"] == n_prompt and plain["usage"]["completion_tokens"] == 7
    assert streamed[-2]["usage"]["completion_tokens"] == 7 and streamed[-2]["choices"] == []
    assert all(c["usage"] is None for c in streamed[:-2])


def test_guard_limits_and_drain(local_app):
    app, _, gate, config = local_app
    big = json.dumps({"model": config.model_name, "prompt": "x" * 5000})
    r = call(app, "POST", "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunked():
        yield big[:2000].encode()
        yield big[2000:].encode()

    r = call(app, "POST", "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = call(app, "GET", "/v1/models", headers={"x-big": "y" * 3000})
    assert r.status_code == 431 and r.json()["error"]["type"] == "invalid_request_error"
    gate.draining = True
    try:
        assert call(app, "GET", "/health").status_code == 503
        assert call(app, "POST", "/v1/completions", json={"model": config.model_name, "prompt": "x"}).status_code == 503
    finally:
        gate.draining = False
    assert call(app, "GET", "/health").json() == {"status": "ok"}
    assert gate.num_inflight == 0


def test_batched_prompts_with_n_stream_and_not(local_app):
    app, _, _, config = local_app
    body = {"model": config.model_name, "prompt": ["The quick", "lazy dog"], "n": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = call(app, "POST", "/v1/completions", json=body).json()
    assert [c["index"] for c in plain["choices"]] == [0, 1, 2, 3]
    assert plain["choices"][0]["text"] == plain["choices"][1]["text"]  # greedy: n copies agree
    assert plain["usage"]["completion_tokens"] == 16
    chunks = sse_payloads(call(app, "POST", "/v1/completions", json={**body, "stream": True}).text)[:-1]
    streamed = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert streamed == {c["index"]: c["text"] for c in plain["choices"]}


def test_logprobs_through_the_replica(local_app):
    app, _, _, config = local_app
    r = call(app, "POST", "/v1/completions", json={"model": config.model_name, "prompt": "hello", "max_tokens": 3, "logprobs": 2, "temperature": 0, "ignore_eos": True}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp["top_logprobs"])
    r = call(app, "POST", "/v1/chat/completions", json={"model": config.model_name, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "temperature": 0, "ignore_eos": True}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(len(t["top_logprobs"]) == 2 for t in content)
    assert content[0]["logprob"] == content[0]["top_logprobs"][0]["logprob"]  # greedy took the top token
    too_many = call(app, "POST", "/v1/completions", json={"model": config.model_name, "prompt": "x", "logprobs": 20})
    assert too_many.status_code == 200  # 20 is the default cap


def test_stop_strings_cut_text_in_both_modes(local_app):
    app, _, _, config = local_app
    base = {"model": config.model_name, "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = call(app, "POST", "/v1/completions", json=base).json()["choices"][0]["text"]
    stop = full[3:5]
    assert stop
    cut = call(app, "POST", "/v1/completions", json={**base, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[: full.index(stop)]
    chunks = sse_payloads(call(app, "POST", "/v1/completions", json={**base, "stop": stop, "stream": True}).text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


class ScriptedBackend:
    """A replica stand-in that plays a fixed list of events (an exception is raised)."""

    def __init__(self, events, delay_s: float = 0.0):
        self.events = events
        self.delay_s = delay_s

    async def generate(self, request: GenerateRequest):
        for event in self.events:
            await asyncio.sleep(self.delay_s)
            if isinstance(event, Exception):
                raise event
            yield event


def scripted_app(model_dir, events, delay_s=0.0, timeout_s=None):
    config = ServeConfig(model=str(model_dir), request_timeout_s=timeout_s)
    return build_openai_app(OpenAIService(config, Tokenizer(model_dir), ScriptedBackend(events, delay_s)), Gate(), config), config


def test_ingress_listeners_share_one_port_and_stream(model_dir):
    """Two ingress listeners on one port (SO_REUSEPORT) both answer, streams included; a port held by
    another program is a clear error; stopped, the port is free again."""
    import socket

    from shardline.deployments.http_listener import HttpListener
    from shardline.deployments.server import free_port

    events = [Admitted(3), Delta([ChoiceDelta(0, "Hel", [1])]), Delta([ChoiceDelta(0, "lo", [2], None, "stop")], 0, True)]
    port = free_port()

    class Counting(ScriptedBackend):
        calls = 0

        async def generate(self, request):
            self.calls += 1
            async for event in super().generate(request):
                yield event

    config = ServeConfig(model=str(model_dir))
    backends = [Counting(events), Counting(events)]

    async def run() -> None:
        apps = [build_openai_app(OpenAIService(config, Tokenizer(model_dir), b), Gate(), config) for b in backends]
        listeners = [HttpListener(app, "127.0.0.1", port) for app in apps]
        for listener in listeners:
            listener.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                for _ in range(40):  # fresh connections: the kernel spreads them over both sockets
                    r = await c.post("/v1/completions", json={"model": model_dir.name, "prompt": "x", "stream": True},
                                     headers={"connection": "close"})  # fmt: skip
                    payloads = sse_payloads(r.text)
                    assert r.status_code == 200 and payloads[-1] == "[DONE]"
                    assert "".join(p["choices"][0]["text"] for p in payloads[:-1]) == "Hello"
            assert all(listener.serving for listener in listeners)
            assert sum(b.calls for b in backends) == 40 and min(b.calls for b in backends) > 0
        finally:
            for listener in listeners:
                await listener.stop()
        assert not any(listener.serving for listener in listeners)

    asyncio.run(run())
    with socket.socket() as s:
        # Free again after stop: no listener holds it (SO_REUSEADDR only passes the closed connections' TIME_WAIT).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(OSError, match=f"cannot serve HTTP on 127.0.0.1:{port}"):
            HttpListener(build_openai_app(OpenAIService(config, Tokenizer(model_dir), Counting(events)), Gate(), config), "127.0.0.1", port)


def test_an_ingress_with_its_own_listener_runs_on_the_head_node():
    from shardline.deployments.app import HEAD_NODE_RESOURCE, ingress_actor_options

    assert "resources" not in ingress_actor_options(ServeConfig(), {})  # behind Serve's proxy: anywhere
    options = ingress_actor_options(ServeConfig(http_port=8000), {})
    assert options["num_cpus"] == 0 and options["resources"] == {HEAD_NODE_RESOURCE: 0.001}
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    assert HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME


@pytest.mark.parametrize("failure", [Failed("engine error: boom"), RuntimeError("replica died")])
def test_engine_error_mid_stream_sends_error_event_then_done(model_dir, failure):
    events = [Admitted(3), Delta([ChoiceDelta(0, "Hel", [1])]), failure]
    app, config = scripted_app(model_dir, events)
    r = call(app, "POST", "/v1/chat/completions", json={"model": config.model_name, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    payloads = sse_payloads(r.text)
    assert r.status_code == 200 and payloads[-1] == "[DONE]"
    assert payloads[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert payloads[-2]["error"]["type"] == "server_error"
    # Not streaming, the same failure is a 500 with an error body.
    r = call(app, "POST", "/v1/chat/completions", json={"model": config.model_name, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"


def test_timeout_is_408_before_the_stream_and_an_event_after(model_dir):
    slow = [Admitted(3), Delta([ChoiceDelta(0, "a", [1])]), Delta([ChoiceDelta(0, "b", [2], None, "stop")], finished=True)]
    app, config = scripted_app(model_dir, slow, delay_s=0.5, timeout_s=1.25)  # events at 0.5, 1.0, 1.5 s
    r = call(app, "POST", "/v1/completions", json={"model": config.model_name, "prompt": "x"})
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    r = call(app, "POST", "/v1/completions", json={"model": config.model_name, "prompt": "x", "stream": True})
    payloads = sse_payloads(r.text)
    assert payloads[0]["choices"][0]["text"] == "a"
    assert payloads[-2]["error"]["code"] == "request_timeout" and payloads[-1] == "[DONE]"
    app, config = scripted_app(model_dir, slow, delay_s=0.5, timeout_s=0.2)  # not even admitted in time
    assert call(app, "POST", "/v1/completions", json={"model": config.model_name, "prompt": "x", "stream": True}).status_code == 408


def test_direct_replica_rejections_name_the_field(local_app):
    _, replica, _, _ = local_app

    def first_event(ids, **params):
        async def go():
            gen = replica.generate(GenerateRequest("r", ids, SamplingParams(**params)))
            try:
                return await gen.__anext__()
            finally:
                await gen.aclose()

        return asyncio.run(go())

    assert first_event([1, 2], max_tokens=500).param == "max_tokens"
    assert first_event([1, 99999]).param == "prompt"
    assert first_event([1], stop_token_ids=[99999]).param == "stop_token_ids"
    assert first_event([1], logit_bias={99999: 1.0}).param == "logit_bias"
    assert first_event([1], n=17).param == "n"
    assert isinstance(first_event([1, 2], max_tokens=2), Admitted)
    assert replica.stats()["num_inflight"] == 0


# ---- schemathesis: the app's own OpenAPI schema, in process -------------------------------
# Driven through hypothesis directly: schemathesis' pytest loader (from_fixture) does not
# run under pytest 9.


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_no_5xx_and_invalid_bodies_are_rejected(local_app, mode, tmp_path):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, negative_data_rejection, status_code_conformance

    _, replica, _, small = local_app
    config = small.model_copy(update={"max_body_bytes": 4 << 20, "max_header_bytes": 16 << 10})  # no 413s here
    store = BatchStore(tmp_path, config.model_name)  # the Files and Batches API too (batches are not started)
    app = build_openai_app(OpenAIService(config, Tokenizer(config.model), replica), Gate(), config, store)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error, negative_data_rejection, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
        "/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches", "/v1/batches/{batch_id}",
        "/v1/batches/{batch_id}/cancel",
    }
    for operation in operations:
        has_body = bool(operation.body.items)
        if mode == "negative" and not has_body:
            continue  # nothing to make invalid without a body (a path id may be any string)
        examples = 40 if has_body else 3

        @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(checks=checks)

        run()


def test_freeze_startup_heap_takes_long_lived_objects_out_of_full_collections():
    """In a child process (freezing is for good): 300k long-lived objects make a full collection
    slow; after freeze_startup_heap it skips them, and garbage made later is still collected."""
    code = """
import gc, time
from shardline.deployments.app import freeze_startup_heap
keep = [[i] for i in range(300_000)]
def full():
    t = time.perf_counter(); gc.collect(); return time.perf_counter() - t
before = min(full() for _ in range(3))
frozen = freeze_startup_heap()
after = min(full() for _ in range(3))
class Cycle: pass
a, b = Cycle(), Cycle(); a.other, b.other = b, a
del a, b
collected = gc.collect()
print(frozen, before, after, collected)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    frozen, before, after, collected = out.stdout.split()
    assert int(frozen) >= 300_000
    assert float(after) < float(before) / 10
    assert int(collected) >= 2  # the cycle made after the freeze
