"""Compute kernels: a torch reference for each, Triton where registered, one dispatch point.

The engine calls only the functions below; `kernels.dispatch.resolve` picks
the implementation (see its docstring for the rules and the override).
The Triton versions live in kernels/triton_*.py and are imported on their
first call, so `import shardline.kernels` works where triton is not installed.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch

from shardline.kernels import cpu_native, quant, reference
from shardline.kernels.dispatch import register, resolve
from shardline.kernels.step import AttentionMetadata, LayerWeights, OutputRows, StackWeights, select_rows, split_attention


def _lazy_triton(module: str, name: str) -> Callable:
    """`kernels.<module>.<name>`, importing the module (and triton) on the first call only."""

    def launch(*args, **kwargs):
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(*args, **kwargs)

    launch.__name__ = launch.__qualname__ = f"{module}.{name}"
    return launch


register(
    "paged_attention_decode",
    torch_impl=reference.paged_attention_decode,
    triton_impl=_lazy_triton("triton_attention", "paged_attention_decode"),
    native_impl=cpu_native.paged_attention_decode,
)
register(
    "paged_attention_prefill",
    torch_impl=reference.paged_attention_prefill,
    triton_impl=_lazy_triton("triton_attention", "paged_attention_prefill"),
    native_impl=cpu_native.paged_attention_prefill,
)
register(
    "rms_norm",
    torch_impl=reference.rms_norm,
    triton_impl=_lazy_triton("triton_norm", "rms_norm"),
    native_impl=cpu_native.rms_norm,
)
register(
    "fused_add_rms_norm",
    torch_impl=reference.fused_add_rms_norm,
    triton_impl=_lazy_triton("triton_norm", "fused_add_rms_norm"),
    native_impl=cpu_native.fused_add_rms_norm,
)
register(
    "apply_rotary_emb",
    torch_impl=reference.apply_rotary_emb,
    triton_impl=_lazy_triton("triton_rotary", "apply_rotary_emb"),
    native_impl=cpu_native.apply_rotary_emb,
)
register("linear", torch_impl=reference.linear, native_impl=cpu_native.linear)
register("decoder_stack", torch_impl=reference.decoder_stack, native_impl=cpu_native.decoder_stack)
register("silu_and_mul", torch_impl=reference.silu_and_mul, native_impl=cpu_native.silu_and_mul)
register(
    "linear_silu_and_mul", torch_impl=reference.linear_silu_and_mul, native_impl=cpu_native.linear_silu_and_mul
)
register("write_kv_cache", torch_impl=reference.write_kv_cache, native_impl=cpu_native.write_kv_cache)
register(
    "apply_token_bitmask", torch_impl=reference.apply_token_bitmask, native_impl=cpu_native.apply_token_bitmask
)
register(
    "dequant_matmul", torch_impl=quant.dequant_matmul, triton_impl=_lazy_triton("triton_quant", "dequant_matmul")
)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Decode attention over block tables: [num_seqs, num_heads, head_dim] -> same shape."""
    fn = resolve("paged_attention_decode", impl, query.device)
    return fn(query, key_cache, value_cache, block_tables, context_lens, scale)


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """Causal prefill attention over a cached prefix for packed variable-length chunks."""
    fn = resolve("paged_attention_prefill", impl, query.device)
    return fn(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension."""
    return resolve("rms_norm", impl, x.device)(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual)."""
    return resolve("fused_add_rms_norm", impl, x.device)(x, residual, weight, eps)


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, impl: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of q and k at `positions` (half-split layout)."""
    return resolve("apply_rotary_emb", impl, q.device)(q, k, positions, cos_sin_cache)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, impl: str = "auto") -> torch.Tensor:
    """x @ weight.T + bias (the native CPU version streams bf16 weights at small batch)."""
    return resolve("linear", impl, x.device)(x, weight, bias)


def prepare_linear_weights(weights: Iterable[torch.Tensor]) -> int:
    """Repack linear weights for the native matmul once, at load time, not on the first request.

    Returns how many were packed (0 where `linear` does not run natively for them).
    """
    count = 0
    for w in weights:
        if resolve("linear", "auto", w.device) is cpu_native.linear and cpu_native.packed_weight(w) is not None:
            count += 1
    return count


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """A packed step's attention: decode rows first, then prefill chunks ([num_tokens, heads, head_dim])."""
    decode = resolve("paged_attention_decode", impl, query.device)
    prefill = resolve("paged_attention_prefill", impl, query.device)
    return split_attention(decode, prefill, query, key_cache, value_cache, meta, scale)


def stack_supported(device: torch.device, dtype: torch.dtype, head_dim: int, with_prefill: bool) -> bool:
    """Whether `decoder_stack` runs a step as one native call (any batch size; prefill rows
    need a native prefill attention for this head dim)."""
    native = resolve("decoder_stack", "auto", device) is cpu_native.decoder_stack
    return native and cpu_native.stack_supported(dtype, head_dim, with_prefill)


def decoder_stack(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    rope_cache: torch.Tensor,
    stack: StackWeights,
    out: OutputRows | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Every decoder layer of a packed step plus the final norm (natively: one call per step);
    the hidden states of `out`'s rows only when given, the last layer run for those rows alone."""
    fn = resolve("decoder_stack", impl, hidden.device)
    return fn(hidden, positions, meta, rope_cache, stack, out)


def silu_and_mul(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up for a fused [..., 2 * d] gate/up projection."""
    return resolve("silu_and_mul", impl, x.device)(x)


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """silu(gate) * up of x through a fused [2 * d, K] gate/up weight (natively one pass, the
    [..., 2 * d] product never written)."""
    return resolve("linear_silu_and_mul", impl, x.device)(x, weight)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: str = "auto",
) -> None:
    """Store this step's K and V ([tokens, kv_heads, head_dim]) into their paged-cache slots."""
    resolve("write_kv_cache", impl, key.device)(key, value, key_cache, value_cache, slot_mapping)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor, impl: str = "auto") -> None:
    """Constrained decoding's mask, in place: token t of logits row rows[k] to -inf where bit t of
    bitmask[k] is clear."""
    resolve("apply_token_bitmask", impl, logits.device)(logits, bitmask, rows)


def dequant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int, impl: str = "auto"
) -> torch.Tensor:
    """x [..., K] @ W.T for a weight quantized by `kernels.quant.quantize` (int8, or int4 packed two per byte)."""
    return resolve("dequant_matmul", impl, x.device)(x, qweight, scales, group_size, bits)


__all__ = [
    "paged_attention_decode",
    "paged_attention_prefill",
    "rms_norm",
    "fused_add_rms_norm",
    "apply_rotary_emb",
    "linear",
    "paged_attention",
    "stack_supported",
    "decoder_stack",
    "AttentionMetadata",
    "OutputRows",
    "select_rows",
    "LayerWeights",
    "StackWeights",
    "silu_and_mul",
    "linear_silu_and_mul",
    "write_kv_cache",
    "apply_token_bitmask",
    "dequant_matmul",
]
