"""Prefill and every decode step match transformers' logits (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from shardline.engine import EngineConfig, LLMEngine, SamplingParams
from tests.models import load_reference

CASES = {
    "llama-gqa-untied": dict(arch="llama", num_heads=4, num_kv_heads=2),
    "llama-mqa-headdim": dict(arch="llama", hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=24),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama3-rope-scaling": dict(
        arch="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(arch="mistral", num_heads=8, num_kv_heads=2, head_dim=16),
    "llama-sharded-checkpoint": dict(arch="llama", max_shard_size="40KB"),
    "qwen2-bias-tied": dict(arch="qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    "qwen2-bias-untied": dict(arch="qwen2", num_heads=4, num_kv_heads=4),
}


class LogitRecorder:
    """Keeps the logits the engine computes at each step, per request."""

    def __init__(self, engine: LLMEngine):
        self.by_request: dict[str, list[torch.Tensor]] = {}
        runner = engine.runner
        original = runner.compute_logits

        def compute_logits(out):
            logits, indices = original(out)
            for row, i in enumerate(indices):
                rid = out.scheduled[i].request.request_id
                self.by_request.setdefault(rid, []).append(logits[row].clone())
            return logits, indices

        runner.compute_logits = compute_logits


def run_engine(engine: LLMEngine, prompts: dict[str, list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for rid, ids in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": ids}, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, model_factory):
    folder = model_factory(**CASES[case], with_tokenizer=False)
    engine = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=64, block_size=4))
    recorder = LogitRecorder(engine)
    g = torch.Generator().manual_seed(1)
    prompts = {f"r{i}": torch.randint(0, 512, (n,), generator=g).tolist() for i, n in enumerate([1, 7, 13, 30])}
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    tokens = run_engine(engine, prompts, params)

    ref = load_reference(folder)
    for rid, prompt in prompts.items():
        full = prompt + tokens[rid]
        with torch.no_grad():
            ref_logits = ref(torch.tensor([full])).logits[0].float()
        ours = torch.stack(recorder.by_request[rid])
        # step k's logits predict token k, from position len(prompt) - 1 + k
        expected = ref_logits[len(prompt) - 1 : len(prompt) - 1 + len(ours)]
        assert len(ours) == params.max_tokens
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
        # greedy choices are decisive: the top two logits are well apart
        top2 = expected.topk(2).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


def test_chunked_prefill_matches_transformers(model_factory):
    """A prompt computed over several chunks, some steps mixed with decodes, still matches."""
    folder = model_factory(arch="llama", with_tokenizer=False)
    engine = LLMEngine(
        EngineConfig(model=str(folder), num_kv_blocks=64, block_size=4, max_num_batched_tokens=8, max_model_len=256)
    )
    recorder = LogitRecorder(engine)
    prompts = {"short": [5, 6, 7], "long": list(range(40, 77))}
    tokens = run_engine(engine, prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    ref = load_reference(folder)
    for rid, prompt in prompts.items():
        full = prompt + tokens[rid]
        with torch.no_grad():
            ref_logits = ref(torch.tensor([full])).logits[0]
        ours = torch.stack(recorder.by_request[rid])
        torch.testing.assert_close(ours, ref_logits[len(prompt) - 1 : len(prompt) + 5], atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_has_an_index(model_factory):
    folder = model_factory(**CASES["llama-sharded-checkpoint"], with_tokenizer=False)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 2


def test_folder_without_tokenizer_serves_token_ids_only(model_factory):
    folder = model_factory(**CASES["llama-gqa-untied"], with_tokenizer=False)
    engine = LLMEngine(EngineConfig(model=str(folder), num_kv_blocks=16, block_size=4))
    assert engine.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.add_request("text", "hello", SamplingParams())
    tokens = run_engine(engine, {"ids": [1, 2, 3]}, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert len(tokens["ids"]) == 3
