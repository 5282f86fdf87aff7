"""Weight-only quantization: int8 and int4 with group-wise scales, and the torch dequantizing matmul.

A linear weight W [out_features N, in_features K] is cut, along K, into
groups of `group_size` inputs; each (output channel, group) gets one scale
and its weights become small integers, symmetric around zero:

    int8: q = round(w / s), s = absmax / 127, q in [-127, 127]   (group_size = K: per channel)
    int4: q = round(w / s), s = absmax / 7,   q in [-8, 7]

so that W ~= q * s with an error of at most s / 2 per weight.

Layouts (what `dequant_matmul` and its Triton twin read):
    int8 qweight: [N, K] int8
    int4 qweight: [N, K // 2] uint8, two weights per byte along K: byte j of a
                  row holds input 2j in its low nibble and input 2j + 1 in its
                  high nibble, each stored as q + 8 (0..15)
    scales:       [N, K // group_size], the weight's dtype

`dequant_matmul(x, qweight, scales, group_size, bits)` computes
x @ dequantize(...).T; the reference here dequantizes to x's dtype and calls
torch's matmul, the Triton kernel (kernels/triton_quant.py) dequantizes tile
by tile in registers.
"""

from __future__ import annotations

import torch

BITS = (4, 8)
# Largest magnitude of each format's quantized values as used by `quantize`.
QMAX = {8: 127, 4: 7}


def check_group_size(in_features: int, group_size: int, bits: int) -> None:
    """Raise ValueError unless `group_size` cuts `in_features` into whole groups (even ones for int4)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group_size must divide in_features ({in_features}), got {group_size}")
    if bits == 4 and group_size % 2:
        raise ValueError(f"int4 packs two weights per byte, so group_size must be even, got {group_size}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in [-8, 7] -> [N, K // 2] uint8 (low nibble: even input, high nibble: odd input)."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] uint8 -> [N, K] int8 in [-8, 7]; the inverse of `pack_int4`."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed int4 weights must be uint8, got {packed.dtype}")
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    # interleave: [N, K // 2, 2] -> [N, K]
    return torch.stack((low, high), dim=-1).flatten(-2)


def quantize(weight: torch.Tensor, group_size: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize W [N, K] symmetrically per (output channel, group of `group_size` inputs).

    Returns (qweight, scales) in the layouts of the module docstring; scales
    keep the weight's dtype, and the integers are rounded against those
    stored scales, so the s / 2 error bound holds for what is stored.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D float tensor [out, in], got {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    check_group_size(k, group_size, bits)
    qmax = QMAX[bits]
    # groups: [N, K // group_size, group_size]
    groups = weight.float().view(n, k // group_size, group_size)
    scales = (groups.abs().amax(dim=-1) / qmax).to(weight.dtype)
    safe = scales.float().masked_fill(scales == 0, 1.0)  # all-zero groups quantize to 0
    q = torch.round(groups / safe[..., None]).clamp(-qmax - (bits == 4), qmax).view(n, k)
    if bits == 8:
        return q.to(torch.int8), scales
    return pack_int4(q), scales


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Rebuild W [N, K] in `dtype` from `quantize`'s output (computed in fp32, rounded once)."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    n, k = q.shape
    check_group_size(k, group_size, bits)
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales must have shape ({n}, {k // group_size}), got {tuple(scales.shape)}")
    w = q.float().view(n, k // group_size, group_size) * scales.float()[..., None]
    return w.view(n, k).to(dtype)


def dequant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] for a quantized W: the torch reference of the Triton kernel."""
    check_dequant_matmul_args(x, qweight, scales, group_size, bits)
    return x @ dequantize(qweight, scales, group_size, bits, x.dtype).T


def check_dequant_matmul_args(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int
) -> None:
    """Shared input checks of the reference and the Triton dequantizing matmul."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    expected = torch.uint8 if bits == 4 else torch.int8
    if qweight.dim() != 2 or qweight.dtype != expected:
        raise ValueError(
            f"int{bits} qweight must be a 2-D {expected} tensor, got {tuple(qweight.shape)} {qweight.dtype}"
        )
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    if x.shape[-1] != k or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [..., {k}], got {tuple(x.shape)} {x.dtype}")
    check_group_size(k, group_size, bits)
    if scales.shape != (qweight.shape[0], k // group_size):
        raise ValueError(f"scales must have shape ({qweight.shape[0]}, {k // group_size}), got {tuple(scales.shape)}")


__all__ = ["quantize", "dequantize", "dequant_matmul", "pack_int4", "unpack_int4", "check_group_size"]
