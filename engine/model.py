"""Llama-family decoder over a paged KV cache, in the spirit of gpt-fast's model.py.

Tokens of every sequence in a step are packed into one flat batch
([num_tokens, hidden]); `AttentionMetadata` says which tokens are decodes
(one per sequence, first) and which are prefill chunks (after them), where
each token's K/V goes in the cache, and each sequence's block table.
The q/k/v and gate/up projections are fused (`wqkv`, `w13`) at load time.
Tensor parallelism is applied from outside by changing the local head counts
and swapping the linear layers (engine/tensor_parallel.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from shardline import kernels
from shardline.engine.config import ModelConfig
from shardline.kernels.memory import hugepage_zeros
from shardline.kernels.step import AttentionMetadata, OutputRows


def build_rope_cache(
    head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each frequency in the first half, sin in the second."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is not None:
        inv_freq = scale_inv_freq(inv_freq, scaling)
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim // 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Apply "linear" or Llama-3 rope scaling to the inverse frequencies."""
    rope_type = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: linear, llama3")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through the kernels' dispatch point."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class Transformer(nn.Module):
    """Embedding, decoder blocks, final norm and LM head."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = Linear(config.hidden_size, config.vocab_size, bias=False)
        max_positions = max_positions or config.max_position_embeddings
        rope = build_rope_cache(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.register_buffer("rope_cache", rope, persistent=False)
        # The whole-stack kernel applies (tensor parallelism turns this off: its
        # layers all-reduce between the matmuls).
        self.fused_stack = True
        self._stack: kernels.StackWeights | None = None

    def runs_natively(self, with_prefill: bool) -> bool:
        """Whether a step (decodes only, or with prefill chunks) runs as one whole-stack kernel call."""
        return self.fused_stack and kernels.stack_supported(
            self.rope_cache.device, self.norm.weight.dtype, self.config.head_dim, with_prefill
        )

    def setup_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        """Allocate each layer's paged K and V tensors: [num_blocks, block_size, kv_heads, head_dim]."""
        device = self.rope_cache.device
        for layer in self.layers:
            attn = layer.attention
            shape = (num_blocks, block_size, attn.n_kv_heads, attn.head_dim)
            if device.type == "cpu":
                attn.k_cache, attn.v_cache = hugepage_zeros(shape, dtype, populate=True), hugepage_zeros(shape, dtype, populate=True)
            else:
                attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
                attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, out: OutputRows | None = None
    ) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns final hidden states [num_tokens, hidden], or
        only those of `out`'s rows (the last layer then runs past its K/V for those rows alone)."""
        h = self.tok_embeddings(input_ids)
        if self.runs_natively(with_prefill=meta.num_decode_tokens < input_ids.shape[0]):
            # The whole stack in one kernel call instead of about ten per layer. SmolLM2 bf16: a
            # tenth off a 64-sequence decode step; a 128-token prefill pass 78.7 -> 73.4 ms, a
            # 512-token one 333 -> 328 (medians of 10-20, alternating).
            return kernels.decoder_stack(h, positions, meta, self.rope_cache, self.stack_weights(), out)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, positions, self.rope_cache, meta, out if i == last else None)
        h, _ = self.norm(h, residual)
        return h

    def stack_weights(self) -> kernels.StackWeights:
        """Every layer's tensors for kernels.decoder_stack (rebuilt if the KV cache was reallocated)."""
        layers = [layer.layer_weights() for layer in self.layers]
        if self._stack is None or any(a is not b for a, b in zip(layers, self._stack.layers)):
            self._stack = kernels.StackWeights(layers=layers, final_norm=self.norm.weight)
        return self._stack

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> fp32 logits [n, vocab]."""
        return self.output(hidden).float()


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._weights: kernels.LayerWeights | None = None

    def layer_weights(self) -> kernels.LayerWeights:
        """This layer's tensors for kernels.decoder_stack (built once its KV cache exists)."""
        attn, ffn = self.attention, self.feed_forward
        if self._weights is None or self._weights.k_cache is not attn.k_cache:
            assert attn.k_cache is not None and attn.v_cache is not None, "setup_kv_cache() first"
            self._weights = kernels.LayerWeights(
                attn_norm=self.attention_norm.weight,
                wqkv=attn.wqkv.weight,
                bqkv=attn.wqkv.bias,
                wo=attn.wo.weight,
                ffn_norm=self.ffn_norm.weight,
                w13=ffn.w13.weight,
                w2=ffn.w2.weight,
                k_cache=attn.k_cache,
                v_cache=attn.v_cache,
                num_heads=attn.n_heads,
                num_kv_heads=attn.n_kv_heads,
                head_dim=attn.head_dim,
                eps=self.attention_norm.eps,
                scale=attn.scale,
            )
        return self._weights

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        rope_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: OutputRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.attention_norm(h, residual)
        h = self.attention(h, positions, rope_cache, meta, out)
        if out is not None:
            residual = residual[out.rows]
        h, residual = self.ffn_norm(h, residual)
        return self.feed_forward(h), residual


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_heads
        self.n_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.wqkv = Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.wo = Linear(config.q_size, config.hidden_size, bias=False)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: OutputRows | None = None,
    ) -> torch.Tensor:
        """Every row's K/V into the cache; attention output for every row, or `out`'s rows only."""
        num_tokens = x.shape[0]
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(num_tokens, self.n_heads, self.head_dim)  # q: [tokens, heads, head_dim]
        k = k.view(num_tokens, self.n_kv_heads, self.head_dim)  # k, v: [tokens, kv_heads, head_dim]
        v = v.view(num_tokens, self.n_kv_heads, self.head_dim)
        q, k = kernels.apply_rotary_emb(q, k, positions, rope_cache)

        assert self.k_cache is not None and self.v_cache is not None, "setup_kv_cache() first"
        # Write this step's K/V into their slots before attending: a sequence's
        # queries read their own new keys from the cache like any cached ones.
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if out is not None:
            q, meta, num_tokens = q[out.rows], out.meta, out.rows.numel()

        attn = kernels.paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.wo(attn.view(num_tokens, q_size))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w2 = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.linear_silu_and_mul(x, self.w13.weight))


class RMSNorm(nn.Module):
    """RMSNorm that also adds the residual stream when given one."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, residual stream after the add)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps), x
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
