"""Every Triton kernel against its torch reference, on the CPU under the Triton interpreter.

The interpreter runs each program instance in numpy, about a thousand times
slower than torch, so the shapes are small but odd: head_dim 24, 5
sequences, GQA groups of 1, 3 and 8, block sizes 4 and 16, context lengths
that end mid-block, rows of 123 columns. Tolerances are per dtype; the
bf16 ones also cover the interpreter rounding fp32 -> bf16 toward zero
where the GPU rounds to nearest even (one bf16 ulp, 2**-8 relative).
What the interpreter lets pass (tl.dot's 16-element minimum, values that
must be compile-time constants) test_kernels_compile_for_h100 catches by
compiling every kernel for sm_90, which needs no GPU.

triton is a dev dependency on Linux, like pytest itself: there these tests
never skip. They skip only where triton cannot be installed.
"""

from __future__ import annotations

import os

# triton.jit picks the interpreter when it decorates a kernel, reading this
# variable then; kernels/ imports its Triton files on first use, and no other
# test module uses them, so setting it here (at collection) is early enough
# even when the whole suite shares one process. test_kernels_are_interpreted
# checks that it took.
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from shardline import kernels  # noqa: E402
from shardline.kernels import quant, reference  # noqa: E402

if not sys.platform.startswith("linux"):
    pytest.importorskip("triton", reason="triton is Linux-only")

ROOT = Path(__file__).resolve().parents[1]

