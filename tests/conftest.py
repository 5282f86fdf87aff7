"""Shared fixtures: random model folders built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.models import make_model

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
