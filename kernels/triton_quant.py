"""Dequantizing matmul in Triton: out = x @ W.T with W stored as int8 or packed int4 (kernels/quant.py layouts).

Each program computes a [BLOCK_M, BLOCK_N] tile of the output, walking K in
steps of BLOCK_K. BLOCK_K divides group_size, so every step needs one scale
per output column, applied to the fp32 partial product after the dot instead
of to every weight. int4 bytes are split into their low nibbles (even inputs)
and high nibbles (odd inputs), which meet x's even and odd columns in two
dots: no interleaving in registers. A nibble becomes a float without an
int-to-float conversion: OR-ing it into the mantissa of 2**23 and subtracting
2**23 + 8 yields q - 8 exactly.

Batch 1 (decode) is the case that matters: the weight is read once and the
kernel is bound by memory bandwidth, where int4 moves a quarter of bf16's bytes.
The torch reference is `kernels.quant.dequant_matmul`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton_common import check_launchable, mma, upcast_dots
from kernels.quant import check_dequant_matmul_args

# (BLOCK_M, BLOCK_N, BLOCK_K cap, num_warps, num_stages) by batch size. Small
# batches take narrow N tiles so that a 4096-wide layer still yields 256
# programs for 132 SMs, and deep K tiles with 4 pipeline stages to keep loads
# in flight. NOTE: unmeasured; benchmarks/kernels_gpu.py sweeps these on a GPU.
SMALL_BATCH_CONFIG = (16, 16, 256, 4, 4)
LARGE_BATCH_CONFIG = (64, 64, 64, 4, 3)
SMALL_BATCH = 16
# In the interpreter, smaller K tiles make the tests cross many groups.
CPU_CONFIG = (16, 16, 64, 1, 1)
# Bit pattern of 2**23 as fp32; jit code reads globals only when they are constexpr.
MAGIC = tl.constexpr(0x4B000000)


@triton.jit
def _dequant_matmul_kernel(
    # output [M, N] in x's dtype
    out_ptr,
    # inputs: activations [M, K], weights (int8 [N, K] or uint8 [N, K // 2]), scales [N, K // GROUP_SIZE]
    x_ptr,
    qweight_ptr,
    scales_ptr,
    # shapes
    M,
    N,
    K,
    # row strides (elements); the last dimension of every input is contiguous
    stride_x,
    stride_q,
    stride_s,
    stride_o,
    # format
    GROUP_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    # tiling: BLOCK_K divides GROUP_SIZE
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x  # [BLOCK_M, 1]
    w_cols = qweight_ptr + cols.to(tl.int64)[None, :] * stride_q  # [1, BLOCK_N]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        scale = tl.load(scales_ptr + cols * stride_s + k0 // GROUP_SIZE, mask=col_ok, other=0.0).to(tl.float32)
        if BITS == 4:
            pairs = tl.arange(0, BLOCK_K // 2)
            # packed: [BLOCK_K // 2, BLOCK_N], byte j holds inputs k0 + 2j (low) and k0 + 2j + 1 (high)
            packed = tl.load(w_cols + (k0 // 2 + pairs)[:, None], mask=col_ok[None, :], other=0).to(tl.int32)
            low = ((packed & 0xF) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0  # 2**23 + 8
            high = ((packed >> 4) | MAGIC).to(tl.float32, bitcast=True) - 8388616.0
            x_even = tl.load(x_rows + (k0 + 2 * pairs)[None, :], mask=row_ok[:, None], other=0.0)
            x_odd = tl.load(x_rows + (k0 + 2 * pairs + 1)[None, :], mask=row_ok[:, None], other=0.0)
            part = mma(x_even, low.to(x_even.dtype), UPCAST) + mma(x_odd, high.to(x_odd.dtype), UPCAST)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_cols + ks[:, None], mask=col_ok[None, :], other=0).to(tl.float32)  # [BLOCK_K, BLOCK_N]
            xt = tl.load(x_rows + ks[None, :], mask=row_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            part = mma(xt, w.to(xt.dtype), UPCAST)
        acc += part * scale[None, :]

    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_o + cols[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _config(m: int, group_size: int, bits: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for this batch size and group size."""
    if device.type != "cuda":
        block_m, block_n, k_cap, warps, stages = CPU_CONFIG
    else:
        block_m, block_n, k_cap, warps, stages = SMALL_BATCH_CONFIG if m <= SMALL_BATCH else LARGE_BATCH_CONFIG
    # The largest power of two dividing group_size, so that a K tile never straddles two groups.
    block_k = min(k_cap, group_size & -group_size)
    return block_m, block_n, block_k, warps, stages


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bits: int,
    *,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Triton twin of `kernels.quant.dequant_matmul`: x [..., K] @ W.T -> [..., N] in x's dtype.

    Needs group_size to be a multiple of 32 (int4) or 16 (int8), the smallest
    K tiles tl.dot takes. config: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages) override, for the GPU benchmark's sweep.
    """
    check_dequant_matmul_args(x, qweight, scales, group_size, bits)
    min_group = 32 if bits == 4 else 16
    if group_size % min_group:
        raise ValueError(f"the Triton int{bits} matmul needs group_size a multiple of {min_group}, got {group_size}")
    check_launchable(_dequant_matmul_kernel, x, qweight, scales)
    n = qweight.shape[0]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    block_m, block_n, block_k, warps, stages = config or _config(m, group_size, bits, x.device)
    if group_size % block_k:
        raise ValueError(f"BLOCK_K {block_k} must divide group_size {group_size}")
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequant_matmul_kernel[grid](
        out, x2, qweight, scales,
        m, n, k,
        x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, BITS=bits,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        UPCAST=upcast_dots(x.dtype, x.device),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)


__all__ = ["dequant_matmul"]
