"""RMSNorm and fused residual add + RMSNorm in Triton: one program per row.

Numerics follow `kernels.reference.rms_norm` (Llama's): the sum of squares
and the normalisation run in fp32, the normalised row is rounded to the
input dtype, then multiplied by the weight in the promoted dtype. The fused
kernel rounds x + residual to the input dtype first, as the reference's
`x + residual` does, and writes that sum out as the new residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shardline.kernels._triton_common import FLOAT_DTYPES, check_launchable, pow2

# A whole row lives in registers; past 4096 columns spread it over more warps.
# Unmeasured: the usual Triton layer-norm sizing, not a benchmark result.
WARPS_BY_WIDTH = ((1024, 4), (4096, 8))
MAX_WARPS = 16


@triton.jit
def _rms_norm_kernel(
    # outputs: normed rows, and (FUSED) the new residual x + residual
    out_ptr,
    residual_out_ptr,
    # inputs
    x_ptr,
    residual_ptr,
    weight_ptr,
    eps,
    # row strides (elements); columns are contiguous
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    # shapes
    N_COLS: tl.constexpr,
    BLOCK: tl.constexpr,  # N_COLS padded to a power of two
    FUSED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < N_COLS
    x = tl.load(x_ptr + row * stride_x + cols, mask=col_ok, other=0.0)
    in_dtype = x.dtype
    xf = x.to(tl.float32)
    if FUSED:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=col_ok, other=0.0).to(tl.float32)
        summed = (xf + r).to(in_dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, summed, mask=col_ok)
        xf = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N_COLS + eps)
    normed = (xf * rstd).to(in_dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=col_ok)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """t as [rows, n_cols] with contiguous columns (a view when it can be)."""
    rows = t.reshape(-1, n_cols)
    return rows if rows.stride(1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n_cols = x.shape[-1]
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x and weight must be float tensors, got {x.dtype} and {weight.dtype}")
    if weight.shape != (n_cols,):
        raise ValueError(f"weight must have shape ({n_cols},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")
    check_launchable(_rms_norm_kernel, x, weight, *([] if residual is None else [residual]))
    x2 = _rows(x, n_cols)
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(-1, n_cols)
    if residual is None:
        r2 = ro2 = x2  # unused
        residual_out = None
    else:
        r2 = _rows(residual, n_cols)
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        ro2 = residual_out.view(-1, n_cols)
    if x2.shape[0] == 0:
        return out, residual_out
    block = pow2(n_cols)
    num_warps = next((w for width, w in WARPS_BY_WIDTH if block <= width), MAX_WARPS)
    _rms_norm_kernel[(x2.shape[0],)](
        out2, ro2,
        x2, r2, weight, eps,
        x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
        N_COLS=n_cols, BLOCK=block, FUSED=residual is not None,
        num_warps=num_warps,
    )  # fmt: skip
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of `reference.rms_norm`: RMSNorm over the last dimension of x [..., hidden]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.fused_add_rms_norm`: (RMSNorm(x + residual), x + residual)."""
    return _launch(x, residual, weight, eps)


__all__ = ["rms_norm", "fused_add_rms_norm"]
