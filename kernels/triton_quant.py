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

Batches of at most GEMV_MAX_M rows take a GEMV kernel instead: a 16-row tile
would waste 15/16 of the tiled kernel's work there. Each program owns BLOCK_N
output columns and walks K in chunks of G group slots of SUB inputs, reading
the weight as 32-bit words (8 int4 or 4 int8 weights) coalesced along K, 16
bytes per thread. A weight becomes a float with one LOP3 and one FMA: masked
in place and OR-ed into 2**23's mantissa, the word gives 2**23 + u * 16**p for
the nibble u at position p, and (that * 16**-p) - (2**(23 - 4p) + 8) is
u - 8 exactly (int8: bytes XOR 0x80, 256**p); positions past the 23-bit
mantissa are shifted down first. Each thread sums its words' products with x
in fp32, scales them by their group's scale into a [BLOCK_N, G, W]
accumulator, and one tl.sum at the end gives the columns: no cross-thread
reduction inside the loop. Rows of x are a static loop (M is a constexpr), so
the dequantized weights are shared by all of them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shardline.kernels._triton_common import check_launchable, mma, upcast_dots
from shardline.kernels.quant import check_dequant_matmul_args

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


# Batches up to this many rows take the GEMV kernel.
GEMV_MAX_M = 4
# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV kernel on the GPU: a
# chunk of 1024 int4 inputs is 128 words per row (256 for int8), one 16-byte
# load (two) for each of a warp's 32 threads, and each thread holds
# BLOCK_N / num_warps rows (4), which share its x values. Narrow layers (fewer than
# GEMV_MIN_PROGRAMS_PER_SM programs per SM at 16 columns) take 8 columns on
# 2 warps. NOTE: chosen by reasoning, not measured; kernels_gpu.py sweeps them.
GEMV_CONFIG = (16, 1024, 4, 3)
GEMV_NARROW_CONFIG = (8, 1024, 2, 3)
GEMV_MIN_PROGRAMS_PER_SM = 4
# In the interpreter: chunks of 128 inputs, so that small tests cross chunks and end mid-chunk.
GEMV_CPU_CONFIG = (8, 128, 1, 1)


