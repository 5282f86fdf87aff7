"""The one place that picks a kernel implementation.

Every kernel has a torch reference (`kernels.reference`) and may have a
Triton version (for CUDA) and a native CPU version (C, `kernels.cpu_native`)
registered here. `impl="auto"` takes Triton for CUDA tensors when it is
installed, the native version for CPU tensors when it builds on this machine,
and the torch reference otherwise. The environment variable
SHARDLINE_KERNELS=torch|triton|native|auto overrides "auto" for the whole
process: "triton" and "native" then take that version of every kernel that
has one and the torch reference for the others, whereas an explicit
`impl="triton"` for a kernel without a Triton version is an error.
`impl="triton"` on CPU tensors runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

IMPLS = ("auto", "torch", "triton", "native")

_torch_impls: dict[str, Callable] = {}
_triton_impls: dict[str, Callable] = {}
_native_impls: dict[str, Callable] = {}
# Whether the native library builds here, asked once (it compiles on first use).
_native_ok: bool | None = None


def register(
    name: str, *, torch_impl: Callable, triton_impl: Callable | None = None, native_impl: Callable | None = None
) -> None:
    """Register a kernel's implementations under one name."""
    _torch_impls[name] = torch_impl
    if triton_impl is not None:
        _triton_impls[name] = triton_impl
    if native_impl is not None:
        _native_impls[name] = native_impl


def native_available() -> bool:
    """Whether the native CPU kernels build and load on this machine."""
    global _native_ok
    if _native_ok is None:
        from shardline.kernels import cpu_native

        _native_ok = cpu_native.available()
    return _native_ok


def triton_available() -> bool:
    """Whether the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve(name: str, impl: str, device: torch.device) -> Callable:
    """The implementation of kernel `name` to run on `device` for the requested `impl`.

    Called on every kernel launch, so the answer is memoized per (name, impl,
    device type, override, interpreter flag).
    """
    key = (name, impl, device.type, os.environ.get("SHARDLINE_KERNELS"), os.environ.get("TRITON_INTERPRET"))
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(name, impl, device)
    return fn


_resolved: dict[tuple, Callable] = {}


def _resolve(name: str, impl: str, device: torch.device) -> Callable:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("SHARDLINE_KERNELS", "auto")
        if impl not in IMPLS:
            raise ValueError(f"SHARDLINE_KERNELS must be one of {IMPLS}, got {impl!r}")
        if impl == "triton" and name not in _triton_impls:
            # The override prefers Triton where a kernel has it (as "native" does), not everywhere.
            return _torch_impls[name]
    if impl == "auto":
        if device.type == "cuda" and name in _triton_impls and triton_available():
            impl = "triton"
        elif device.type == "cpu" and name in _native_impls and native_available():
            impl = "native"
        else:
            impl = "torch"
    if impl == "native":
        if name not in _native_impls or device.type != "cpu":
            return _torch_impls[name]  # no native version of this kernel or for this device
        return _native_impls[name]
    if impl == "triton":
        if name not in _triton_impls:
            raise ValueError(f"kernel {name!r} has no Triton implementation")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"Triton kernel {name!r} on {device.type} tensors needs TRITON_INTERPRET=1")
        return _triton_impls[name]
    return _torch_impls[name]