# (atol, rtol) per dtype.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def paged_cache(
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches with shuffled block tables one block wider than needed (padding rows point anywhere)."""
    g = torch.Generator().manual_seed(seed)
    width = max(-(-c // block_size) for c in context_lens) + 1
    num_blocks = len(context_lens) * width + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=g).to(dtype)
    value_cache = torch.randn(shape, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: len(context_lens) * width].view(len(context_lens), width)
    return key_cache, value_cache, tables.to(torch.int32), torch.tensor(context_lens, dtype=torch.int32)


def test_kernels_are_interpreted():
    from shardline.kernels import triton_attention, triton_norm, triton_quant, triton_rotary

    for kernel in (
        triton_attention._paged_decode_kernel,
        triton_attention._paged_prefill_kernel,
        triton_norm._rms_norm_kernel,
        triton_rotary._rotary_kernel,
        triton_quant._dequant_matmul_kernel,
    ):
        assert type(kernel).__name__ == "InterpretedFunction"


# --- paged attention -------------------------------------------------------

DECODE_CASES = [
    # (num_heads, num_kv_heads, head_dim, block_size, context_lens, dtype, partition_size)
    pytest.param(6, 2, 24, 4, [1, 7, 13, 4, 30], torch.float32, None, id="gqa3-d24-bs4"),
    pytest.param(6, 2, 24, 4, [1, 7, 13, 4, 30], torch.float32, 16, id="gqa3-d24-bs4-split"),
    pytest.param(4, 4, 64, 16, [17, 3, 32], torch.float32, None, id="mha-d64-bs16"),
    pytest.param(8, 1, 64, 16, [33, 5, 48], torch.bfloat16, 16, id="one-kv-head-bf16-split"),
    pytest.param(6, 2, 24, 4, [9, 1, 22, 16, 3], torch.float16, None, id="gqa3-fp16"),
    pytest.param(6, 2, 24, 4, [9, 1, 22, 16, 3], torch.bfloat16, None, id="gqa3-bf16"),
]


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, context_lens, dtype, partition", DECODE_CASES)
def test_paged_attention_decode(num_heads, num_kv_heads, head_dim, block_size, context_lens, dtype, partition):
    from shardline.kernels import triton_attention

    key_cache, value_cache, tables, lens = paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype)
    query = torch.randn(len(context_lens), num_heads, head_dim).to(dtype)
    scale = head_dim**-0.5
    out = triton_attention.paged_attention_decode(
        query, key_cache, value_cache, tables, lens, scale, partition_size=partition
    )
    assert_close(out, reference.paged_attention_decode(query, key_cache, value_cache, tables, lens, scale))


def test_decode_ignores_cache_slots_past_the_context():
    """NaN in unused slots (fresh torch.empty memory) must not leak into the output."""
    from shardline.kernels import triton_attention

    context_lens = [5, 14, 2]
    key_cache, value_cache, tables, lens = paged_cache(context_lens, 2, 24, 4, torch.float32)
    query = torch.randn(3, 6, 24)
    expected = reference.paged_attention_decode(query, key_cache, value_cache, tables, lens, 0.2)
    used = torch.zeros(key_cache.shape[:2], dtype=torch.bool)
    for seq, ctx in enumerate(context_lens):
        for pos in range(ctx):
            used[tables[seq, pos // 4], pos % 4] = True
    key_cache[~used] = float("nan")
    value_cache[~used] = float("nan")
    for partition in (None, 8):
        out = triton_attention.paged_attention_decode(
            query, key_cache, value_cache, tables, lens, 0.2, partition_size=partition
        )
        assert_close(out, expected)


def test_decode_through_dispatch_and_noncontiguous_query():
    """The public wrapper with impl="triton", on a query sliced out of a fused qkv projection."""
    key_cache, value_cache, tables, lens = paged_cache([6, 11], 2, 24, 4, torch.float32)
    qkv = torch.randn(2, 6 * 24 + 2 * 2 * 24)
    query = qkv[:, : 6 * 24].view(2, 6, 24)  # rows strided by the whole qkv width
    args = (query, key_cache, value_cache, tables, lens, 24**-0.5)
    assert_close(
        kernels.paged_attention_decode(*args, impl="triton"), kernels.paged_attention_decode(*args, impl="torch")
    )


PREFILL_CASES = [
    # (num_heads, num_kv_heads, head_dim, block_size, [(cached prefix, chunk length)], dtype)
    pytest.param(6, 2, 24, 4, [(0, 7), (5, 3), (12, 1), (3, 18)], torch.float32, id="gqa3-d24-bs4"),
    pytest.param(3, 1, 64, 16, [(17, 5), (0, 20)], torch.float32, id="one-kv-head-d64-bs16"),
    pytest.param(4, 4, 24, 4, [(2, 9), (0, 3)], torch.bfloat16, id="mha-bf16"),
    pytest.param(6, 2, 24, 4, [(4, 6), (0, 17)], torch.float16, id="gqa3-fp16"),
]


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, block_size, chunks, dtype", PREFILL_CASES)
def test_paged_attention_prefill(num_heads, num_kv_heads, head_dim, block_size, chunks, dtype):
    from shardline.kernels import triton_attention

    context_lens = [prefix + n for prefix, n in chunks]
    key_cache, value_cache, tables, lens = paged_cache(context_lens, num_kv_heads, head_dim, block_size, dtype)
    starts = torch.tensor([0] + [n for _, n in chunks]).cumsum(0).to(torch.int32)
    query = torch.randn(int(starts[-1]), num_heads, head_dim).to(dtype)
    args = (query, key_cache, value_cache, tables, starts, lens, head_dim**-0.5)
    assert_close(triton_attention.paged_attention_prefill(*args), reference.paged_attention_prefill(*args))


def test_prefill_through_dispatch():
    key_cache, value_cache, tables, lens = paged_cache([9, 4], 2, 24, 4, torch.float32)
    starts = torch.tensor([0, 3, 7], dtype=torch.int32)
    args = (torch.randn(7, 4, 24), key_cache, value_cache, tables, starts, lens, 0.3)
    assert_close(
        kernels.paged_attention_prefill(*args, impl="triton"), kernels.paged_attention_prefill(*args, impl="torch")
    )


def test_attention_rejects_mismatched_shapes():
    from shardline.kernels import triton_attention

    key_cache, value_cache, tables, lens = paged_cache([5], 2, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        triton_attention.paged_attention_decode(torch.randn(1, 5, 24), key_cache, value_cache, tables, lens, 1.0)
    with pytest.raises(ValueError, match="rows"):
        triton_attention.paged_attention_decode(torch.randn(2, 4, 24), key_cache, value_cache, tables, lens, 1.0)


# --- norms and rotary ------------------------------------------------------

NORM_SHAPES = [(5, 123), (2, 3, 64), (1, 1000)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm(shape, dtype):
    x = torch.randn(shape).to(dtype)
    weight = torch.rand(shape[-1]).add(0.5).to(dtype)
    assert_close(kernels.rms_norm(x, weight, 1e-6, impl="triton"), reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_add_rms_norm(shape, dtype):
    x, residual = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight = torch.rand(shape[-1]).add(0.5).to(dtype)
    before = residual.clone()
    out, new_residual = kernels.fused_add_rms_norm(x, residual, weight, 1e-5, impl="triton")
    expected, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert_close(out, expected)
    assert_close(new_residual, expected_residual)
    assert torch.equal(residual, before), "inputs are not modified"


def test_rms_norm_promotes_to_an_fp32_weight_and_takes_strided_rows():
    x = torch.randn(4, 200)[:, :123].to(torch.bfloat16)  # rows 200 apart
    weight = torch.rand(123) + 0.5
    out = kernels.rms_norm(x, weight, 1e-6, impl="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-6), atol=2e-2, rtol=2e-2)


def rope_cache(head_dim: int, max_positions: int) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos | sin of Llama's frequencies."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(6, 2, 24), (3, 1, 64), (4, 4, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_apply_rotary_emb(num_heads, num_kv_heads, head_dim, dtype):
    tokens = 7
    # q and k are strided views of a fused qkv projection, as in the engine.
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(tokens, num_kv_heads, head_dim)
    positions = torch.tensor([0, 5, 99, 1, 2, 3, 40])
    cache = rope_cache(head_dim, 100)
    q_out, k_out = kernels.apply_rotary_emb(q, k, positions, cache, impl="triton")
    q_ref, k_ref = reference.apply_rotary_emb(q, k, positions, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


# --- quantization: torch helpers -------------------------------------------


def test_int4_packing_layout_and_round_trip():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = quant.pack_int4(q)
    # byte j: input 2j in the low nibble, 2j + 1 in the high one, each as q + 8
    assert packed.tolist() == [[(1 + 8) | ((-2 + 8) << 4), (7 + 8) | ((-8 + 8) << 4)]]
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    assert torch.equal(quant.unpack_int4(quant.pack_int4(every)), every)
    with pytest.raises(ValueError):
        quant.pack_int4(torch.tensor([[8, 0]]))
    with pytest.raises(ValueError):
        quant.pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("bits, group_size", [(8, 96), (8, 32), (4, 32), (4, 96), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_round_trip_error_is_at_most_half_a_step(bits, group_size, dtype):
    weight = (torch.randn(10, 96) * torch.logspace(-3, 1, 10)[:, None]).to(dtype)  # rows of very different scales
    qweight, scales = quant.quantize(weight, group_size, bits)
    assert qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert qweight.shape == (10, 96 if bits == 8 else 48) and scales.shape == (10, 96 // group_size)
    assert scales.dtype == dtype
    error = (quant.dequantize(qweight, scales, group_size, bits) - weight.float()).abs()
    step = scales.float().repeat_interleave(group_size, dim=1)
    assert (error <= step / 2 * (1 + 1e-5)).all()
    ints = quant.unpack_int4(qweight) if bits == 4 else qweight
    assert ints.abs().max() <= quant.QMAX[bits] + (bits == 4)


def test_quantize_all_zero_groups_and_int8_beats_int4():
    weight = torch.randn(4, 64)
    weight[1, :32] = 0
    errors = {}
    for bits in (4, 8):
        qweight, scales = quant.quantize(weight, 32, bits)
        restored = quant.dequantize(qweight, scales, 32, bits)
        assert torch.equal(restored[1, :32], torch.zeros(32))
        errors[bits] = (restored - weight).abs().mean()
    assert errors[8] < errors[4] / 10


def test_dequant_matmul_reference_and_checks():
    weight, x = torch.randn(12, 64), torch.randn(2, 5, 64)
    qweight, scales = quant.quantize(weight, 16, 4)
    out = kernels.dequant_matmul(x, qweight, scales, 16, 4, impl="torch")
    assert out.shape == (2, 5, 12)
    torch.testing.assert_close(out, x @ quant.dequantize(qweight, scales, 16, 4).T)
    # int4 noise is about s / sqrt(12) per weight, s = absmax / 7: roughly 10% of the output's norm
    exact = x @ weight.T
    assert (out - exact).norm() < 0.15 * exact.norm()
    qweight8, scales8 = quant.quantize(weight, 16, 8)
    assert (quant.dequant_matmul(x, qweight8, scales8, 16, 8) - exact).norm() < 0.01 * exact.norm()
    with pytest.raises(ValueError, match="group_size"):
        quant.quantize(weight, 24, 4)  # does not divide 64
    with pytest.raises(ValueError, match="even"):
        quant.quantize(torch.randn(2, 9), 3, 4)
    with pytest.raises(ValueError, match="scales"):
        quant.dequant_matmul(x, qweight, scales[:, :2], 16, 4)
    with pytest.raises(ValueError, match="bits"):
        quant.quantize(weight, 16, 3)


# --- quantization: the Triton matmul ----------------------------------------


@pytest.mark.parametrize(
    "bits, group_size, m, n, k",
    [(4, 32, 1, 40, 128), (4, 64, 3, 17, 192), (8, 16, 1, 40, 64), (8, 128, 5, 33, 128)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant_matmul_triton(bits, group_size, m, n, k, dtype):
    weight = torch.randn(n, k).to(dtype)
    qweight, scales = quant.quantize(weight, group_size, bits)
    x = torch.randn(m, k).to(dtype)
    out = kernels.dequant_matmul(x, qweight, scales, group_size, bits, impl="triton")
    expected = quant.dequant_matmul(x, qweight, scales, group_size, bits)
    # sums of k products: scale the tolerance with the output's magnitude
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected, atol=atol * expected.abs().max().item(), rtol=rtol)


def test_dequant_matmul_triton_batched_input_and_unsupported_group():
    weight = torch.randn(20, 64)
    qweight, scales = quant.quantize(weight, 32, 4)
    x = torch.randn(2, 3, 64)
    out = kernels.dequant_matmul(x, qweight, scales, 32, 4, impl="triton")
    torch.testing.assert_close(out, quant.dequant_matmul(x, qweight, scales, 32, 4), atol=1e-4, rtol=1e-5)
    qweight, scales = quant.quantize(weight, 16, 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.dequant_matmul(x, qweight, scales, 16, 4, impl="triton")


# --- dispatch and the GPU benchmark -----------------------------------------


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.rms_norm(x, torch.ones(8), 1e-6, impl="triton")
    # auto never picks Triton for CPU tensors
    torch.testing.assert_close(kernels.rms_norm(x, torch.ones(8), 1e-6), reference.rms_norm(x, torch.ones(8), 1e-6))


def test_the_triton_override_leaves_kernels_without_triton_on_torch(monkeypatch):
    """SHARDLINE_KERNELS=triton (how benchmarks/kernels_gpu.py times the model) must not break a
    kernel that has no Triton version: on the H200 the model's decode step raised here."""
    from shardline.kernels.dispatch import resolve

    monkeypatch.setenv("SHARDLINE_KERNELS", "triton")
    cuda = torch.device("cuda")  # resolve only reads the device type: no GPU needed
    assert resolve("decoder_stack", "auto", cuda) is reference.decoder_stack
    assert not kernels.stack_supported(cuda, torch.bfloat16, 64, with_prefill=False)
    assert resolve("rms_norm", "auto", cuda).__name__ == "triton_norm.rms_norm"
    with pytest.raises(ValueError, match="no Triton implementation"):
        resolve("decoder_stack", "triton", cuda)


