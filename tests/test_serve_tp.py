"""A tensor-parallel replica under Ray Serve, on a two-node cluster simulated here (fake GPUs)."""

from __future__ import annotations

import time

import openai
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from shardline.deployments.config import APP_NAME, REPLICA_NAME, ServeConfig  # noqa: E402
from shardline.engine import LLM, SamplingParams  # noqa: E402
from tests.models import make_model  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from ray import serve

    from shardline.deployments.app import build_app
    from shardline.deployments.server import free_port

    folder = make_model(tmp_path_factory.mktemp("tp-serve"), num_heads=4, num_kv_heads=2)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=3, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ServeConfig(
            model=str(folder),
            served_model_name="tiny",
            tensor_parallel_size=2,
            placement_strategy="STRICT_SPREAD",
            replica_num_gpus=1,
            replica_num_cpus=1,
            num_kv_blocks=64,
            block_size=4,
            max_model_len=256,
            torch_threads=1,
        )
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield {"client": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0), "folder": folder}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def replica_stats():
    from ray import serve

    handle = serve.get_deployment_handle(REPLICA_NAME, APP_NAME)
    return list(handle.broadcast("stats").results(timeout_s=30))


def complete(client):
    return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, timeout=60).choices[0].text


def test_tp_replica_spans_nodes_and_matches_one_rank(served):
    expected = LLM(str(served["folder"]), num_kv_blocks=64, block_size=4, max_model_len=256).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False
    )[0].outputs[0].text
    assert complete(served["client"]) == expected
    [stats] = replica_stats()
    [rank1] = stats["tp_ranks"]
    assert rank1["node_id"] != stats["node_id"]  # STRICT_SPREAD: the shards sit on different nodes
    assert rank1["parameter_bytes"] > 0


def test_killed_shard_fails_cleanly_and_serve_replaces_the_replica(served):
    client = served["client"]
    before = replica_stats()[0]["replica_id"]
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("shardline-tp-")]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=True)
    deadline = time.monotonic() + 120
    outcomes = []
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            text = complete(client)
            outcomes.append("ok")
            stats = replica_stats()
            if stats and stats[0]["replica_id"] != before and text:
                break
        except openai.APIStatusError as e:  # a clear error from the broken replica, not a hang
            outcomes.append(e.status_code)
        except openai.APIConnectionError:
            outcomes.append("conn")
        assert time.monotonic() - start < 60
        time.sleep(1.0)
    else:
        pytest.fail(f"no healthy replacement within 120 s: {outcomes}")
    [stats] = replica_stats()
    assert stats["replica_id"] != before and len(stats["tp_ranks"]) == 1
