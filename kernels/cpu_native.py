"""Native CPU kernels, compiled from kernels/csrc at first use and called through ctypes.

The torch reference of paged decode attention gathers every sequence's
blocks into a padded copy before it can attend; at batch 32 and beyond
that copy moves more bytes per step than the weights. The C kernel reads
the blocks in place through the block table instead. RMSNorm (with the
fused residual add) and rotary embedding are one call each instead of the
ten-odd small torch ops of their references, which at batch 1 is where a
decode step's time goes.

The shared library is built with the system C compiler (`cc`, with
-O3 -march=native -fopenmp) into ~/.cache/shardline/kernels, keyed by a hash
of the source and flags, so a machine builds it once. It links the same
libgomp.so.1 that torch loads, so it shares torch's OpenMP thread pool.
When no compiler is available the dispatch point keeps the torch reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

from shardline.kernels.memory import hugepage_zeros

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_error: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("SHARDLINE_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "shardline" / "kernels"


class StepAttention(ctypes.Structure):
    """kernels/csrc/cpu_kernels.c's StepAttention: how a step's rows attend (AttentionMetadata's tensors)."""

    _fields_ = [
        ("decode_tables", ctypes.c_void_p),
        ("decode_lens", ctypes.c_void_p),
        ("decode_max_blocks", ctypes.c_int),
        ("num_decodes", ctypes.c_int),
        ("prefill_tables", ctypes.c_void_p),
        ("query_start_loc", ctypes.c_void_p),
        ("prefill_lens", ctypes.c_void_p),
        ("prefill_max_blocks", ctypes.c_int),
        ("num_prefills", ctypes.c_int),
    ]


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (install gcc)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler] + FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([compiler, *FLAGS, "-o", str(out), str(SOURCE), "-lm"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {SOURCE.name} failed: {proc.stderr.strip().splitlines()[-1:]}")
            os.replace(out, target)  # atomic: concurrent builders agree
    lib = ctypes.CDLL(str(target))
    p, i, f, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long
    signatures = {
        "paged_decode": ([p] * 6 + [i] * 6 + [f, i], ctypes.c_int),
        "paged_prefill": ([p] * 7 + [i] * 6 + [f, i], ctypes.c_int),
        "rms_norm": ([p] * 5 + [i, i, f, i], None),
        "rotary": ([p] * 6 + [i] * 4 + [l, l, i], None),
        "silu_and_mul": ([p, p, i, i, i], None),
    }
    for base, (argtypes, restype) in signatures.items():
        for suffix in ("f32", "bf16"):
            fn = getattr(lib, f"{base}_{suffix}")
            fn.argtypes = argtypes
            fn.restype = restype
    lib.write_kv_cache.argtypes = [p] * 5 + [i, l, l, l]
    lib.write_kv_cache.restype = None
    lib.apply_token_bitmask_f32.argtypes = [p, p, p, i, i, i, l]
    lib.apply_token_bitmask_f32.restype = None
    for suffix in ("f32", "bf16"):
        fn = getattr(lib, f"linear_packed_{suffix}")
        fn.argtypes = [p] * 4 + [i] * 4
        fn.restype = ctypes.c_int
        fn = getattr(lib, f"linear_silu_packed_{suffix}")
        fn.argtypes = [p] * 3 + [i] * 4
        fn.restype = ctypes.c_int
        fn = getattr(lib, f"pack_weight_{suffix}")
        fn.argtypes = [p, p, i, i, i]
        fn.restype = None
        fn = getattr(lib, f"packed_numel_{suffix}")
        fn.argtypes = [i, i]
        fn.restype = ctypes.c_long
        fn = getattr(lib, f"decoder_stack_{suffix}")
        at = ctypes.POINTER(StepAttention)
        fn.argtypes = [p, i, p, p, at, p, i, at, p] + [p] * 10 + [i] * 7 + [f, f, i]
        fn.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on the first call; None if it cannot be built."""
    global _lib, _build_error
    if _lib is not None or _build_error is not None:
        return _lib
    with _lock:
        if _lib is None and _build_error is None:
            try:
                _lib = _build()
            except (RuntimeError, OSError) as e:
                _build_error = str(e)
    return _lib


def available() -> bool:
    """Whether the native kernels can run here (builds them if needed)."""
    return load() is not None


def build_error() -> str | None:
    return _build_error


def _kernel(base: str, dtype: torch.dtype):
    lib = load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_build_error}")
    if dtype == torch.float32:
        return getattr(lib, f"{base}_f32")
    if dtype == torch.bfloat16:
        return getattr(lib, f"{base}_bf16")
    raise ValueError(f"native kernels support float32 and bfloat16, got {dtype}")


def _check_paged(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int]:
    """Validate a query against the paged caches; returns (block_size, num_kv_heads)."""
    num_heads, head_dim = query.shape[1:]
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError("query and caches must share a dtype")
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"bad shapes: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    return block_size, num_kv_heads


def _paged_dims(
    num_seqs: int, query: torch.Tensor, num_kv_heads: int, block_size: int, tables: torch.Tensor, scale: float
) -> tuple:
    """The trailing size arguments of paged_decode_* and paged_prefill_*."""
    _, num_heads, head_dim = query.shape
    return (num_seqs, num_heads, num_kv_heads, head_dim, block_size, tables.shape[1], float(scale), torch.get_num_threads())


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as kernels.reference.paged_attention_decode, for fp32 or bf16 CPU tensors."""
    fn = _kernel("paged_decode", query.dtype)
    block_size, num_kv_heads = _check_paged(query, key_cache, value_cache)
    q = query.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    status = fn(
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        *_paged_dims(query.shape[0], query, num_kv_heads, block_size, tables, scale),
    )
    if status != 0:
        raise MemoryError("native decode attention could not allocate its scratch space")
    return out


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as kernels.reference.paged_attention_prefill; head dims other than 64
    and 128 (or a build without AVX-512) run the reference."""
    block_size, num_kv_heads = _check_paged(query, key_cache, value_cache)
    q = query.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    starts = query_start_loc.to(torch.int64).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    status = _kernel("paged_prefill", query.dtype)(
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        starts.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        *_paged_dims(lens.shape[0], query, num_kv_heads, block_size, tables, scale),
    )
    if status == 2:
        from shardline.kernels import reference

        return reference.paged_attention_prefill(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale)
    if status != 0:
        raise MemoryError("native prefill attention could not allocate its scratch space")
    return out


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    fn = _kernel("rms_norm", x.dtype)
    dim = x.shape[-1]
    if weight.shape != (dim,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{dim}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    res_in = res_out = None
    if residual is not None:
        res_in = residual.contiguous()
        res_out = torch.empty_like(x)
    fn(
        x.data_ptr(),
        res_in.data_ptr() if res_in is not None else None,
        weight.contiguous().data_ptr(),
        out.data_ptr(),
        res_out.data_ptr() if res_out is not None else None,
        x.numel() // dim,
        dim,
        float(eps),
        torch.get_num_threads(),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as kernels.reference.rms_norm."""
    return _rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.reference.fused_add_rms_norm."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must match x in shape and dtype")
    return _rms_norm(x, residual, weight, eps)


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.reference.apply_rotary_emb; q and k may be row-strided views."""
    fn = _kernel("rotary", q.dtype)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.dtype != q.dtype or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.shape[1] != head_dim:
        raise ValueError("cos_sin_cache must be [max_positions, head_dim] float32")
    # Each token's heads must be contiguous; tokens may sit at any stride.
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if k.stride(2) != 1 or k.stride(1) != head_dim:
        k = k.contiguous()
    pos = positions.to(torch.int64).contiguous()
    cache = cos_sin_cache.contiguous()
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype), torch.empty(k.shape, dtype=k.dtype)
    fn(
        q.data_ptr(),
        k.data_ptr(),
        pos.data_ptr(),
        cache.data_ptr(),
        q_out.data_ptr(),
        k_out.data_ptr(),
        num_tokens,
        num_heads,
        num_kv_heads,
        head_dim,
        q.stride(0),
        k.stride(0),
        torch.get_num_threads(),
    )
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.reference.silu_and_mul."""
    fn = _kernel("silu_and_mul", x.dtype)
    dim = x.shape[-1] // 2
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], dim, dtype=x.dtype)
    fn(x.data_ptr(), out.data_ptr(), x.numel() // (2 * dim), dim, torch.get_num_threads())
    return out


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Same contract as kernels.reference.apply_token_bitmask, for fp32 logits with contiguous rows."""
    if logits.dtype != torch.float32 or logits.stride(1) != 1 or bitmask.dtype != torch.int32:
        raise ValueError("apply_token_bitmask takes fp32 logits with contiguous rows and an int32 bitmask")
    lib = load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_build_error}")
    bitmask = bitmask.contiguous()
    rows = rows.to(torch.int64).contiguous()
    if len(rows) and not (0 <= int(rows.min()) and int(rows.max()) < logits.shape[0]):
        raise IndexError("apply_token_bitmask: a row index is out of range")
    lib.apply_token_bitmask_f32(
        logits.data_ptr(), bitmask.data_ptr(), rows.data_ptr(), len(rows), logits.shape[1], bitmask.shape[1], logits.stride(0)
    )


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Same contract as kernels.reference.write_kv_cache; key and value may be row-strided views."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_build_error}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if key_cache.shape[2:] != (num_kv_heads, head_dim) or key.dtype != key_cache.dtype or value.dtype != key.dtype:
        raise ValueError(f"bad shapes: key {tuple(key.shape)} {key.dtype}, cache {tuple(key_cache.shape)} {key_cache.dtype}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("caches must be contiguous")
    row = num_kv_heads * head_dim
    if key.stride(2) != 1 or key.stride(1) != head_dim:
        key = key.contiguous()
    if value.stride(2) != 1 or value.stride(1) != head_dim:
        value = value.contiguous()
    slots = slot_mapping.to(torch.int64).contiguous()
    size = key.element_size()
    lib.write_kv_cache(
        key.data_ptr(),
        value.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        slots.data_ptr(),
        num_tokens,
        row * size,
        key.stride(0) * size,
        value.stride(0) * size,
    )


# Weights repacked for linear_packed (kernels/csrc: panels of 64 output columns,
# K-major), made at load time (kernels.prepare_linear_weights) or on first use,
# on huge pages, dropped with the weight. Measured
# with 2 threads on the 2-vCPU EPYC, cold 4096x768 bf16 weight, GFLOP/s against
# oneDNN with its own packed weight: 1 row 26 vs 12, 8 rows 146 vs 70, 32 rows
# 269 vs 193, 128 rows 364 vs 350, 2048 rows 386 vs 411 (fp32: 15 vs 8, 101 vs
# 57, 159 vs 144, 176 vs 199, 179 vs 188). One path for every M, one extra copy.
# linear_silu_packed_*: the gate/up split does not fall on a panel boundary (the caller runs two steps;
# cpu_kernels.c names the same status).
STATUS_SPLIT_OFF_PANEL = 3
_packed: dict[int, torch.Tensor] = {}
_packed_ok: dict[torch.dtype, bool] = {}


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "bf16"


def packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of a [N, K] fp32/bf16 weight (None where the native matmul cannot run)."""
    key = id(weight)
    packed = _packed.get(key)
    if packed is not None:
        return packed
    lib = load()
    if lib is None or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dim() != 2:
        return None
    if not _has_packed(lib, weight.dtype):
        return None
    n, k = weight.shape
    sfx = _suffix(weight.dtype)
    packed = hugepage_zeros((getattr(lib, f"packed_numel_{sfx}")(n, k),), weight.dtype)
    w = weight.detach().contiguous()
    getattr(lib, f"pack_weight_{sfx}")(w.data_ptr(), packed.data_ptr(), n, k, torch.get_num_threads())
    _packed[key] = packed
    weakref.finalize(weight, _packed.pop, key, None)
    return packed


def packed_supported(dtype: torch.dtype) -> bool:
    """Whether the packed native matmul runs for this dtype on this machine."""
    lib = load()
    return lib is not None and dtype in (torch.float32, torch.bfloat16) and _has_packed(lib, dtype)


def _has_packed(lib: ctypes.CDLL, dtype: torch.dtype) -> bool:
    """Whether the library was built with the instructions for this dtype (else it returns 1)."""
    ok = _packed_ok.get(dtype)
    if ok is None:
        sfx = _suffix(dtype)
        x, y = torch.zeros(1, 2, dtype=dtype), torch.empty(1, 1, dtype=dtype)
        wp = torch.zeros(getattr(lib, f"packed_numel_{sfx}")(1, 2), dtype=dtype)
        ok = _packed_ok[dtype] = getattr(lib, f"linear_packed_{sfx}")(x.data_ptr(), wp.data_ptr(), None, y.data_ptr(), 1, 1, 2, 1) == 0
    return ok


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gated: bool) -> torch.Tensor | None:
    """x through the packed native matmul (gated: silu(gate) * up of a fused gate/up weight); None where it cannot run."""
    out_features, in_features = weight.shape
    differentiable = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    packed = packed_weight(weight) if x.dtype == weight.dtype and x.numel() and not differentiable else None
    if packed is None:
        return None
    rows = x.numel() // in_features
    x2 = x.reshape(rows, in_features).contiguous()
    y_features = out_features // 2 if gated else out_features
    y = torch.empty(rows, y_features, dtype=x.dtype)
    sfx = _suffix(x.dtype)
    if gated:
        rc = getattr(load(), f"linear_silu_packed_{sfx}")(
            x2.data_ptr(), packed.data_ptr(), y.data_ptr(), rows, out_features, in_features, torch.get_num_threads()
        )
    else:
        b = bias.contiguous() if bias is not None else None
        rc = getattr(load(), f"linear_packed_{sfx}")(
            x2.data_ptr(),
            packed.data_ptr(),
            b.data_ptr() if b is not None else None,
            y.data_ptr(),
            rows,
            out_features,
            in_features,
            torch.get_num_threads(),
        )
    if gated and rc == STATUS_SPLIT_OFF_PANEL:
        return None
    if rc != 0:
        raise MemoryError(f"native linear failed (status {rc})")
    return y.view(*x.shape[:-1], y_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as F.linear, through the packed-weight native matmul where it runs."""
    y = _packed_linear(x, weight, bias, gated=False)
    return F.linear(x, weight, bias) if y is None else y


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.reference.linear_silu_and_mul, in one pass where the gate/up split
    falls on a panel boundary: each tile runs a gate panel and its up panel over the same rows and
    stores silu(gate) * up, so the [rows, 2 * d] product is never written (a 2048-token prefill of
    SmolLM2 spent 3% of its time in silu_and_mul's separate pass over it)."""
    y = _packed_linear(x, weight, None, gated=True)
    return silu_and_mul(linear(x, weight)) if y is None else y


def stack_supported(dtype: torch.dtype, head_dim: int, with_prefill: bool) -> bool:
    """Whether `decoder_stack` runs a step natively: the packed matmul, and for prefill rows a
    native prefill attention (head dims 64 and 128)."""
    return packed_supported(dtype) and (not with_prefill or head_dim in (64, 128))


def _int_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous()


def _stack_addresses(stack) -> tuple[torch.Tensor, ...]:
    """Per-kind int64 arrays of every layer's tensor address (built once per stack)."""
    if stack.prepared is None:
        kinds = ("attn_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w13", "w2", "k_cache", "v_cache")
        projections = ("wqkv", "wo", "w13", "w2")

        def address(w, kind: str) -> int:
            t = getattr(w, kind)
            if t is None:
                return 0
            return _packed_ptr(t) if kind in projections else t.data_ptr()

        stack.prepared = tuple(
            torch.tensor([address(w, k) for w in stack.layers], dtype=torch.int64) for k in kinds
        )
    return stack.prepared


def _packed_ptr(weight: torch.Tensor) -> int:
    packed = packed_weight(weight)
    if packed is None:
        raise RuntimeError("the native decoder stack needs the packed matmul (AVX-512 for fp32, AVX512-BF16 for bf16)")
    return packed.data_ptr()


def _step_attention(meta) -> tuple[StepAttention, tuple[torch.Tensor, ...]]:
    """The struct for `meta`, and the tensors it points into (keep them alive for the call)."""
    d_tables, d_lens = _int_tensor(meta.decode_block_tables, torch.int32), _int_tensor(meta.decode_context_lens, torch.int32)
    p_tables, p_lens = _int_tensor(meta.prefill_block_tables, torch.int32), _int_tensor(meta.prefill_context_lens, torch.int32)
    p_starts = _int_tensor(meta.prefill_query_start_loc, torch.int64)
    at = StepAttention(
        d_tables.data_ptr(),
        d_lens.data_ptr(),
        d_tables.shape[1] if d_tables.dim() == 2 else 0,
        meta.num_decode_tokens,
        p_tables.data_ptr(),
        p_starts.data_ptr(),
        p_lens.data_ptr(),
        p_tables.shape[1] if p_tables.dim() == 2 else 0,
        p_lens.shape[0],
    )
    return at, (d_tables, d_lens, p_tables, p_lens, p_starts)


def decoder_stack(
    hidden: torch.Tensor, positions: torch.Tensor, meta, rope_cache: torch.Tensor, stack, out=None
) -> torch.Tensor:
    """Same contract as kernels.reference.decoder_stack, in one native call."""
    num_tokens, hidden_size = hidden.shape
    w0 = stack.layers[0]
    states = hidden.contiguous().clone()
    pos, slots = _int_tensor(positions, torch.int64), _int_tensor(meta.slot_mapping, torch.int64)
    at, alive = _step_attention(meta)
    if out is None:
        rows, out_at, out_alive, num_out = None, None, (), num_tokens
    else:
        rows = _int_tensor(out.rows, torch.int64)
        (out_at, out_alive), num_out = _step_attention(out.meta), rows.numel()
    rc = _kernel("decoder_stack", hidden.dtype)(
        states.data_ptr(),
        len(stack.layers),
        pos.data_ptr(),
        slots.data_ptr(),
        ctypes.byref(at),
        None if rows is None else rows.data_ptr(),
        num_out,
        None if out_at is None else ctypes.byref(out_at),
        rope_cache.data_ptr(),
        *(a.data_ptr() for a in _stack_addresses(stack)),
        stack.final_norm.data_ptr(),
        num_tokens,
        hidden_size,
        w0.num_heads,
        w0.num_kv_heads,
        w0.head_dim,
        w0.w2.shape[1],
        w0.k_cache.shape[1],
        float(w0.eps),
        float(w0.scale),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"native decoder_stack failed (status {rc})")
    return states[:num_out]
