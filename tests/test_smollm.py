"""The real SmolLM2-135M-Instruct through the engine (needs `shardline pull smollm2-135m`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shardline.engine import LLM, SamplingParams
from shardline.engine.pull import pull_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    pull_model("smollm2-135m", progress=False)
    return LLM("smollm2-135m", dtype="float32", max_model_len=2048)


def test_capital_of_france_is_paris(smollm):
    [out] = smollm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0.0, max_tokens=32),
        use_tqdm=False,
    )
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"  # ended on <|im_end|>, the model's eos


def test_repeated_chat_reports_cached_prompt_tokens(smollm):
    messages = [{"role": "system", "content": "You are a terse assistant. " * 8}, {"role": "user", "content": "Hi"}]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    first = smollm.chat(messages, params, use_tqdm=False)[0]
    second = smollm.chat(messages, params, use_tqdm=False)[0]
    assert second.num_cached_tokens >= 16 * ((len(second.prompt_token_ids) - 1) // 16)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_cli_generate_and_errors():
    ok = subprocess.run(
        [sys.executable, "-m", "shardline", "generate", "-q", "--chat", "--max-tokens", "24", "What is the capital of France?"],
        capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "Paris" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "shardline", "generate", "--model", "no-such", "x"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "known aliases" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "shardline", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "pull" in helped.stdout
