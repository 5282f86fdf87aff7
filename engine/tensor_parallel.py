"""Tensor parallelism applied to a built model from outside, as gpt-fast's tp.py does.

`apply_tensor_parallel(model, ctx)` rewrites a meta-device Transformer for
one rank and returns the weight plan that fills it with only that rank's
slices of the checkpoint:

- attention heads are split across ranks; when there are fewer KV heads than
  ranks, each rank keeps (replicates) the KV heads its query heads read;
- q/k/v and gate/up projections are column-parallel (output rows split);
- o and down projections are row-parallel (input columns split) and end in
  an all-reduce;
- the embedding and LM head are vocab-parallel: each rank holds a range of
  rows; lookups are masked and all-reduced, logits are all-gathered.

Head counts need not divide evenly: ranges are split as evenly as possible.
Collectives go through torch.distributed (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from shardline.engine.config import ModelConfig
from shardline import kernels
from shardline.engine.model import Linear, Transformer
from shardline.engine.weights import Piece, WeightPlan


@dataclass
class ParallelContext:
    """This process's place in a tensor-parallel group."""

    rank: int
    world_size: int
    # torch.distributed group; None is the default group.
    group: Any = None
    # Shared-memory collectives when every rank is on this host (engine.shm_comm), else None.
    shm: Any = None
    # Seconds spent in collectives, when a profiler switched it on (None: off).
    comm_seconds: float | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter() if self.comm_seconds is not None else 0.0
        if self.shm is not None and self.shm.fits(t):
            self.shm.all_reduce(t)
        else:
            dist.all_reduce(t, group=self.group)
        if self.comm_seconds is not None:
            self.comm_seconds += time.perf_counter() - start
        return t

    def all_gather_last_dim(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate every rank's `t` along the last dim; rank i contributes sizes[i] columns."""
        start = time.perf_counter() if self.comm_seconds is not None else 0.0
        width = max(sizes)
        if t.shape[-1] < width:
            t = F.pad(t, (0, width - t.shape[-1]))
        if self.shm is not None and self.shm.fits(t):
            parts = self.shm.all_gather(t)
        else:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
        out = torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)
        if self.comm_seconds is not None:
            self.comm_seconds += time.perf_counter() - start
        return out


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when n items are split into `parts` nearly equal runs."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one rank holds."""

    # Global ids of the query heads on this rank (contiguous).
    q_heads: tuple[int, ...]
    # Global id of each local KV head, in local order (repeats when a KV head is
    # replicated so that every local query group has its own copy).
    kv_heads: tuple[int, ...]