def test_kernels_import_and_run_without_triton():
    """triton is a Linux-only dev dependency: `import shardline.kernels` and the CPU paths must not need it."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\nfrom shardline import kernels\n"
        "x = torch.randn(3, 8)\n"
        "kernels.rms_norm(x, torch.ones(8), 1e-6)\n"
        "assert not any(m.startswith('shardline.kernels.triton') for m in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_gpu_benchmark_cpu_smoke():
    """benchmarks/kernels_gpu.py parses its arguments and checks every kernel on tiny CPU shapes."""
    from benchmarks import kernels_gpu

    with pytest.raises(SystemExit) as exc:
        kernels_gpu.parse_args(["--help"])
    assert exc.value.code == 0
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--cpu-smoke"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "cpu-smoke" and summary["correct"] is True
    assert set(summary["correctness"]) >= {"paged_attention_decode", "paged_attention_prefill", "dequant_matmul_int4"}


def test_kernels_compile_for_h100():
    """Every kernel compiles to a cubin for sm_90 at its GPU tile sizes: what the interpreter cannot check."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels_gpu.py"), "--compile-only", "--compile-dtypes", "bf16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def test_gpu_benchmark_model_step_runs_on_tiny_cpu_shapes():
    """Part 4 of kernels_gpu.py (the model's decode step, torch vs triton kernels) on the CPU under
    the interpreter: the path that crashed on the H200 before any timing."""
    import types

    from benchmarks import kernels_gpu
    shape = dict(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=128
    )

    def once(torch_module, fn, iters):
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    result = kernels_gpu.model_decode_step(
        torch, torch.device("cpu"), types.SimpleNamespace(iters=5), shape=shape, num_seqs=2, context=32, timer=once
    )
    assert result["torch_tokens_per_s"] > 0 and result["triton_tokens_per_s"] > 0
    assert result["hidden_state_max_rel_diff"] < 0.05
    assert "SHARDLINE_KERNELS" not in os.environ


