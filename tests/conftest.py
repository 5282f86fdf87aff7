"""Shared fixtures: random model folders built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

# The suite imports `tests.*` and `benchmarks.*` from the repository root. The root goes last on
# sys.path, after site-packages: its top-level folders (kernels/, engine/, ...) must never shadow an
# installed package of the same name (Hugging Face's `kernels`, which transformers imports).
# pytest runs with --import-mode=importlib, which puts nothing on sys.path itself.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.models import make_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A small random Llama with GQA and a trained byte-level BPE tokenizer."""
    return make_model(tmp_path_factory.mktemp("llama-gqa"))


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Build (and cache per argument set) random model folders."""
    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            cache[key] = make_model(tmp_path_factory.mktemp("model"), **kwargs)
        return cache[key]

    return make