def shard_heads(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> HeadShard:
    """Assign query and KV heads to a rank.

    With at least as many KV heads as ranks, KV heads are split and each
    rank takes the query heads of its KV groups. Otherwise query heads are
    split and each rank keeps copies of the KV heads they read; when its
    query heads do not fall into equal groups, every local query head gets
    its own KV copy so that local attention stays uniformly grouped.
    """
    if world_size > num_heads:
        raise ValueError(f"tensor_parallel_size {world_size} exceeds the model's {num_heads} attention heads")
    group = num_heads // num_kv_heads
    if num_kv_heads >= world_size:
        kv_lo, kv_hi = split_range(num_kv_heads, world_size, rank)
        return HeadShard(tuple(range(kv_lo * group, kv_hi * group)), tuple(range(kv_lo, kv_hi)))
    q_lo, q_hi = split_range(num_heads, world_size, rank)
    kv_of = [h // group for h in range(q_lo, q_hi)]
    runs: list[int] = []
    for i, kv in enumerate(kv_of):
        if i == 0 or kv != kv_of[i - 1]:
            runs.append(0)
        runs[-1] += 1
    uniform = all(r == runs[0] for r in runs)
    kv_heads = tuple(dict.fromkeys(kv_of)) if uniform else tuple(kv_of)
    return HeadShard(tuple(range(q_lo, q_hi)), kv_heads)


class RowParallelLinear(Linear):
    """A linear layer whose input features are split across ranks; outputs are summed."""

    def __init__(self, in_features: int, out_features: int, ctx: ParallelContext):
        super().__init__(in_features, out_features, bias=False)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(kernels.linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_end) of the embedding; other ids read zeros, then all-reduce."""

    def __init__(self, vocab_start: int, vocab_end: int, dim: int, ctx: ParallelContext):
        super().__init__(vocab_end - vocab_start, dim)
        self.vocab_start, self.vocab_end, self.ctx = vocab_start, vocab_end, ctx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(out)


class VocabParallelLMHead(Linear):
    """Logits for this rank's vocab range, all-gathered into the full vocabulary."""

    def __init__(self, dim: int, vocab_sizes: list[int], ctx: ParallelContext):
        super().__init__(dim, vocab_sizes[ctx.rank], bias=False)
        self.vocab_sizes, self.ctx = vocab_sizes, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_gather_last_dim(kernels.linear(x, self.weight), self.vocab_sizes)


def _rows(name: str, heads: tuple[int, ...], head_dim: int) -> list[Piece]:
    """Pieces of `name` holding the rows of `heads`, merging consecutive heads into one slice."""
    pieces: list[Piece] = []
    start = prev = heads[0]
    for h in list(heads[1:]) + [None]:
        if h is not None and h == prev + 1:
            prev = h
            continue
        pieces.append(Piece(name, 0, start * head_dim, (prev + 1) * head_dim))
        if h is not None:
            start = prev = h
    return pieces


def apply_tensor_parallel(model: Transformer, ctx: ParallelContext, has_lm_head: bool) -> WeightPlan:
    """Reshape a meta-device model for `ctx.rank` and return the plan that loads its slices."""
    config: ModelConfig = model.config
    rank, world = ctx.rank, ctx.world_size
    hd = config.head_dim
    shard = shard_heads(config.num_heads, config.num_kv_heads, rank, world)
    inter_lo, inter_hi = split_range(config.intermediate_size, world, rank)
    vocab_sizes = [b - a for a, b in (split_range(config.vocab_size, world, r) for r in range(world))]
    vocab_lo, vocab_hi = split_range(config.vocab_size, world, rank)
    nq, nkv = len(shard.q_heads), len(shard.kv_heads)
    q_lo, q_hi = shard.q_heads[0], shard.q_heads[-1] + 1

    model.fused_stack = False  # row-parallel layers all-reduce between their matmuls
    model.tok_embeddings = VocabParallelEmbedding(vocab_lo, vocab_hi, config.hidden_size, ctx)
    model.output = VocabParallelLMHead(config.hidden_size, vocab_sizes, ctx)
    plan: WeightPlan = {
        "tok_embeddings.weight": [Piece("model.embed_tokens.weight", 0, vocab_lo, vocab_hi)],
        "norm.weight": [Piece("model.norm.weight")],
    }
    if has_lm_head and not config.tie_word_embeddings:
        plan["output.weight"] = [Piece("lm_head.weight", 0, vocab_lo, vocab_hi)]
    for i, layer in enumerate(model.layers):
        attn, ffn = layer.attention, layer.feed_forward
        attn.n_heads, attn.n_kv_heads = nq, nkv
        attn.wqkv = Linear(config.hidden_size, (nq + 2 * nkv) * hd, bias=config.qkv_bias)
        attn.wo = RowParallelLinear(nq * hd, config.hidden_size, ctx)
        ffn.w13 = Linear(config.hidden_size, 2 * (inter_hi - inter_lo), bias=False)
        ffn.w2 = RowParallelLinear(inter_hi - inter_lo, config.hidden_size, ctx)

        hf, ours = f"model.layers.{i}", f"layers.{i}"
        a = f"{hf}.self_attn"
        plan[f"{ours}.attention_norm.weight"] = [Piece(f"{hf}.input_layernorm.weight")]
        plan[f"{ours}.ffn_norm.weight"] = [Piece(f"{hf}.post_attention_layernorm.weight")]
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            plan[f"{ours}.attention.wqkv.{kind}"] = (
                [Piece(f"{a}.q_proj.{kind}", 0, q_lo * hd, q_hi * hd)]
                + _rows(f"{a}.k_proj.{kind}", shard.kv_heads, hd)
                + _rows(f"{a}.v_proj.{kind}", shard.kv_heads, hd)
            )
        plan[f"{ours}.attention.wo.weight"] = [Piece(f"{a}.o_proj.weight", 1, q_lo * hd, q_hi * hd)]
        plan[f"{ours}.feed_forward.w13.weight"] = [
            Piece(f"{hf}.mlp.gate_proj.weight", 0, inter_lo, inter_hi),
            Piece(f"{hf}.mlp.up_proj.weight", 0, inter_lo, inter_hi),
        ]
        plan[f"{ours}.feed_forward.w2.weight"] = [Piece(f"{hf}.mlp.down_proj.weight", 1, inter_lo, inter_hi)]
    return plan
