"""Tensor parallelism in the engine: head sharding (pure) and TP=N vs TP=1 on local processes."""

from __future__ import annotations

import pytest
import torch

from shardline.engine import EngineConfig, LLMEngine, SamplingParams
from shardline.engine.distributed import LocalProcessLauncher
from shardline.engine.tensor_parallel import shard_heads, split_range
from tests.test_model_parity import LogitRecorder, run_engine


def test_split_range_is_even_and_covers_everything():
    assert [split_range(10, 4, i) for i in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [split_range(8, 2, i) for i in range(2)] == [(0, 4), (4, 8)]


@pytest.mark.parametrize(
    "heads, kv_heads, world",
    [(12, 4, 2), (12, 4, 4), (9, 3, 2), (6, 2, 4), (8, 1, 4), (6, 1, 4), (12, 3, 4), (7, 7, 3), (4, 2, 3)],
)
def test_shard_heads_covers_every_query_head_with_its_kv_head(heads, kv_heads, world):
    group = heads // kv_heads
    seen: list[int] = []
    for rank in range(world):
        shard = shard_heads(heads, kv_heads, rank, world)
        assert shard.q_heads == tuple(range(shard.q_heads[0], shard.q_heads[-1] + 1))
        local_group = len(shard.q_heads) // len(shard.kv_heads)
        assert local_group * len(shard.kv_heads) == len(shard.q_heads)  # uniform local grouping
        for i, q in enumerate(shard.q_heads):
            assert shard.kv_heads[i // local_group] == q // group  # each query reads its own KV head
        seen.extend(shard.q_heads)
    assert seen == list(range(heads))


def test_more_ranks_than_heads_is_refused():
    with pytest.raises(ValueError, match="exceeds"):
        shard_heads(2, 1, 0, 4)


CASES = {
    "gqa-even": dict(num_heads=4, num_kv_heads=2, hidden_size=64),
    "uneven-heads": dict(num_heads=6, num_kv_heads=2, hidden_size=48, intermediate_size=100, vocab_size=301),
    "single-kv-head": dict(num_heads=4, num_kv_heads=1, hidden_size=64),
    "qwen2-bias": dict(arch="qwen2", num_heads=4, num_kv_heads=2, hidden_size=64, tie_word_embeddings=True),
}


def run_tp(folder, tp: int, prompts, params):
    launcher = LocalProcessLauncher() if tp > 1 else None
    engine = LLMEngine(
        EngineConfig(model=str(folder), num_kv_blocks=64, block_size=4, tensor_parallel_size=tp), launcher=launcher
    )
    try:
        recorder = LogitRecorder(engine)
        tokens = run_engine(engine, prompts, params)
        logits = {k: torch.stack(v) for k, v in recorder.by_request.items()}
        shard_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in engine.runner.model.parameters()}.values())
    finally:
        engine.shutdown()
    if launcher is not None:
        assert not launcher.alive()  # workers exited on the stop broadcast
    return tokens, logits, shard_bytes


@pytest.mark.parametrize(
    "case, tp", [("gqa-even", 2), ("uneven-heads", 2), ("uneven-heads", 4), ("single-kv-head", 4), ("qwen2-bias", 2)]
)
def test_tp_matches_single_rank(case, tp, model_factory):
    folder = model_factory(**CASES[case], with_tokenizer=False)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7], "b": list(range(10, 40)), "c": [9]}
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    ref_tokens, ref_logits, full_bytes = run_tp(folder, 1, prompts, params)
    tokens, logits, shard_bytes = run_tp(folder, tp, prompts, params)
    assert tokens == ref_tokens
    for rid in prompts:
        torch.testing.assert_close(logits[rid], ref_logits[rid], atol=1e-4, rtol=1e-4)
    # rank 0 holds about 1/tp of the weights (norms and replicated KV heads aside)
    assert shard_bytes < full_bytes / tp * 1.35


def test_local_ranks_use_shared_memory_collectives(model_factory):
    folder = model_factory(**CASES["gqa-even"], with_tokenizer=False)
    engine = LLMEngine(
        EngineConfig(model=str(folder), num_kv_blocks=16, block_size=4, tensor_parallel_size=2),
        launcher=LocalProcessLauncher(),
    )
    try:
        assert engine.tp_group.ctx.shm is not None
        tokens = run_engine(engine, {"a": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
        assert len(tokens["a"]) == 3
    finally:
        engine.shutdown()
