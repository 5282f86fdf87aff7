"""Rotary position embedding in Triton, half-split (GPT-NeoX / HF Llama) layout.

One program per token rotates all of its query and key heads: with
x = (x1, x2) split at head_dim / 2 and (cos, sin) the cache row of the
token's position, out = (x1 cos - x2 sin, x2 cos + x1 sin). As in
`kernels.reference.apply_rotary_emb`, cos and sin are rounded to the input
dtype first; the rotation itself runs in fp32 and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._triton_common import FLOAT_DTYPES, check_launchable, pow2


@triton.jit
def _rotate_heads(
    out_ptr,
    x_ptr,
    cos,  # [1, HALF_PAD] fp32
    sin,
    token,
    stride_x_token,
    stride_x_head,
    stride_o_token,
    stride_o_head,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    x_ptrs = x_ptr + token * stride_x_token + heads * stride_x_head + dims
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # [HEADS_PAD, HALF_PAD]
    x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + token * stride_o_token + heads * stride_o_head + dims
    tl.store(o_ptrs, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_ptrs + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    # outputs: rotated q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim]
    q_out_ptr,
    k_out_ptr,
    # inputs
    q_ptr,
    k_ptr,
    positions_ptr,  # [tokens]
    cos_sin_ptr,  # [max_positions, head_dim] fp32: cos | sin
    # strides (elements); head_dim is contiguous everywhere
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_qo_token,
    stride_qo_head,
    stride_ko_token,
    stride_ko_head,
    stride_cs_pos,
    # shapes
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,  # head_dim // 2
    # tiling (powers of two)
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cs_ptrs = cos_sin_ptr + pos * stride_cs_pos + dims
    # Round to the input dtype as the reference does.
    in_dtype = q_ptr.dtype.element_ty
    cos = tl.load(cs_ptrs, mask=dims < HALF, other=0.0).to(in_dtype).to(tl.float32)[None, :]
    sin = tl.load(cs_ptrs + HALF, mask=dims < HALF, other=0.0).to(in_dtype).to(tl.float32)[None, :]
    _rotate_heads(
        q_out_ptr, q_ptr, cos, sin, token,
        stride_q_token, stride_q_head, stride_qo_token, stride_qo_head,
        NUM_Q_HEADS, HALF, Q_HEADS_PAD, HALF_PAD,
    )  # fmt: skip
    _rotate_heads(
        k_out_ptr, k_ptr, cos, sin, token,
        stride_k_token, stride_k_head, stride_ko_token, stride_ko_head,
        NUM_K_HEADS, HALF, K_HEADS_PAD, HALF_PAD,
    )  # fmt: skip


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.apply_rotary_emb`; returns new (q, k), inputs untouched."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"expected q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim], "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    num_tokens, num_q_heads, head_dim = q.shape
    if head_dim % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"cos_sin_cache must be [max_positions, {head_dim}] (even), got {tuple(cos_sin_cache.shape)}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions must have shape ({num_tokens},), got {tuple(positions.shape)}")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one float dtype, got {q.dtype} and {k.dtype}")
    check_launchable(_rotary_kernel, q, k, positions, cos_sin_cache)
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    cos_sin_cache = cos_sin_cache.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens == 0:
        return q_out, k_out
    num_k_heads = k.shape[1]
    _rotary_kernel[(num_tokens,)](
        q_out, k_out,
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=head_dim // 2,
        Q_HEADS_PAD=pow2(num_q_heads), K_HEADS_PAD=pow2(num_k_heads), HALF_PAD=pow2(head_dim // 2),
    )  # fmt: skip
    return q_out, k_out


__all__ = ["apply_rotary_emb"]
