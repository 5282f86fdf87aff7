"""Tensor-parallel shards as Ray actors on a multi-node cluster simulated on this machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

from shardline.engine import LLM, SamplingParams  # noqa: E402

pytestmark = pytest.mark.ray

REPO = str(Path(__file__).resolve().parents[1])
PROMPTS = [{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7]}, {"prompt_token_ids": list(range(10, 40))}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node, each with 2 CPUs and 2 (fake) GPUs, all on 127.0.0.1."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "include_dashboard": False})
    c.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=c.address, runtime_env={"env_vars": {"PYTHONPATH": REPO}}, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@ray.remote
class ReplicaLike:
    """Stands where a Serve ModelReplica stands: in bundle 0, holding rank 0 of the model."""

    def __init__(self, folder: str, tp: int):
        torch.set_num_threads(1)
        self.llm = LLM(folder, tensor_parallel_size=tp, num_kv_blocks=64, block_size=4, dtype="float32")

    def generate(self):
        outs = self.llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in pos.items()) for pos in o.outputs[0].logprobs]) for o in outs]

    def layout(self):
        launcher = self.llm.engine.tp_group.launcher
        own = sum(p.numel() * p.element_size() for p in {id(p): p for p in self.llm.engine.runner.model.parameters()}.values())
        return ray.get_runtime_context().get_node_id(), launcher.worker_info(), own

    def kill_a_shard(self):
        ray.kill(self.llm.engine.tp_group.launcher.actors[0], no_restart=True)

    def healthy(self):
        return self.llm.engine.healthy()

    def shutdown(self):
        self.llm.shutdown()


def start_replica(folder, tp: int, strategy: str):
    pg = placement_group([{"CPU": 1, "GPU": 1}] * tp, strategy=strategy)
    ray.get(pg.ready(), timeout=60)
    replica = ReplicaLike.options(
        num_cpus=1, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    ).remote(str(folder), tp)
    return replica, pg


def single_rank(folder):
    llm = LLM(str(folder), num_kv_blocks=64, block_size=4, dtype="float32")
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [sorted((t, lp.logprob) for t, lp in pos.items()) for pos in o.outputs[0].logprobs]) for o in outs]


def assert_same(got, expected):
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected):
        assert tokens == ref_tokens
        for pos, ref_pos in zip(logprobs, ref_logprobs):
            assert [t for t, _ in pos] == [t for t, _ in ref_pos]
            torch.testing.assert_close(torch.tensor([v for _, v in pos]), torch.tensor([v for _, v in ref_pos]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "model_kwargs, tp, strategy",
    [
        (dict(num_heads=4, num_kv_heads=2, hidden_size=64), 2, "STRICT_SPREAD"),
        (dict(num_heads=6, num_kv_heads=1, hidden_size=48, intermediate_size=100, vocab_size=301), 4, "SPREAD"),
    ],
)
def test_tp_across_nodes_matches_single_rank(cluster, model_factory, model_kwargs, tp, strategy):
    folder = model_factory(**model_kwargs, with_tokenizer=False)
    expected = single_rank(folder)
    replica, pg = start_replica(folder, tp, strategy)
    try:
        assert_same(ray.get(replica.generate.remote(), timeout=300), expected)
        node, workers, own_bytes = ray.get(replica.layout.remote(), timeout=60)
        assert len(workers) == tp - 1
        if strategy == "STRICT_SPREAD":
            assert all(w["node_id"] != node for w in workers)  # shards on different nodes
        assert {node} | {w["node_id"] for w in workers} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        full = sum(os.path.getsize(f) for f in Path(folder).glob("*.safetensors"))
        for b in [own_bytes] + [w["parameter_bytes"] for w in workers]:
            assert b < full / tp * 1.4  # each rank holds about 1/N of the weights
        ray.get(replica.shutdown.remote(), timeout=60)
    finally:
        ray.kill(replica)
        remove_placement_group(pg)


def test_killed_shard_fails_cleanly(cluster, model_factory):
    folder = model_factory(num_heads=4, num_kv_heads=2, hidden_size=64, with_tokenizer=False)
    replica, pg = start_replica(folder, 2, "PACK")
    try:
        ray.get(replica.generate.remote(), timeout=300)
        assert ray.get(replica.healthy.remote())
        ray.get(replica.kill_a_shard.remote())
        time.sleep(1.0)
        start = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match="shard"):
            ray.get(replica.generate.remote(), timeout=120)
        assert time.monotonic() - start < 60  # a clear error, not a hang
        assert not ray.get(replica.healthy.remote())
    finally:
        ray.kill(replica)
        remove_placement_group(pg)


def actor_dead(actor) -> bool:
    try:
        ray.get(actor.info.remote(), timeout=30)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_tensor_parallel_llms_built_one_after_another_in_one_process(cluster, model_factory):
    """TP=1, TP=2, then the same on a second model, in this process, each LLM dropped with `del`:
    each releases its shard actors and process group, and the next one starts (it used to wait on
    the last one's ranks until gloo's timeout). Then once more in a `with` block."""
    import gc

    import torch.distributed as dist

    folders = [
        model_factory(num_heads=4, num_kv_heads=2, hidden_size=64, with_tokenizer=False),
        model_factory(num_heads=6, num_kv_heads=1, hidden_size=48, intermediate_size=100, vocab_size=301, with_tokenizer=False),
    ]
    kwargs = dict(num_kv_blocks=64, block_size=4, dtype="float32")
    for folder in folders:
        expected = single_rank(folder)
        started = time.monotonic()
        llm = LLM(str(folder), tensor_parallel_size=2, **kwargs)
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [tokens for tokens, _ in expected]
        shards = list(llm.engine.tp_group.launcher.actors)
        del llm, outs
        gc.collect()
        assert not dist.is_initialized()
        assert all(actor_dead(a) for a in shards)
        assert time.monotonic() - started < 90  # nothing waited out a timeout
    with LLM(str(folders[0]), tensor_parallel_size=2, **kwargs) as llm:
        shards = list(llm.engine.tp_group.launcher.actors)
        assert len(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == len(PROMPTS)
    assert not dist.is_initialized() and all(actor_dead(a) for a in shards)


def test_a_second_live_tensor_parallel_llm_is_refused_in_one_line(cluster, model_factory):
    folder = model_factory(num_heads=4, num_kv_heads=2, hidden_size=64, with_tokenizer=False)
    with LLM(str(folder), tensor_parallel_size=2, num_kv_blocks=64, block_size=4):
        with pytest.raises(RuntimeError, match="already runs in this process"):
            LLM(str(folder), tensor_parallel_size=2, num_kv_blocks=64, block_size=4)
