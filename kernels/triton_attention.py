"""Paged attention in Triton: decode (one query per sequence) and prefill over a cached prefix.

Both kernels read K and V straight out of the paged cache
([num_blocks, block_size, num_kv_heads, head_dim]) through each sequence's
block table, a tile of TILE tokens at a time, and keep an online softmax
(running max and sum, rescaling the accumulator) so that no score matrix is
ever materialised. Scores live in log2 units (scale * log2(e) folded in) so
that exp2 does the exponentials.

Decode: one program per (sequence, kv head) serves all query heads of that
kv head's GQA group, so each K/V byte is read once. When that leaves the GPU
short of programs (few sequences, long contexts), the context is split into
partitions that run in parallel and a second kernel merges their partial
softmaxes (flash-decoding).

Prefill: one program per (sequence, query head, tile of BLOCK_M queries);
a sequence's queries sit at the last positions of its context, so query i
of a chunk of q_len tokens sees keys 0 .. ctx - q_len + i.

The torch references are `kernels.reference.paged_attention_decode` and
`paged_attention_prefill`; tests/test_kernels.py compares the two.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from shardline.kernels._triton_common import FLOAT_DTYPES, check_launchable, mma, pow2, upcast_dots

LOG2E = 1.4426950408889634

# Tokens of K/V per loop iteration. 64 keeps a [64, 128] bf16 K tile at 16 KiB,
# the usual flash-attention choice; 16 (tl.dot's minimum) in the interpreter,
# where small tiles make the tests cross many tile and page boundaries.
# NOTE: not yet measured on a GPU: benchmarks/kernels_gpu.py sweeps it.
DECODE_TILE_CUDA = 64
PREFILL_BLOCK_CUDA = 64
TILE_CPU = 16
# Split decode contexts until there are this many programs per SM, with
# partitions of at least MIN_PARTITION tokens. Unmeasured; flash-decoding's
# rule of thumb is "enough programs to fill every SM a few times".
PROGRAMS_PER_SM = 4
MIN_PARTITION = 256


@triton.jit
def _paged_decode_kernel(
    # outputs: the attention output, or (SPLIT) each partition's unnormalised
    # accumulator [seqs, heads, parts, head_dim], running max and sum [seqs, heads, parts]
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    # inputs
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    qk_scale,  # softmax scale * log2(e)
    partition_size,  # tokens per partition (>= every context when not SPLIT)
    num_partitions,
    # strides (elements); K and V caches share theirs
    stride_q_seq,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt_seq,
    stride_o_seq,
    stride_o_head,
    # shapes
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    GROUP: tl.constexpr,  # query heads per kv head
    # tiling
    GROUP_PAD: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot's minimum)
    HEAD_DIM_PAD: tl.constexpr,
    TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    group = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head = kv_head * GROUP + group  # [GROUP_PAD]
    head_ok = group < GROUP
    dim_ok = dims < HEAD_DIM

    q_ptrs = query_ptr + seq * stride_q_seq + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptrs, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)  # [GROUP_PAD, HEAD_DIM_PAD]

    context_len = tl.load(context_lens_ptr + seq)
    start = part * partition_size
    end = tl.minimum(start + partition_size, context_len)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    kv_offset = kv_head * stride_cache_head + dims[None, :]
    for tile_start in range(start, end, TILE):
        tokens = tile_start + tl.arange(0, TILE)
        tok_ok = tokens < end
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + tokens // BLOCK_SIZE, mask=tok_ok, other=0)
        row = block.to(tl.int64) * stride_cache_block + (tokens % BLOCK_SIZE) * stride_cache_slot
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(key_cache_ptr + row[:, None] + kv_offset, mask=kv_mask, other=0.0)  # [TILE, HEAD_DIM_PAD]
        v = tl.load(value_cache_ptr + row[:, None] + kv_offset, mask=kv_mask, other=0.0)

        scores = mma(q, tl.trans(k), UPCAST) * qk_scale  # [GROUP_PAD, TILE]
        scores = tl.where(tok_ok[None, :], scores, float("-inf"))
        # The tile's first token is always valid, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    out_mask = head_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        stat = (seq * GROUP * tl.num_programs(1) + head) * num_partitions + part  # [GROUP_PAD]
        tl.store(part_acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
        tl.store(part_max_ptr + stat, m_i, mask=head_ok)
        tl.store(part_sum_ptr + stat, l_i, mask=head_ok)
    else:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + dims[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    # output [num_seqs, num_heads, head_dim]
    out_ptr,
    # partials written by _paged_decode_kernel with SPLIT
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    context_lens_ptr,
    partition_size,
    num_partitions,
    stride_o_seq,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PARTS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    parts = tl.arange(0, PARTS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    # Partitions past the context never ran a tile: leave them out.
    context_len = tl.load(context_lens_ptr + seq)
    part_ok = parts < tl.cdiv(context_len, partition_size)
    stat = (seq * tl.num_programs(1) + head) * num_partitions + parts  # [PARTS_PAD]

    m = tl.load(part_max_ptr + stat, mask=part_ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + stat, mask=part_ok, other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))  # 0 for the left-out partitions
    acc_mask = part_ok[:, None] & (dims[None, :] < HEAD_DIM)
    acc = tl.load(part_acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :], mask=acc_mask, other=0.0)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    o_ptrs = out_ptr + seq * stride_o_seq + head * stride_o_head + dims
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def _check_cache(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if query.dim() != 3 or key_cache.dim() != 4:
        raise ValueError(
            "expected query [tokens, heads, head_dim] and caches [blocks, block_size, kv_heads, head_dim], "
            f"got {tuple(query.shape)} and {tuple(key_cache.shape)}"
        )
    if key_cache.shape != value_cache.shape or key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache must have the same shape and strides")
    if query.dtype not in FLOAT_DTYPES or key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"query and caches must share one float dtype, got {query.dtype} and {key_cache.dtype}")
    num_heads, head_dim = query.shape[1:]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"query heads/head_dim {num_heads}/{head_dim} do not fit cache kv heads/head_dim "
            f"{num_kv_heads}/{key_cache.shape[3]}"
        )
    if query.stride(2) != 1 or key_cache.stride(3) != 1:
        raise ValueError("the head_dim of query and caches must be contiguous")


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_partition_size(num_programs: int, max_context: int, device: torch.device, tile: int) -> int:
    """Tokens per decode partition: the whole context unless the GPU would be short of programs."""
    if device.type != "cuda":
        return max_context
    target = PROGRAMS_PER_SM * _sm_count(device)
    if num_programs >= target or max_context <= MIN_PARTITION:
        return max_context
    size = max(MIN_PARTITION, triton.cdiv(max_context, triton.cdiv(target, num_programs)))
    return triton.cdiv(size, tile) * tile


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    partition_size: int | None = None,
    tile: int | None = None,
) -> torch.Tensor:
    """Triton twin of `reference.paged_attention_decode` (same arguments, same result).

    partition_size, tile: override the heuristics (tests and the GPU benchmark).
    """
    _check_cache(query, key_cache, value_cache)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
            f"must have {num_seqs} rows"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    check_launchable(_paged_decode_kernel, query, key_cache, block_tables, context_lens)
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out

    tile = tile or (DECODE_TILE_CUDA if query.is_cuda else TILE_CPU)
    # An upper bound on every context, known without reading context_lens back from the device.
    max_context = block_tables.shape[1] * block_size
    if partition_size is None:
        partition_size = _decode_partition_size(num_seqs * num_kv_heads, max_context, query.device, tile)
    num_partitions = triton.cdiv(max_context, partition_size)
    split = num_partitions > 1
    if split:
        stats = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32, device=query.device)
        part_max, part_sum = stats, torch.empty_like(stats)
        part_acc = torch.empty(num_seqs, num_heads, num_partitions, head_dim, dtype=torch.float32, device=query.device)
    else:
        part_acc = part_max = part_sum = out  # unused
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_max, part_sum,
        query, key_cache, value_cache, block_tables, context_lens,
        scale * LOG2E, partition_size, num_partitions,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GROUP=group,
        GROUP_PAD=pow2(group, 16), HEAD_DIM_PAD=pow2(head_dim, 16), TILE=tile,
        SPLIT=split, UPCAST=upcast_dots(query.dtype, query.device),
    )  # fmt: skip
    if split:
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, context_lens,
            partition_size, num_partitions,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=pow2(head_dim, 16), PARTS_PAD=pow2(num_partitions),
        )  # fmt: skip
    return out


@triton.jit
def _paged_prefill_kernel(
    # output [num_tokens, num_heads, head_dim]
    out_ptr,
    # inputs
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,  # [num_seqs + 1]
    context_lens_ptr,  # [num_seqs], prefix plus this chunk
    qk_scale,  # softmax scale * log2(e)
    # strides (elements); K and V caches share theirs, out shares query's
    stride_q_token,
    stride_q_head,
    stride_cache_block,
    stride_cache_slot,
    stride_cache_head,
    stride_bt_seq,
    stride_o_token,
    stride_o_head,
    # shapes
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV cache block
    GROUP: tl.constexpr,  # query heads per kv head
    # tiling
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    UPCAST: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    kv_head = head // GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    prefix_len = context_len - q_len

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    q_ptrs = query_ptr + (q_start + rows)[:, None] * stride_q_token + head * stride_q_head + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    q_pos = prefix_len + rows  # [BLOCK_M]

    # Keys up to the last query of this block; none when the block is past the chunk.
    last_row = tl.minimum(q_len, (m_block + 1) * BLOCK_M)
    key_end = (prefix_len + last_row) * (m_block * BLOCK_M < q_len).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    kv_offset = kv_head * stride_cache_head + dims[None, :]
    for tile_start in range(0, key_end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        key_ok = keys < key_end
        block = tl.load(block_tables_ptr + seq * stride_bt_seq + keys // BLOCK_SIZE, mask=key_ok, other=0)
        row = block.to(tl.int64) * stride_cache_block + (keys % BLOCK_SIZE) * stride_cache_slot
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(key_cache_ptr + row[:, None] + kv_offset, mask=kv_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
        v = tl.load(value_cache_ptr + row[:, None] + kv_offset, mask=kv_mask, other=0.0)

        scores = mma(q, tl.trans(k), UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        # Causal: key 0 is visible to every row, so each row's max is finite from the first tile on.
        visible = (keys[None, :] <= q_pos[:, None]) & key_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l_i is 0 only on rows past the chunk
    o_ptrs = out_ptr + (q_start + rows)[:, None] * stride_o_token + head * stride_o_head + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Triton twin of `reference.paged_attention_prefill` (same arguments, same result).

    block: BLOCK_M = BLOCK_N override (tests and the GPU benchmark).
    """
    _check_cache(query, key_cache, value_cache)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = context_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,) or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"query_start_loc {tuple(query_start_loc.shape)} must have {num_seqs + 1} entries and "
            f"block_tables {tuple(block_tables.shape)} {num_seqs} rows"
        )
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    check_launchable(_paged_prefill_kernel, query, key_cache, block_tables, query_start_loc, context_lens)
    out = torch.empty_like(query)
    if num_seqs == 0 or num_tokens == 0:
        return out
    block = block or (PREFILL_BLOCK_CUDA if query.is_cuda else TILE_CPU)
    # One read-back per prefill step sizes the grid; the reference reads far more.
    max_q_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    grid = (num_seqs, num_heads, triton.cdiv(max_q_len, block))
    _paged_prefill_kernel[grid](
        out,
        query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, GROUP=num_heads // num_kv_heads,
        HEAD_DIM_PAD=pow2(head_dim, 16), BLOCK_M=block, BLOCK_N=block,
        UPCAST=upcast_dots(query.dtype, query.device),
    )  # fmt: skip
    return out


__all__ = ["paged_attention_decode", "paged_attention_prefill"]
