"""Huge-page tensors for weights and the KV cache (kernels/memory.py)."""

from __future__ import annotations

import torch

from shardline.kernels.memory import hugepage_zeros


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_hugepage_zeros_is_zeroed_and_populate_faults_the_pages_in_now():
    nbytes = 64 << 20
    before = _rss_bytes()
    lazy = hugepage_zeros((nbytes // 2,), torch.bfloat16)
    assert lazy.shape == (nbytes // 2,) and lazy.dtype == torch.bfloat16
    assert _rss_bytes() - before < nbytes // 4  # untouched: not resident yet
    before = _rss_bytes()
    eager = hugepage_zeros((nbytes // 4,), torch.float32, populate=True)
    assert _rss_bytes() - before >= nbytes * 0.9  # every page resident from the start
    assert not eager.any() and not lazy[: 1 << 20].any()
    eager[123] = 1.5
    assert eager.sum().item() == 1.5
