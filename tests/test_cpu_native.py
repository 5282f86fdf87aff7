"""Native CPU kernels (kernels/csrc) against their torch references, on odd shapes."""

from __future__ import annotations

import itertools
import shutil

import pytest
import torch

import kernels
from kernels import cpu_native, reference
from kernels.dispatch import resolve

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
    from engine.model import build_rope_cache

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "num_seqs, first, bias", [(1, True, False), (3, False, True), (4, False, False), (70, False, True)]
)
def test_decode_layer_matches_its_reference(dtype, num_seqs, first, bias):
    """Any batch size: the engine runs every pure decode step through the native stack (70 > a 64-row block)."""
    from engine.model import build_rope_cache

    if not cpu_native.packed_supported(dtype):
        pytest.skip(f"no packed matmul for {dtype} on this machine (the engine decodes layer by layer)")

    g = torch.Generator().manual_seed(6)
    hidden, heads, kv_heads, head_dim, inter, block_size = 48, 6, 2, 8, 40, 4

    def r(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def weights(k_cache, v_cache):
        return reference.DecodeLayerWeights(
            attn_norm=(torch.rand(hidden, generator=g) + 0.5).to(dtype),
            wqkv=r((heads + 2 * kv_heads) * head_dim, hidden),
            bqkv=r((heads + 2 * kv_heads) * head_dim) if bias else None,
            wo=r(hidden, heads * head_dim),
            ffn_norm=(torch.rand(hidden, generator=g) + 0.5).to(dtype),
            w13=r(2 * inter, hidden),
            w2=r(hidden, inter),
            k_cache=k_cache,
            v_cache=v_cache,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            eps=1e-6,
            scale=head_dim**-0.5,
        )

    num_blocks = 4 * num_seqs + 4
    k_cache = r(num_blocks, block_size, kv_heads, head_dim, scale=1.0)
    v_cache = r(num_blocks, block_size, kv_heads, head_dim, scale=1.0)
    w_native = weights(k_cache.clone(), v_cache.clone())
    w_ref = reference.DecodeLayerWeights(**{**w_native.__dict__, "k_cache": k_cache.clone(), "v_cache": v_cache.clone()})
    lens = torch.tensor([5, 9, 1, 13] * num_seqs, dtype=torch.int32)[:num_seqs]
    # Disjoint block tables: no two sequences write the same slot.
    tables = torch.randperm(num_blocks, generator=g)[: 4 * num_seqs].view(num_seqs, 4).to(torch.int32)
    positions = (lens - 1).to(torch.int64)
    slots = (tables[torch.arange(num_seqs), positions // block_size].to(torch.int64) * block_size + positions % block_size)
    x = r(num_seqs, hidden, scale=1.0)
    residual = None if first else r(num_seqs, hidden, scale=1.0)
    rope = build_rope_cache(head_dim, 64, 10000.0, None)
    got = cpu_native.decode_layer(x, residual, positions, slots, tables, lens, rope, w_native)
    expected = reference.decode_layer(x, residual, positions, slots, tables, lens, rope, w_ref)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(got[0], expected[0], **tol)
    torch.testing.assert_close(got[1], expected[1], **tol)
    torch.testing.assert_close(w_native.k_cache, w_ref.k_cache, **tol)  # same K written to the same slots
    torch.testing.assert_close(w_native.v_cache, w_ref.v_cache, **tol)


def test_decode_model_matches_its_reference(model_factory):
    """The whole-stack kernel against the reference composition, on a real (random) model's weights."""
    from engine.weights import build_model

    folder = model_factory(arch="qwen2", num_heads=4, num_kv_heads=2, with_tokenizer=False)
    for dtype, tol in [(torch.float32, dict(atol=1e-4, rtol=1e-4)), (torch.bfloat16, dict(atol=0.1, rtol=0.05))]:
        if not cpu_native.packed_supported(dtype):
            continue  # the engine decodes layer by layer there
        models = []
        for _ in range(2):
            m = build_model(folder, dtype)
            m.setup_kv_cache(32, 4, dtype)
            for layer in m.layers:  # the same cached context in both copies
                g = torch.Generator().manual_seed(7)
                layer.attention.k_cache.copy_(torch.randn(layer.attention.k_cache.shape, generator=g).to(dtype))
                layer.attention.v_cache.copy_(torch.randn(layer.attention.v_cache.shape, generator=g).to(dtype))
            models.append(m)
        ids = torch.tensor([3, 17, 99])
        lens = torch.tensor([6, 11, 3], dtype=torch.int32)
        tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], dtype=torch.int32)
        positions = (lens - 1).long()
        slots = tables[torch.arange(3), positions // 4].long() * 4 + positions % 4
        outs = [
            impl(m.tok_embeddings(ids), positions, slots, tables, lens, m.rope_cache, m.decode_stack())
            for impl, m in zip((cpu_native.decode_model, reference.decode_model), models)
        ]
        torch.testing.assert_close(outs[0], outs[1], **tol)


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
