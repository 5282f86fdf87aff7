"""Torch reference implementations of every kernel.

These are the numerics the Triton kernels are tested against, and the path
the engine takes on the CPU. Shapes follow the paged KV layout:

    key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables:           [num_seqs, max_blocks_per_seq] int32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardline.kernels.step import AttentionMetadata, LayerWeights, OutputRows, StackWeights, split_attention


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Per-sequence contiguous view of a paged cache.

    Returns [num_seqs, max_blocks_per_seq * block_size, num_kv_heads, head_dim];
    slots past a sequence's length hold whatever the blocks hold and must be masked.
    """
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = cache.shape
    # gathered: [num_seqs, max_blocks, block_size, kv_heads, head_dim]
    gathered = cache[block_tables.long()]
    return gathered.view(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence attending to its whole cached context.

    query: [num_seqs, num_heads, head_dim]; context_lens: [num_seqs] int32,
    the number of cached tokens (the query's own token included).
    Returns [num_seqs, num_heads, head_dim].
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    # k, v: [num_seqs, kv_heads, ctx, head_dim]
    k = gather_kv(key_cache, block_tables).transpose(1, 2)
    v = gather_kv(value_cache, block_tables).transpose(1, 2)
    ctx = k.shape[2]
    # q: [num_seqs, kv_heads, group, head_dim]
    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    # scores: [num_seqs, kv_heads, group, ctx]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    positions = torch.arange(ctx, device=query.device)
    mask = positions[None, :] >= context_lens[:, None].to(positions.dtype)  # [num_seqs, ctx]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float())  # [num_seqs, kv_heads, group, head_dim]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_attention_prefill(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for variable-length query chunks over a cached prefix.

    query: [num_tokens, num_heads, head_dim], sequences packed back to back;
    query_start_loc: [num_seqs + 1] offsets into query; context_lens: [num_seqs]
    tokens in the cache for each sequence after this step's writes (prefix plus
    chunk). A sequence's queries sit at the last positions of its context.
    Returns [num_tokens, num_heads, head_dim].
    """
    num_heads, head_dim = query.shape[1:]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = context_lens.tolist()
    for i, ctx in enumerate(lens):
        q_lo, q_hi = starts[i], starts[i + 1]
        q_len = q_hi - q_lo
        n_blocks = -(-ctx // key_cache.shape[1])
        table = block_tables[i, :n_blocks].long()
        # k, v: [kv_heads, ctx, head_dim]
        k = key_cache[table].flatten(0, 1)[:ctx].transpose(0, 1)
        v = value_cache[table].flatten(0, 1)[:ctx].transpose(0, 1)
        q = query[q_lo:q_hi].transpose(0, 1)  # [heads, q_len, head_dim]
        out[q_lo:q_hi] = causal_attention(q, k, v, scale, ctx - q_len).transpose(0, 1)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, offset: int) -> torch.Tensor:
    """q: [heads, q_len, d]; k, v: [kv_heads, ctx, d]; query i sits at position offset + i.

    Inputs go to SDPA with a batch dimension: on the CPU only 4-D inputs take
    its flash kernel, 3-D ones fall back to the unfused math path.
    """
    q_len, ctx = q.shape[1], k.shape[1]
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if offset == 0:
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)[0]
    # allowed[i, j]: key j is at or before query i's position
    allowed = torch.arange(ctx, device=q.device)[None, :] <= (torch.arange(q_len, device=q.device)[:, None] + offset)
    return F.scaled_dot_product_attention(q4, k4, v4, attn_mask=allowed, scale=scale, enable_gqa=True)[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, scaled by `weight` in the input dtype (Llama's numerics)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x, then RMSNorm of the sum. Returns (normed, new residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_emb(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the half-split (GPT-NeoX / Llama HF) layout.

    q: [tokens, heads, head_dim]; k: [tokens, kv_heads, head_dim];
    cos_sin_cache: [max_positions, head_dim] fp32, cos in the first half of
    the last dim and sin in the second.
    """
    cos, sin = cos_sin_cache[positions].to(q.dtype).chunk(2, dim=-1)
    # cos, sin: [tokens, 1, head_dim] after repeating each half
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias."""
    return F.linear(x, weight, bias)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation over a fused gate/up projection: x [..., 2 * d] -> [..., d]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def linear_silu_and_mul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu_and_mul(x @ weight.T) for a fused gate/up weight [2 * d, K]: x [..., K] -> [..., d]."""
    return silu_and_mul(linear(x, weight))


_BITS = torch.arange(32, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Constrained decoding's mask, in place: logits[rows[k], t] = -inf wherever bit t of bitmask[k]
    ([K, ceil(vocab / 32)] int32, token t at bit t % 32 of word t // 32) is clear."""
    vocab = logits.shape[1]
    allowed = ((bitmask.unsqueeze(-1) >> _BITS.to(bitmask.device)) & 1).view(bitmask.shape[0], -1).bool()
    if allowed.shape[1] < vocab:  # tokens past the mask are not allowed
        allowed = F.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    sub = logits[rows]
    logits[rows] = sub.masked_fill(~allowed[:, :vocab], float("-inf"))


def write_kv_cache(
    key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store each token's K and V ([tokens, kv_heads, head_dim]) at its flat slot of the paged caches."""
    num_kv_heads, head_dim = key_cache.shape[2:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def decoder_layer(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    rope_cache: torch.Tensor,
    w: LayerWeights,
    out: OutputRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One whole decoder layer for a packed step (decodes first, then prefill chunks), built from the kernels above.

    hidden: [num_tokens, hidden] (the previous layer's output); residual: the
    residual stream, or None before the first layer. Writes this step's K/V
    into the caches. Returns (this layer's output, the residual stream), for
    the rows of `out` only when given (the last layer).
    """
    num_tokens = hidden.shape[0]
    if residual is None:
        normed, residual = rms_norm(hidden, w.attn_norm, w.eps), hidden
    else:
        normed, residual = fused_add_rms_norm(hidden, residual, w.attn_norm, w.eps)
    q_size, kv_size = w.num_heads * w.head_dim, w.num_kv_heads * w.head_dim
    q, k, v = linear(normed, w.wqkv, w.bqkv).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, w.num_heads, w.head_dim)
    k = k.view(num_tokens, w.num_kv_heads, w.head_dim)
    v = v.view(num_tokens, w.num_kv_heads, w.head_dim)
    q, k = apply_rotary_emb(q, k, positions, rope_cache)
    write_kv_cache(k, v, w.k_cache, w.v_cache, meta.slot_mapping)
    if out is not None:
        q, residual, meta, num_tokens = q[out.rows], residual[out.rows], out.meta, out.rows.numel()
    attn = split_attention(paged_attention_decode, paged_attention_prefill, q, w.k_cache, w.v_cache, meta, w.scale)
    hidden = linear(attn.view(num_tokens, q_size), w.wo)
    normed, residual = fused_add_rms_norm(hidden, residual, w.ffn_norm, w.eps)
    return linear(linear_silu_and_mul(normed, w.w13), w.w2), residual


def decoder_stack(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    rope_cache: torch.Tensor,
    stack: StackWeights,
    out: OutputRows | None = None,
) -> torch.Tensor:
    """Every decoder layer of a step, then the final norm: embeddings in, normed hidden states out
    (every row's, or `out`'s rows only)."""
    residual = None
    last = len(stack.layers) - 1
    for i, w in enumerate(stack.layers):
        hidden, residual = decoder_layer(hidden, residual, positions, meta, rope_cache, w, out if i == last else None)
    return fused_add_rms_norm(hidden, residual, stack.final_norm, stack.layers[0].eps)[0]
