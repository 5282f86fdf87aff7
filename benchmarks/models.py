"""The model folders the benchmarks run on, and what a decode step reads from them.

* `llama-88m`: a random Llama (hidden 768, 12 layers, 12 heads, 4 KV heads,
  intermediate 2048, vocab 8192, untied): ../shared/PEERS.md's model. Saved
  once per dtype (bf16 and fp32 folders), without a tokenizer: the benchmarks
  send token ids.
* `smollm2-135m`: the real SmolLM2-135M-Instruct (`engine.pull`), an fp32
  folder; engines cast it to the dtype under test.
* `tiny`: a 2-layer toy for the harness's own test.

Folders live under `.bench/models/` (gitignored) and are built once: a
`.bench-complete` marker holds the shape they were built with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / ".bench"

# name -> make_model keyword arguments (tests/models.py)
RANDOM_MODELS: dict[str, dict] = {
    "llama-88m": dict(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        vocab_size=8192,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    ),
}
PULLED_MODELS = {"smollm2-135m": "smollm2-135m"}
ALL_MODELS = [*RANDOM_MODELS, *PULLED_MODELS]

DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}
MARKER = ".bench-complete"


def model_folder(name: str, dtype: str, models_dir: Path | None = None) -> Path:
    """The HF folder for `name` in `dtype` ("bf16"/"fp32"), built or pulled on first use."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    if name in PULLED_MODELS:
        if str(ROOT) not in sys.path:
            sys.path.append(str(ROOT))  # last: never shadows an installed package
        from shardline.engine.pull import pull_model

        return Path(pull_model(PULLED_MODELS[name], progress=False))
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(ALL_MODELS)}")
    models_dir = models_dir or BENCH_DIR / "models"
    folder = models_dir / f"{name}-{dtype}"
    spec = json.dumps({"shape": RANDOM_MODELS[name], "dtype": dtype, "seed": 0}, sort_keys=True)
    marker = folder / MARKER
    if marker.is_file() and marker.read_text() == spec:
        return folder
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))  # last: never shadows an installed package
    import shutil

    import torch

    from tests.models import make_model

    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    make_model(tmp, with_tokenizer=False, seed=0, dtype=getattr(torch, DTYPE_NAMES[dtype]), **RANDOM_MODELS[name])
    (tmp / MARKER).write_text(spec)
    tmp.rename(folder)
    return folder


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def param_counts(cfg: dict) -> dict[str, int]:
    """Parameter counts of a Llama-family config.json, split the way a decode step reads them."""
    h = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    layers = cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    vocab = cfg["vocab_size"]
    bias = bool(cfg.get("attention_bias", False)) or cfg.get("architectures", [""])[0] == "Qwen2ForCausalLM"
    qkv = h * (heads + 2 * kv_heads) * head_dim + ((heads + 2 * kv_heads) * head_dim if bias else 0)
    per_layer = qkv + heads * head_dim * h + 3 * h * inter + 2 * h
    tied = bool(cfg.get("tie_word_embeddings", False))
    return {
        "layers": layers * per_layer,
        "final_norm": h,
        "embedding": vocab * h,
        "lm_head": vocab * h,  # the tied table when tied: read in full by the LM head
        "tied": int(tied),
        "total": layers * per_layer + h + vocab * h * (1 if tied else 2),
        "hidden": h,
    }


def weight_bytes_per_token(cfg: dict, dtype: str) -> int:
    """Bytes of weights one batch-1 decode step must read.

    Every parameter once, except the embedding table, of which only the one row
    looked up; the LM head (the tied table, for a tied model) in full.
    """
    c = param_counts(cfg)
    itemsize = 2 if dtype == "bf16" else 4
    return itemsize * (c["layers"] + c["final_norm"] + c["lm_head"] + c["hidden"])


def kv_bytes_per_token(cfg: dict, dtype: str) -> int:
    """Bytes of K and V one token adds to the cache, across all layers."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    itemsize = 2 if dtype == "bf16" else 4
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * itemsize


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Build (or pull) the benchmark model folders and print their paths.")
    p.add_argument("models", nargs="*", default=["llama-88m"])
    p.add_argument("--dtypes", default="bf16,fp32")
    a = p.parse_args()
    for m in a.models:
        for d in a.dtypes.split(","):
            f = model_folder(m, d)
            cfg = read_config(f)
            print(m, d, f, f"{param_counts(cfg)['total'] / 1e6:.1f}M params", f"{weight_bytes_per_token(cfg, d) / 1e6:.1f} MB/token")
