"""Shared fixtures: a small SynthPEDES dataset, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# -- tests against a real vLLM engine (tests/test_vllm_real.py; `make test-vllm` runs them) --------
def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "vllm_real: needs a real vLLM engine (`make test-vllm` runs these in .venv-vllm)")


def pytest_collection_modifyitems(config, items) -> None:
    import importlib.util

    real = [item for item in items if item.get_closest_marker("vllm_real")]
    if real and importlib.util.find_spec("vllm") is None:  # find_spec: no 9-s import just to know
        # one reason for all: -ra (pyproject addopts) folds them into one summary line
        skip = pytest.mark.skip(reason="vLLM is not importable in this venv; `make test-vllm` runs these against "
                                       "a real engine in .venv-vllm")
        for item in real:
            item.add_marker(skip)


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
