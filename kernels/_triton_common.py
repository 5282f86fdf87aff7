"""What every Triton kernel file shares: launch checks and a dot that the interpreter gets right.

Only the triton_*.py files import this module, and `kernels/__init__.py`
imports those on first use, so `import shardline.kernels` never imports triton (a
Linux-only dev dependency).

NOTE: `triton.jit` decides between compiling and interpreting when it
decorates a kernel, reading TRITON_INTERPRET at that moment (Triton 3.x,
`knobs.runtime.interpret`). A kernel file imported before the variable was
set therefore holds compiled kernels that cannot take CPU tensors;
`check_launchable` turns that into a clear error instead of a driver crash.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """Whether kernels decorated now run in the Triton interpreter."""
    return bool(triton.knobs.runtime.interpret)


def check_launchable(kernel, *tensors: torch.Tensor) -> None:
    """Raise unless `kernel` can run on the tensors' device: CUDA compiled, CPU interpreted."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    is_interpreted = type(kernel).__name__ == "InterpretedFunction"
    name = getattr(kernel, "__name__", repr(kernel))
    if device.type == "cpu" and not is_interpreted:
        raise RuntimeError(
            f"{name} was decorated without TRITON_INTERPRET=1, so it cannot take CPU tensors; "
            "set TRITON_INTERPRET=1 before the first Triton kernel of kernels/ is used"
        )
    if device.type == "cuda" and is_interpreted:
        raise RuntimeError(f"{name} was decorated with TRITON_INTERPRET=1; unset it to run on CUDA")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on cuda (or cpu under TRITON_INTERPRET=1), not {device.type}")


def upcast_dots(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `mma` should multiply in fp32 (IEEE) rather than in the operands' dtype.

    fp32 inputs: yes, so that results match the fp32 references instead of
    TF32. 16-bit inputs: on the GPU no (tensor cores, fp32 accumulation); in
    the interpreter yes, because its `tl.dot` multiplies bfloat16 bit patterns
    as integers (triton-lang/triton#11584, "not supported yet"). A bf16 x bf16
    product is exact in fp32, so the interpreter still computes what the GPU does.
    """
    return dtype == torch.float32 or device.type != "cuda"


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation; see `upcast_dots` for UPCAST."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum): Triton block shapes must be powers of two."""
    return max(triton.next_power_of_2(n), minimum)


# Torch dtypes the kernels accept, for the launchers' checks.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
