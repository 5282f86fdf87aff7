"""What the whole-step kernels take: the packed batch's attention metadata and the model's weights.

Plain dataclasses, shared by the engine (which builds them), the torch
references and the native CPU kernels (which read them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class AttentionMetadata:
    """How the packed tokens of one step map onto sequences and cache slots."""

    # [num_tokens] int64: flat cache slot (block_id * block_size + offset) of each token.
    slot_mapping: torch.Tensor
    # Decode tokens come first, one per sequence.
    num_decode_tokens: int
    # [num_decodes, max_blocks] int32 and [num_decodes] int32 (context incl. the new token).
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    # [num_prefills, max_blocks] int32; [num_prefills + 1] offsets within the prefill
    # tokens; [num_prefills] cached tokens after this step's writes.
    prefill_block_tables: torch.Tensor
    prefill_query_start_loc: torch.Tensor
    prefill_context_lens: torch.Tensor


@dataclass
class OutputRows:
    """The rows of a step whose final hidden states are read (the ones that sample), and how they attend.

    Every row's K and V must reach the cache, but only these rows' outputs are
    used: the last layer writes every row's K/V, then runs attention, the output
    projection and the MLP for these rows alone. For a prefill chunk that is its
    last row (none for a chunk that ends short of its prompt): SmolLM2's 30
    layers, a 128-token prefill pass 71.2 -> 69.3 ms (bf16, medians of five
    alternating runs of 20).
    """

    # [m] int64, ascending: indices into the step's packed rows.
    rows: torch.Tensor
    # These rows as a step of their own, K/V already written: the kept decodes,
    # then each kept prefill row as a one-query chunk over its sequence's blocks.
    meta: AttentionMetadata


def select_rows(meta: AttentionMetadata, rows: torch.Tensor) -> OutputRows:
    """`OutputRows` for `rows` (ascending) of the step `meta` describes.

    A prefill row at position p attends to keys 0..p whether it is queried with
    its chunk or alone, as a chunk of one with context p + 1: the same result up
    to the attention's rounding (alone, it may take the row-at-a-time kernel
    where its tile took the transposed one).
    """
    rows = rows.to(torch.int64)
    nd = meta.num_decode_tokens
    decodes = rows[rows < nd]
    prefill_rows = rows[rows >= nd] - nd  # offsets within the prefill tokens
    starts = meta.prefill_query_start_loc.to(torch.int64)
    chunk = torch.searchsorted(starts[1:], prefill_rows, right=True)
    # context of the row = its chunk's context less the chunk's rows after it
    context = meta.prefill_context_lens.to(torch.int64)[chunk] - (starts[chunk + 1] - 1 - prefill_rows)
    kept = AttentionMetadata(
        slot_mapping=meta.slot_mapping[rows],
        num_decode_tokens=decodes.numel(),
        decode_block_tables=meta.decode_block_tables[decodes],
        decode_context_lens=meta.decode_context_lens[decodes],
        prefill_block_tables=meta.prefill_block_tables[chunk],
        prefill_query_start_loc=torch.arange(prefill_rows.numel() + 1, dtype=torch.int32),
        prefill_context_lens=context.to(torch.int32),
    )
    return OutputRows(rows=rows, meta=kept)


def split_attention(
    decode: Callable[..., torch.Tensor],
    prefill: Callable[..., torch.Tensor],
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """A packed step's attention: `decode` over the leading decode rows, `prefill` over the chunks after them.

    q: [num_tokens, num_heads, head_dim]; the two callables take the arguments of
    paged_attention_decode and paged_attention_prefill.
    """
    nd = meta.num_decode_tokens
    if nd == q.shape[0]:
        return decode(q, key_cache, value_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode(q[:nd], key_cache, value_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    out[nd:] = prefill(
        q[nd:],
        key_cache,
        value_cache,
        meta.prefill_block_tables,
        meta.prefill_query_start_loc,
        meta.prefill_context_lens,
        scale,
    )
    return out


@dataclass
class LayerWeights:
    """Everything one decoder layer reads in a step (weights as stored, caches in place)."""

    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    ffn_norm: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float


@dataclass
class StackWeights:
    """Every layer's LayerWeights plus the final norm: a whole model for `decoder_stack`."""

    layers: list[LayerWeights]
    final_norm: torch.Tensor
    # Whatever a faster implementation precomputes once (the native one: arrays of addresses).
    prepared: object = None