# --- quantization: the GEMV kernel (batches of at most GEMV_MAX_M rows) -----


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counts launches of the GEMV kernel."""
    from shardline.kernels import triton_quant

    calls = []
    gemv = triton_quant._gemv
    monkeypatch.setattr(triton_quant, "_gemv", lambda *a: calls.append(a[0].shape[0]) or gemv(*a))
    return calls


@pytest.mark.parametrize(
    "bits, group_size, m, n, k",
    [
        (4, 32, 1, 40, 192),  # K ends mid-chunk (the interpreter's chunk is 128 inputs)
        (4, 64, 3, 17, 256),  # whole chunks of two groups; N not a multiple of BLOCK_N
        (4, 96, 3, 5, 192),  # a group that is not a power of two: slots of 32 inputs
        (8, 16, 3, 13, 208),  # int8, eight groups a chunk, K ends mid-chunk
        (8, 128, 1, 33, 384),  # int8, one group a chunk
        (4, 32, 4, 8, 1024),  # GEMV_MAX_M rows, eight chunks
    ],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequant_gemv_matches_reference(bits, group_size, m, n, k, dtype, gemv_calls):
    weight = torch.randn(n, k).to(dtype)
    qweight, scales = quant.quantize(weight, group_size, bits)
    x = torch.randn(m, k).to(dtype)
    out = kernels.dequant_matmul(x, qweight, scales, group_size, bits, impl="triton")
    assert gemv_calls == [m]
    expected = quant.dequant_matmul(x, qweight, scales, group_size, bits)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected, atol=atol * expected.abs().max().item(), rtol=rtol)


def test_dequant_gemv_extreme_weights_are_exact():
    """Every int4 (int8) value at every position of a 32-bit word: q * x summed in fp32 must be exact here."""
    from shardline.kernels import triton_quant

    for bits, qmin, qmax in ((4, -8, 7), (8, -128, 127)):
        q = torch.arange(qmin, qmax + 1, dtype=torch.int16).repeat(2)[: 32].view(1, 32)
        q = torch.cat((q, q.flip(1), torch.full_like(q, qmin), torch.full_like(q, qmax))).to(torch.int8)
        qweight = quant.pack_int4(q) if bits == 4 else q
        scales = torch.ones(4, 1)
        x = torch.eye(32)[:3]  # picks single weights: the sums are exact
        out = triton_quant.dequant_matmul(x, qweight, scales, 32, bits)
        assert torch.equal(out, q[:, :3].T.float())


def test_dequant_gemv_dispatch(gemv_calls):
    from shardline.kernels import triton_quant

    weight, x = torch.randn(24, 128), torch.randn(5, 128)
    qweight, scales = quant.quantize(weight, 32, 4)
    expected = quant.dequant_matmul(x, qweight, scales, 32, 4)
    # more than GEMV_MAX_M rows: the tiled kernel
    assert triton_quant.GEMV_MAX_M == 4
    torch.testing.assert_close(triton_quant.dequant_matmul(x, qweight, scales, 32, 4), expected, atol=1e-4, rtol=1e-5)
    assert gemv_calls == []
    # a config for the tiled kernel keeps a single row on it; a GEMV config picks the GEMV kernel
    triton_quant.dequant_matmul(x[:1], qweight, scales, 32, 4, config=(16, 16, 32, 1, 1))
    assert gemv_calls == []
    out = triton_quant.dequant_matmul(x[:2], qweight, scales, 32, 4, gemv_config=(16, 64, 1, 1))
    assert gemv_calls == [2]
    torch.testing.assert_close(out, expected[:2], atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="at most 4 rows"):
        triton_quant.dequant_matmul(x, qweight, scales, 32, 4, gemv_config=(16, 64, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        triton_quant.dequant_matmul(x[:1], qweight, scales, 32, 4, config=(16, 16, 32, 1, 1), gemv_config=(8, 64, 1, 1))
    # a weight that does not start on a 4-byte boundary cannot be read as int32 words: tiled kernel
    storage = torch.empty(qweight.numel() + 1, dtype=torch.uint8)
    shifted = storage[1:].view_as(qweight).copy_(qweight)
    assert shifted.data_ptr() % 4
    out = triton_quant.dequant_matmul(x[:1], shifted, scales, 32, 4)
    assert gemv_calls == [2]
    torch.testing.assert_close(out, expected[:1], atol=1e-4, rtol=1e-5)
