"""`python -m bench.gpu` is known to start: one clean line without CUDA, and every section runs
at toy shapes on the CPU (--cpu-smoke). The GPU figures themselves come from a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_without_cuda_one_line_and_exit_0():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout


@pytest.mark.slow
def test_cpu_smoke_runs_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--cpu-smoke", "--work", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "smoke" / "results-gpu-smoke.json").read_text())
    assert set(res["sections"]) == {"sft", "tloc", "thi", "metrics"}
    for name, sec in res["sections"].items():
        assert "error" not in sec, (name, sec)
    assert all("error" not in r and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in res["sections"]["sft"]["rows"])
    assert all(r["requests_per_s"] > 0 for r in res["sections"]["tloc"]["rows"])
    assert res["sections"]["thi"]["calls"]["loc"] > 0 and res["sections"]["metrics"]["mining"]["seconds"] >= 0
    assert not (REPO / "bench" / "RESULTS-gpu.md").exists() or "cpu-smoke" not in (REPO / "bench" / "RESULTS-gpu.md").read_text()
