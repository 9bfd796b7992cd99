"""Shared fixtures: a small SynthPEDES dataset, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from synthpedes.dataset import generate

    root = tmp_path_factory.mktemp("synthpedes")
    generate(root, num_ids=40, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``tiny_models(family) -> Path``: a tiny random model folder, built once per session."""
    from synthpedes.tiny import build_tiny

    built: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("tiny_models")

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny(family, base / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_models) -> Path:
    return tiny_models("qwen2_vl")


@pytest.fixture(scope="session")
def tiny_clip(tiny_models) -> Path:
    return tiny_models("clip")
