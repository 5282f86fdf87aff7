"""Native CPU kernels (kernels/csrc) against their torch references, on odd shapes."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

from shardline import kernels
from shardline.kernels import cpu_native, reference
from shardline.kernels.dispatch import resolve

# Without a C compiler the native kernels cannot exist; with one, a failed build is a failure.
pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine"
)


def test_native_kernels_build():
    assert cpu_native.available(), cpu_native.build_error()

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def paged_case(num_seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 80
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=g).to(dtype)
    lens = torch.randint(1, 9 * block_size, (num_seqs,), generator=g, dtype=torch.int32)
    width = int((lens.max() + block_size - 1) // block_size) + 2  # padded table, junk past the end
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in range(num_seqs)]).to(torch.int32)
    return q, k, v, tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_seqs, num_heads, num_kv_heads, head_dim, block_size",
    [
        (1, 4, 4, 64, 16),
        (5, 6, 2, 24, 4),
        (3, 9, 3, 64, 16),
        (7, 4, 1, 32, 8),
        (2, 12, 4, 128, 16),
        # Whole sequences per task, query groups wider than the register tile, odd block sizes.
        (9, 16, 2, 64, 16),
        (6, 8, 1, 128, 8),
        (5, 14, 2, 64, 5),
    ],
)
def test_paged_decode_matches_reference(dtype, num_seqs, num_heads, num_kv_heads, head_dim, block_size):
    q, k, v, tables, lens = paged_case(num_seqs, num_heads, num_kv_heads, head_dim, block_size, dtype)
    scale = head_dim**-0.5
    expected = reference.paged_attention_decode(q, k, v, tables, lens, scale)
    got = cpu_native.paged_attention_decode(q, k, v, tables, lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 123), (37, 576), (3, 2, 48)])
def test_rms_norm_and_fused_add(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g).to(dtype)
    res = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    torch.testing.assert_close(cpu_native.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **TOL[dtype])
    got_out, got_res = cpu_native.fused_add_rms_norm(x, res, w, 1e-5)
    exp_out, exp_res = reference.fused_add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(got_res, exp_res, atol=0, rtol=0)  # one rounding, same as torch
    torch.testing.assert_close(got_out, exp_out, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_tokens, num_heads, num_kv_heads, head_dim", [(1, 4, 2, 64), (19, 6, 1, 24), (40, 9, 3, 64), (33, 8, 1, 128), (5, 3, 1, 96)]
)
def test_rotary_matches_reference_on_strided_views(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    """Bit for bit: the vector path (half a head in whole 16-lane vectors) and the scalar one (24) round as torch does."""
    g = torch.Generator().manual_seed(2)
    # q and k as views into a fused qkv row, as the model produces them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(num_tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    from shardline.engine.model import build_rope_cache

    cache = build_rope_cache(head_dim, 512, 10000.0, None)
    positions = torch.randint(0, 512, (num_tokens,), generator=g)
    got_q, got_k = cpu_native.apply_rotary_emb(q, k, positions, cache)
    exp_q, exp_k = reference.apply_rotary_emb(q, k, positions, cache)
    torch.testing.assert_close(got_q, exp_q, atol=0, rtol=0)
    torch.testing.assert_close(got_k, exp_k, atol=0, rtol=0)


def test_dispatch_picks_native_on_cpu_and_honours_the_override(monkeypatch):
    assert resolve("paged_attention_decode", "auto", torch.device("cpu")) is cpu_native.paged_attention_decode
    monkeypatch.setenv("SHARDLINE_KERNELS", "torch")
    assert resolve("paged_attention_decode", "auto", torch.device("cpu")) is reference.paged_attention_decode
    # a kernel without a native version falls back to its reference
    assert resolve("dequant_matmul", "native", torch.device("cpu")) is kernels.quant.dequant_matmul
    q, k, v, tables, lens = paged_case(2, 4, 2, 16, 4, torch.float32)
    torch.testing.assert_close(
        kernels.paged_attention_decode(q, k, v, tables, lens, 0.25, impl="native"),
        kernels.paged_attention_decode(q, k, v, tables, lens, 0.25, impl="torch"),
        **TOL[torch.float32],
    )


def test_bad_inputs_are_refused():
    q, k, v, tables, lens = paged_case(2, 4, 2, 16, 4, torch.float32)
    with pytest.raises(ValueError):
        cpu_native.paged_attention_decode(q.half(), k.half(), v.half(), tables, lens, 0.25)
    with pytest.raises(ValueError):
        cpu_native.paged_attention_decode(q, k.bfloat16(), v, tables, lens, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 64), (7, 2 * 100), (3, 5, 2 * 48)])
def test_silu_and_mul(dtype, shape):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    torch.testing.assert_close(cpu_native.silu_and_mul(x), reference.silu_and_mul(x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 100, 300])  # a decode row, remainders, one block split in rows, two blocks
@pytest.mark.parametrize("d", [128, 192, 100])  # the split on a panel boundary (fused; 3 panels: odd), off one
def test_linear_silu_and_mul_equals_the_two_steps(dtype, rows, d):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = (torch.randn(2 * d, 96, generator=g) / 4).to(dtype)
    got = cpu_native.linear_silu_and_mul(x, w)
    two_steps = cpu_native.silu_and_mul(cpu_native.linear(x, w))
    assert got.shape == (rows, d) and got.dtype == dtype
    # the fused pass rounds gate and up through the storage dtype as the stored product is: the same bits
    assert torch.equal(got, two_steps)
    expected = reference.silu_and_mul(torch.nn.functional.linear(x.float(), w.float())).to(dtype)
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_from_strided_views(dtype):
    g = torch.Generator().manual_seed(4)
    num_tokens, kv_heads, head_dim = 9, 3, 16
    qkv = torch.randn(num_tokens, (4 + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    k = qkv[:, 4 * head_dim : (4 + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (4 + kv_heads) * head_dim :].view(num_tokens, kv_heads, head_dim)
    slots = torch.randperm(40, generator=g)[:num_tokens]
    caches = [torch.zeros(10, 4, kv_heads, head_dim, dtype=dtype) for _ in range(4)]
    cpu_native.write_kv_cache(k, v, caches[0], caches[1], slots)
    reference.write_kv_cache(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].abs().sum() > 0


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("out_features, in_features", [(37, 50), (128, 64), (1280, 768)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_linear_matches_fp32_within_bf16_rounding(rows, out_features, in_features, with_bias):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    w = torch.randn(out_features, in_features, generator=g).bfloat16()
    b = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
    exact = torch.nn.functional.linear(x.float(), w.float(), b.float() if b is not None else None)
    got = cpu_native.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    # fp32 accumulation, one final rounding: within one bf16 ulp of the exact result
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 6, 7, 13, 100, 300])  # remainders; 3 panels over 2 threads: rows split; 2 blocks
def test_linear_any_rows_matches_torch(dtype, rows):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = torch.randn(130, 96, generator=g).to(dtype)
    b = torch.randn(130, generator=g).to(dtype)
    exact = torch.nn.functional.linear(x.float(), w.float(), b.float())
    got = cpu_native.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, 130)
    torch.testing.assert_close(got.float(), exact, **TOL[dtype])


def test_linear_beyond_small_m_matches_torch():
    x = torch.randn(2, 3, 16)
    w = torch.randn(8, 16)
    torch.testing.assert_close(cpu_native.linear(x, w), torch.nn.functional.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    torch.testing.assert_close(cpu_native.linear(xb, wb).float(), torch.nn.functional.linear(xb, wb).float(), atol=0.1, rtol=0.02)


def packed_step(tables, decode_lens, chunks, block_size):
    """Positions and AttentionMetadata of a step packed as the engine packs it: one token for each
    context length in decode_lens (sequences 0..), then a (cached prefix, new tokens) chunk per
    prefill (the next sequences); `tables` holds every sequence's blocks in that order."""
    nd = len(decode_lens)
    positions = torch.cat(
        [torch.tensor(decode_lens, dtype=torch.int64) - 1] + [torch.arange(p, p + n) for p, n in chunks]
    )
    seq = torch.cat([torch.arange(nd)] + [torch.full((n,), nd + i) for i, (_, n) in enumerate(chunks)])
    meta = kernels.AttentionMetadata(
        slot_mapping=tables[seq, positions // block_size].to(torch.int64) * block_size + positions % block_size,
        num_decode_tokens=nd,
        decode_block_tables=tables[:nd],
        decode_context_lens=torch.tensor(decode_lens, dtype=torch.int32),
        prefill_block_tables=tables[nd:],
        prefill_query_start_loc=torch.tensor([0] + list(itertools.accumulate(n for _, n in chunks)), dtype=torch.int32),
        prefill_context_lens=torch.tensor([p + n for p, n in chunks], dtype=torch.int32),
    )
    return positions, meta


def stack_case(dtype, head_dim, bias, decode_lens, chunks, num_layers=2, seed=6):
    """Random weights for a small stack, its caches, and a packed step: one token for each
    context length in decode_lens, then a (cached prefix, new tokens) chunk per prefill.
    Returns (native stack, reference stack (own caches), hidden, positions, meta, rope)."""
    from shardline.engine.model import build_rope_cache

    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, inter, block_size = 48, 6, 2, 40, 4

    def r(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    lens = list(decode_lens) + [p + n for p, n in chunks]
    max_blocks = max(-(-n // block_size) for n in lens)
    num_blocks = max_blocks * len(lens) + 4
    # Disjoint block tables: no two sequences write the same slot.
    tables = torch.randperm(num_blocks, generator=g)[: max_blocks * len(lens)].view(len(lens), max_blocks).to(torch.int32)
    positions, meta = packed_step(tables, decode_lens, chunks, block_size)
    layers = []
    for _ in range(num_layers):
        cache = r(num_blocks, block_size, kv_heads, head_dim, scale=1.0), r(num_blocks, block_size, kv_heads, head_dim, scale=1.0)
        layers.append(
            kernels.LayerWeights(
                attn_norm=(torch.rand(hidden, generator=g) + 0.5).to(dtype),
                wqkv=r((heads + 2 * kv_heads) * head_dim, hidden),
                bqkv=r((heads + 2 * kv_heads) * head_dim) if bias else None,
                wo=r(hidden, heads * head_dim),
                ffn_norm=(torch.rand(hidden, generator=g) + 0.5).to(dtype),
                w13=r(2 * inter, hidden),
                w2=r(hidden, inter),
                k_cache=cache[0],
                v_cache=cache[1],
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                eps=1e-6,
                scale=head_dim**-0.5,
            )
        )
    final_norm = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    native = kernels.StackWeights(layers=layers, final_norm=final_norm)
    ref_layers = [kernels.LayerWeights(**{**w.__dict__, "k_cache": w.k_cache.clone(), "v_cache": w.v_cache.clone()}) for w in layers]
    ref = kernels.StackWeights(layers=ref_layers, final_norm=final_norm)
    rope = build_rope_cache(head_dim, 256, 10000.0, None)
    return native, ref, r(len(positions), hidden, scale=1.0), positions, meta, rope


def reference_tolerance(dtype):
    """How far the native stack may be from the torch reference (bf16 through two layers: the
    native attention rounds P to bf16 for its P @ V)."""
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)


def assert_stacks_agree(dtype, native, ref, x, positions, meta, rope):
    got = cpu_native.decoder_stack(x, positions, meta, rope, native)
    expected = reference.decoder_stack(x, positions, meta, rope, ref)
    tol = reference_tolerance(dtype)
    torch.testing.assert_close(got, expected, **tol)
    for w_native, w_ref in zip(native.layers, ref.layers):  # the same K/V written to the same slots
        torch.testing.assert_close(w_native.k_cache, w_ref.k_cache, **tol)
        torch.testing.assert_close(w_native.v_cache, w_ref.v_cache, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_seqs, bias", [(1, False), (3, True), (4, False), (70, True)])
def test_decoder_stack_decodes_match_the_reference(dtype, num_seqs, bias):
    """Any batch size: the engine runs every pure decode step through the native stack (70 > a
    64-row block); head_dim 8 takes the generic decode attention."""
    if not cpu_native.packed_supported(dtype):
        pytest.skip(f"no packed matmul for {dtype} on this machine (the engine runs layer by layer)")
    case = stack_case(dtype, 8, bias, decode_lens=([5, 9, 1, 13] * num_seqs)[:num_seqs], chunks=[])
    assert_stacks_agree(dtype, *case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "head_dim, decode_lens, chunks",
    [
        (64, [], [(0, 37)]),  # one fresh prompt
        (64, [], [(0, 20), (9, 16), (0, 3)]),  # prompts and a chunk after a cached prefix
        (64, [7, 1, 30], [(0, 17), (12, 40)]),  # decodes riding in a prefill pass
        (128, [5], [(4, 70)]),
    ],
)
def test_decoder_stack_with_prefill_matches_the_reference(dtype, head_dim, decode_lens, chunks):
    """Prefill passes and mixed steps: decode rows first, then prefill chunks, as the engine packs them."""
    if not cpu_native.stack_supported(dtype, head_dim, with_prefill=True):
        pytest.skip(f"no native stack for {dtype} prefill on this machine")
    assert_stacks_agree(dtype, *stack_case(dtype, head_dim, True, decode_lens, chunks))


def test_select_rows_queries_each_kept_prefill_row_alone():
    """The last layer's rows as a step of their own: kept decodes stay decodes; a kept prefill
    row is a one-query chunk over its sequence's blocks, with its own position's context."""
    tables = torch.arange(20, dtype=torch.int32).view(5, 4)
    # rows 0-2: decodes (contexts 6, 11, 3); 3-6: a fresh prompt (positions 0-3); 7-9: positions 5-7
    _, meta = packed_step(tables, [6, 11, 3], [(0, 4), (5, 3)], 4)
    out = kernels.select_rows(meta, torch.tensor([0, 2, 6, 9]))
    m = out.meta
    assert out.rows.tolist() == [0, 2, 6, 9] and m.num_decode_tokens == 2
    assert torch.equal(m.decode_block_tables, tables[[0, 2]]) and m.decode_context_lens.tolist() == [6, 3]
    assert torch.equal(m.prefill_block_tables, tables[[3, 4]])
    assert m.prefill_query_start_loc.tolist() == [0, 1, 2] and m.prefill_context_lens.tolist() == [4, 8]
    assert torch.equal(m.slot_mapping, meta.slot_mapping[[0, 2, 6, 9]])
    assert kernels.select_rows(meta, torch.tensor([4])).meta.prefill_context_lens.tolist() == [2]  # position 1
    none = kernels.select_rows(meta, torch.tensor([], dtype=torch.int64)).meta
    assert none.num_decode_tokens == 0 and none.prefill_query_start_loc.tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "head_dim, decode_lens, chunks, rows",
    [
        (64, [], [(0, 37)], [36]),  # a prompt's last row
        (64, [7, 1, 30], [(0, 17), (12, 40)], [0, 1, 2, 19, 59]),  # decodes and the chunks' ends
        (64, [], [(0, 20), (9, 16), (0, 3)], [5, 19, 35]),  # any rows, a full tile's last among them
        (128, [5], [(4, 70)], [0, 70]),
        (8, [5, 9, 1, 13], [], [1, 3]),  # a decode step's subset
        (64, [], [(0, 20)], []),  # none read: a chunk that ends short of its prompt
    ],
)
def test_decoder_stack_runs_the_last_layer_for_the_rows_read(dtype, head_dim, decode_lens, chunks, rows):
    """With OutputRows the stack returns those rows' final states: the full step's rows (within
    the attention's rounding: a row queried alone may take the row-at-a-time kernel where its
    tile took the transposed one) and the reference's; every row's K/V is written as before."""
    if not cpu_native.stack_supported(dtype, head_dim, with_prefill=bool(chunks)):
        pytest.skip(f"no native stack for {dtype} here")
    native, ref, x, positions, meta, rope = stack_case(dtype, head_dim, True, decode_lens, chunks)
    before = [(w.k_cache.clone(), w.v_cache.clone()) for w in native.layers]
    full = cpu_native.decoder_stack(x, positions, meta, rope, native)
    full_caches = [(w.k_cache.clone(), w.v_cache.clone()) for w in native.layers]
    for w, (k, v) in zip(native.layers, before):
        w.k_cache.copy_(k)
        w.v_cache.copy_(v)
    out = kernels.select_rows(meta, torch.tensor(rows, dtype=torch.int64))
    got = cpu_native.decoder_stack(x, positions, meta, rope, native, out)
    assert got.shape == (len(rows), x.shape[1])
    for w, (k, v) in zip(native.layers, full_caches):
        assert torch.equal(w.k_cache, k) and torch.equal(w.v_cache, v)
    tight = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(got, full[out.rows], **tight)
    expected = reference.decoder_stack(x, positions, meta, rope, ref, out)
    torch.testing.assert_close(got, expected, **reference_tolerance(dtype))


def test_the_native_stack_declines_prefill_it_has_no_attention_for():
    """A prefill row of head_dim 8 has no native attention: stack_supported says so, and the
    kernel answers status 2 rather than a wrong result."""
    assert not cpu_native.stack_supported(torch.float32, 8, with_prefill=True)
    if not cpu_native.packed_supported(torch.float32):
        pytest.skip("no packed matmul on this machine")
    assert cpu_native.stack_supported(torch.float32, 8, with_prefill=False)
    native, _, x, positions, meta, rope = stack_case(torch.float32, 8, False, [3], [(0, 5)])
    with pytest.raises(RuntimeError, match="status 2"):
        cpu_native.decoder_stack(x, positions, meta, rope, native)


def test_decoder_stack_is_the_modular_forward_bit_for_bit(model_factory):
    """On a real (random) model's weights, a step of three decodes and two prefill chunks through
    the whole-stack kernel equals the layer-by-layer forward over the same native kernels exactly
    (the same calls, the same rounding points), and the torch reference within rounding."""
    from shardline.engine.weights import build_model

    folder = model_factory(arch="qwen2", hidden_size=256, num_heads=4, num_kv_heads=2, with_tokenizer=False)  # head_dim 64
    for dtype in (torch.float32, torch.bfloat16):
        if not cpu_native.stack_supported(dtype, 64, with_prefill=True):
            continue  # the engine runs layer by layer there
        models = []
        for _ in range(3):
            m = build_model(folder, dtype)
            m.setup_kv_cache(32, 4, dtype)
            for layer in m.layers:  # the same cached context in every copy
                g = torch.Generator().manual_seed(7)
                layer.attention.k_cache.copy_(torch.randn(layer.attention.k_cache.shape, generator=g).to(dtype))
                layer.attention.v_cache.copy_(torch.randn(layer.attention.v_cache.shape, generator=g).to(dtype))
            models.append(m)
        native, modular, ref = models
        modular.fused_stack = False
        ids = torch.tensor([3, 17, 99, 5, 6, 7, 8, 9, 10, 11])
        # three decodes (contexts 6, 11, 3), then a fresh 4-token prompt and 3 tokens after 5 cached
        positions, meta = packed_step(torch.arange(20, dtype=torch.int32).view(5, 4), [6, 11, 3], [(0, 4), (5, 3)], 4)
        assert native.runs_natively(with_prefill=True) and not modular.runs_natively(with_prefill=True)
        with torch.inference_mode():
            got, layered = native(ids, positions, meta), modular(ids, positions, meta)
            expected = reference.decoder_stack(ref.tok_embeddings(ids), positions, meta, ref.rope_cache, ref.stack_weights())
        assert torch.equal(got, layered)
        for a, b in zip(native.layers, modular.layers):
            assert torch.equal(a.attention.k_cache, b.attention.k_cache)
        torch.testing.assert_close(got, expected, **reference_tolerance(dtype))
        # the rows that sample (decodes, the chunks' ends): the last layer runs for them alone
        out = kernels.select_rows(meta, torch.tensor([0, 1, 2, 6, 9]))
        with torch.inference_mode():
            got, layered = native(ids, positions, meta, out), modular(ids, positions, meta, out)
        assert got.shape == (5, 256) and torch.equal(got, layered)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, block_size, chunks",
    [
        # (cached prefix, new queries) per sequence
        (4, 4, 64, 16, [(0, 1), (0, 37), (5, 16)]),
        (12, 4, 64, 16, [(0, 70), (40, 33), (16, 1)]),
        (8, 1, 128, 8, [(3, 20), (0, 17)]),
        (14, 2, 64, 5, [(11, 29)]),
        (6, 2, 32, 4, [(4, 9), (0, 5)]),  # head_dim 32: the reference runs
    ],
)
def test_paged_prefill_matches_reference(dtype, num_heads, num_kv_heads, head_dim, block_size, chunks):
    g = torch.Generator().manual_seed(3)
    num_blocks = 64
    k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    lens = torch.tensor([p + n for p, n in chunks], dtype=torch.int32)
    starts = torch.tensor([0] + list(itertools.accumulate(n for _, n in chunks)), dtype=torch.int32)
    q = torch.randn(int(starts[-1]), num_heads, head_dim, generator=g).to(dtype)
    width = int((lens.max() + block_size - 1) // block_size) + 1
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:width] for _ in chunks]).to(torch.int32)
    scale = head_dim**-0.5
    expected = reference.paged_attention_prefill(q, k, v, tables, starts, lens, scale)
    got = cpu_native.paged_attention_prefill(q, k, v, tables, starts, lens, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])
