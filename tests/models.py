"""Random-weight Hugging Face model folders for tests, built with `transformers` (the reference)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Café naïve façade résumé — 日本語のテキスト, emoji 🙂 and numbers 12345.",
    "To be, or not to be, that is the question.",
    "def main():\n    print('hello world')\n",
]


def build_tokenizer(folder: Path, vocab_size: int) -> None:
    """Train a small byte-level BPE and write tokenizer.json and tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "chat_template": CHATML_TEMPLATE,
            }
        )
    )


def make_model(
    folder: Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    tie_word_embeddings: bool = False,
    rope_scaling: dict[str, Any] | None = None,
    max_position_embeddings: int = 1024,
    max_shard_size: str | None = None,
    weight_scale: float = 0.15,
    with_tokenizer: bool = True,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random Llama, Mistral or Qwen2 model (and optionally a tokenizer) into `folder`.

    Weights are drawn with a large `weight_scale` so that greedy choices are
    far from ties and token-level comparisons are meaningful.
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    folder.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        build_tokenizer(folder, vocab_size)
        from tokenizers import Tokenizer

        eos_id = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    else:
        eos_id = 2
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-6,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    if arch == "llama":
        kw = dict(common, rope_theta=10000.0)
        if head_dim is not None:
            kw["head_dim"] = head_dim
        if rope_scaling is not None:
            kw["rope_scaling"] = rope_scaling
            kw["rope_theta"] = 500000.0
        config, cls = LlamaConfig(**kw), LlamaForCausalLM
    elif arch == "mistral":
        kw = dict(common, rope_theta=10000.0, sliding_window=None)
        if head_dim is not None:
            kw["head_dim"] = head_dim
        config, cls = MistralConfig(**kw), MistralForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**common, rope_theta=1000000.0), Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            elif "embed" in name or "lm_head" in name:
                p.normal_(0.0, 1.0)  # wide logits: greedy choices are far from ties
            else:
                p.normal_(0.0, weight_scale)
    if max_shard_size is not None:
        model.to(dtype).save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.to(dtype).save_pretrained(folder)
    return folder


def load_reference(folder: Path, dtype: torch.dtype = torch.float32):
    """The transformers model saved in `folder`, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
