"""Build a model on the meta device and fill it from safetensors files.

Hugging Face tensor names are mapped onto the fused layout of engine/model.py
(q/k/v into `wqkv`, gate/up into `w13`). Every tensor is read lazily with
`safe_open(...).get_slice`, so a caller that needs only a slice of a weight
(a tensor-parallel rank) never reads the rest of it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors import safe_open

from shardline import kernels
from shardline.engine.config import ModelConfig
from shardline.kernels.memory import move_parameters_to_hugepages
from shardline.engine.model import Transformer


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor (or a slice of it) that fills part of a model parameter."""

    hf_name: str
    # Slice [start, end) along `dim`; dim None means the whole tensor.
    dim: int | None = None
    start: int = 0
    end: int = 0


# A weight plan: model parameter name -> pieces concatenated along dim 0.
WeightPlan = dict[str, list[Piece]]


def full_weight_plan(config: ModelConfig, has_lm_head: bool) -> WeightPlan:
    """The plan for an unsharded model: every parameter from whole checkpoint tensors."""
    plan: WeightPlan = {
        "tok_embeddings.weight": [Piece("model.embed_tokens.weight")],
        "norm.weight": [Piece("model.norm.weight")],
    }
    if has_lm_head and not config.tie_word_embeddings:
        plan["output.weight"] = [Piece("lm_head.weight")]
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}"
        attn = f"{hf}.self_attn"
        plan[f"{ours}.attention_norm.weight"] = [Piece(f"{hf}.input_layernorm.weight")]
        plan[f"{ours}.ffn_norm.weight"] = [Piece(f"{hf}.post_attention_layernorm.weight")]
        plan[f"{ours}.attention.wqkv.weight"] = [Piece(f"{attn}.{p}_proj.weight") for p in "qkv"]
        if config.qkv_bias:
            plan[f"{ours}.attention.wqkv.bias"] = [Piece(f"{attn}.{p}_proj.bias") for p in "qkv"]
        plan[f"{ours}.attention.wo.weight"] = [Piece(f"{attn}.o_proj.weight")]
        plan[f"{ours}.feed_forward.w13.weight"] = [
            Piece(f"{hf}.mlp.gate_proj.weight"),
            Piece(f"{hf}.mlp.up_proj.weight"),
        ]
        plan[f"{ours}.feed_forward.w2.weight"] = [Piece(f"{hf}.mlp.down_proj.weight")]
    return plan


class CheckpointReader:
    """Lazy access to the tensors of a folder's safetensors files (sharded or not)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: folder / fname for name, fname in weight_map.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
            self._file_of = {}
            for path in files:
                with safe_open(path, "pt") as f:
                    self._file_of.update((name, path) for name in f.keys())
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> set[str]:
        return set(self._file_of)

    def read(self, piece: Piece) -> torch.Tensor:
        path = self._file_of.get(piece.hf_name)
        if path is None:
            raise KeyError(f"checkpoint has no tensor {piece.hf_name!r}")
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = self._stack.enter_context(safe_open(path, "pt"))
        if piece.dim is None:
            return handle.get_tensor(piece.hf_name)
        sl = handle.get_slice(piece.hf_name)
        index = [slice(None)] * len(sl.get_shape())
        index[piece.dim] = slice(piece.start, piece.end)
        return sl[tuple(index)]


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a (meta) parameter by a real tensor of the right shape."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"{name}: checkpoint gives shape {tuple(value.shape)}, model expects {tuple(old.shape)}")
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_weights(model: Transformer, folder: str | Path, dtype: torch.dtype, plan: WeightPlan | None = None) -> None:
    """Fill every parameter of a meta-built model from the folder's checkpoint."""
    with CheckpointReader(folder) as reader:
        plan = plan or full_weight_plan(model.config, "lm_head.weight" in reader.names())
        for name, pieces in plan.items():
            parts = [reader.read(p) for p in pieces]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            set_parameter(model, name, value.to(dtype).contiguous())
    if "output.weight" not in plan:
        model.output.weight = model.tok_embeddings.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint left parameters unset: {missing[:5]}")


def checkpoint_has_lm_head(folder: str | Path) -> bool:
    """Whether the checkpoint stores its own LM head (else it is tied to the embedding)."""
    with CheckpointReader(folder) as reader:
        return "lm_head.weight" in reader.names()


def build_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    transform: Callable[[Transformer, bool], WeightPlan] | None = None,
) -> Transformer:
    """Build on the meta device, optionally reshape it (tensor parallelism), then load.

    `transform(model, has_lm_head)` may rewrite the meta model in place and
    returns the weight plan that fills it; only the tensors it names are read.
    """
    config = ModelConfig.from_folder(folder)
    with init_empty_weights():
        model = Transformer(config, max_positions)
        plan = transform(model, checkpoint_has_lm_head(folder)) if transform else None
    load_weights(model, folder, dtype, plan)
    move_parameters_to_hugepages(model)
    kernels.prepare_linear_weights(m.weight for m in model.modules() if isinstance(m, nn.Linear))
    return model.eval()