@triton.jit
def _dequant_gemv_kernel(
    # output [M, N] in x's dtype
    out_ptr,
    # inputs: activations [M, K], weights (int8 [N, K] or uint8 [N, K // 2], read as int32 words), scales
    x_ptr,
    qweight_ptr,
    scales_ptr,
    # shapes
    N,
    K,
    # row strides: x, scales and out in elements, the weight in 32-bit words
    stride_x,
    stride_w,
    stride_s,
    stride_o,
    # 0xF (int4) or 0xFF (int8), passed at run time: the compiler then keeps the shifted masks in
    # registers, where a constant gets re-materialised with a MOV before every LOP3 (sm_90 SASS)
    low_mask,
    # format
    GROUP_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    # rows of x (1..4): a static loop
    M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    # a chunk of K is G slots of SUB inputs; SUB (a power of two) divides GROUP_SIZE
    SUB: tl.constexpr,
    G: tl.constexpr,
    # K is a multiple of SUB * G: no masks along K
    EVEN_K: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    W: tl.constexpr = SUB // PER_WORD
    CHUNK: tl.constexpr = SUB * G
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    # Columns past N read column N - 1 (unmasked, vectorised loads) and are not stored.
    safe_cols = tl.minimum(cols, N - 1).to(tl.int64)
    slot = tl.arange(0, G)
    word = tl.arange(0, W)
    w_ptrs = qweight_ptr.to(tl.pointer_type(tl.int32)) + safe_cols[:, None, None] * stride_w
    w_ptrs += slot[None, :, None] * W + word[None, None, :]  # [BLOCK_N, G, W]
    s_ptrs = scales_ptr + safe_cols[:, None] * stride_s  # [BLOCK_N, 1]
    x_ptrs = x_ptr + slot[:, None] * SUB + word[None, :] * PER_WORD  # [G, W]: each word's first input

    acc0 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
    for k0 in range(0, K, CHUNK):
        slot_ok = k0 + slot * SUB < K
        if EVEN_K:
            packed = tl.load(w_ptrs + k0 // PER_WORD)
            scale = tl.load(s_ptrs + (k0 + slot[None, :] * SUB) // GROUP_SIZE).to(tl.float32)
        else:
            packed = tl.load(w_ptrs + k0 // PER_WORD, mask=slot_ok[None, :, None], other=0)
            scale = tl.load(s_ptrs + (k0 + slot[None, :] * SUB) // GROUP_SIZE, mask=slot_ok[None, :], other=0.0)
            scale = scale.to(tl.float32)
        x_ok = slot_ok[:, None]  # x is tiny and cached: its loads stay masked
        # Positions whose bits end above the 23-bit mantissa come from the word shifted down.
        high = packed >> 12 if BITS == 4 else packed >> 16
        dot0 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
        dot1 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
        dot2 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
        dot3 = tl.zeros([BLOCK_N, G, W], dtype=tl.float32)
        for i in tl.static_range(PER_WORD):
            q = _weight_at(packed, high, low_mask, i, BITS)  # [BLOCK_N, G, W] fp32, exact integers
            xi = x_ptrs + k0 + i
            dot0 += q * tl.load(xi, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
            if M > 1:
                dot1 += q * tl.load(xi + stride_x, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
            if M > 2:
                dot2 += q * tl.load(xi + 2 * stride_x, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
            if M > 3:
                dot3 += q * tl.load(xi + 3 * stride_x, mask=x_ok, other=0.0).to(tl.float32)[None, :, :]
        acc0 += dot0 * scale[:, :, None]
        if M > 1:
            acc1 += dot1 * scale[:, :, None]
        if M > 2:
            acc2 += dot2 * scale[:, :, None]
        if M > 3:
            acc3 += dot3 * scale[:, :, None]

    col_ok = cols < N
    o_ptrs = out_ptr + cols
    tl.store(o_ptrs, tl.sum(tl.sum(acc0, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=col_ok)
    if M > 1:
        tl.store(o_ptrs + stride_o, tl.sum(tl.sum(acc1, axis=2), axis=1).to(out_ptr.dtype.element_ty), mask=col_ok)
    if M > 2:
        o2 = tl.sum(tl.sum(acc2, axis=2), axis=1).to(out_ptr.dtype.element_ty)
        tl.store(o_ptrs + 2 * stride_o, o2, mask=col_ok)
    if M > 3:
        o3 = tl.sum(tl.sum(acc3, axis=2), axis=1).to(out_ptr.dtype.element_ty)
        tl.store(o_ptrs + 3 * stride_o, o3, mask=col_ok)


@triton.jit
def _weight_at(packed, high, low_mask, I: tl.constexpr, BITS: tl.constexpr):
    """Weight I of each 32-bit word as fp32 (q exactly); `high` is the word shifted down by 12 (int4) or 16 (int8)."""
    if BITS == 4:
        # nibble I = u, stored q + 8; positions 0..4 in place, 5..7 at 2..4 of `high`
        P: tl.constexpr = I if I < 5 else I - 3
        src = packed if I < 5 else high
        UNIT: tl.constexpr = 1 << (4 * P)  # 16**P
        bits = (src & (low_mask << (4 * P))) | MAGIC  # 2**23 + u * 16**P
        out = bits.to(tl.float32, bitcast=True) * (1.0 / UNIT) - (8388608.0 / UNIT + 8.0)
    else:
        # byte I = b, two's complement: b ^ 0x80 = q + 128; positions 0..1 in place, 2..3 at 0..1 of `high`
        P: tl.constexpr = I if I < 2 else I - 2
        src = packed if I < 2 else high
        FLIP_MAGIC: tl.constexpr = (0x80 << (8 * P)) + 0x4B000000  # MAGIC; disjoint from the mask's bits
        UNIT: tl.constexpr = 1 << (8 * P)  # 256**P
        bits = (src & (low_mask << (8 * P))) ^ FLIP_MAGIC  # 2**23 + (q + 128) * 256**P
        out = bits.to(tl.float32, bitcast=True) * (1.0 / UNIT) - (8388608.0 / UNIT + 128.0)
    return out


def _config(m: int, group_size: int, bits: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for this batch size and group size."""
    if device.type != "cuda":
        block_m, block_n, k_cap, warps, stages = CPU_CONFIG
    else:
        block_m, block_n, k_cap, warps, stages = SMALL_BATCH_CONFIG if m <= SMALL_BATCH else LARGE_BATCH_CONFIG
    # The largest power of two dividing group_size, so that a K tile never straddles two groups.
    block_k = min(k_cap, group_size & -group_size)
    return block_m, block_n, block_k, warps, stages


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gemv_config(n: int, k: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMV kernel for an [n, k] weight."""
    if device.type != "cuda":
        return GEMV_CPU_CONFIG
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    block_n = GEMV_CONFIG[0]
    if triton.cdiv(n, block_n) < GEMV_MIN_PROGRAMS_PER_SM * sms:
        return GEMV_NARROW_CONFIG
    return GEMV_CONFIG


def _gemv(x2, qweight, scales, out, group_size, bits, config):
    m, k = x2.shape
    n = qweight.shape[0]
    block_n, block_k, warps, stages = config
    per_word = 32 // bits
    # SUB: the largest power of two dividing group_size (a slot never straddles two groups), at most BLOCK_K
    sub = min(group_size & -group_size, block_k)
    # a chunk no longer than K needs (K is a multiple of sub: sub divides group_size)
    chunk = min(block_k, max(sub, triton.next_power_of_2(k)))
    if sub % per_word or chunk % sub:
        raise ValueError(f"GEMV BLOCK_K {block_k} and group_size {group_size}: need int{bits} words per slot")
    _dequant_gemv_kernel[(triton.cdiv(n, block_n),)](
        out, x2, qweight, scales,
        n, k,
        x2.stride(0), qweight.stride(0) * qweight.element_size() // 4, scales.stride(0), out.stride(0),
        0xF if bits == 4 else 0xFF,
        GROUP_SIZE=group_size, BITS=bits, M=m,
        BLOCK_N=block_n, SUB=sub, G=chunk // sub, EVEN_K=k % chunk == 0,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bits: int,
    *,
    config: tuple[int, int, int, int, int] | None = None,
    gemv_config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Triton twin of `kernels.quant.dequant_matmul`: x [..., K] @ W.T -> [..., N] in x's dtype.

    Needs group_size to be a multiple of 32 (int4) or 16 (int8), the smallest
    K tiles tl.dot takes. Batches of at most GEMV_MAX_M rows take the GEMV
    kernel, larger ones the tiled kernel. config: (BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages) of the tiled kernel, which it then uses at any
    batch size; gemv_config: (BLOCK_N, BLOCK_K, num_warps, num_stages) of the
    GEMV kernel; both overrides are for the GPU benchmark's sweep.
    """
    check_dequant_matmul_args(x, qweight, scales, group_size, bits)
    min_group = 32 if bits == 4 else 16
    if group_size % min_group:
        raise ValueError(f"the Triton int{bits} matmul needs group_size a multiple of {min_group}, got {group_size}")
    if config is not None and gemv_config is not None:
        raise ValueError("pass config (tiled kernel) or gemv_config (GEMV kernel), not both")
    check_launchable(_dequant_matmul_kernel, x, qweight, scales)
    n = qweight.shape[0]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    m = x2.shape[0]
    if gemv_config is not None and m > GEMV_MAX_M:
        raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_M} rows, got {m}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.view(*x.shape[:-1], n)
    # The GEMV kernel reads the weight as int32 words: its rows must start 4-byte aligned.
    if config is None and m <= GEMV_MAX_M and qweight.data_ptr() % 4 == 0:
        _gemv(x2, qweight, scales, out, group_size, bits, gemv_config or _gemv_config(n, k, x.device))
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
