"""Shared fixtures: a small SynthPEDES dataset, generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from data_builders.synthetic import generate

    root = tmp_path_factory.mktemp("synthpedes")
    generate(root, num_ids=40, seed=0, progress=False)
    return root
