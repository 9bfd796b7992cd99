"""Each bench entry starts (smoke sizes), and the runner writes what it should, where it should."""

from __future__ import annotations

import importlib
import json

import pytest

import bench
from bench import __main__ as runner


@pytest.mark.parametrize("name", bench.discover())
def test_bench_entry_starts(name):
    res = importlib.import_module(f"bench.bench_{name}").run(smoke=True)
    assert isinstance(res["title"], str) and res["title"]
    assert isinstance(res["markdown"], str) and "|" in res["markdown"]
    assert isinstance(res["figures"], dict) and res["figures"]


def test_metrics_bench_is_discovered():
    assert "metrics" in bench.discover()


def _fake(name, smoke):
    return {"title": f"T-{name}", "markdown": f"| a |\n|---|\n| {name} {smoke} |", "figures": {"x": 1}, "ok": True,
            "seconds": 0.0}


def test_runner_writes_sections_and_merges_only(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "discover", lambda: ["alpha", "beta"])
    monkeypatch.setattr(runner, "run_one", _fake)
    res_json, md = tmp_path / "results.json", tmp_path / "RESULTS.md"
    paths = ["--results", str(res_json), "--markdown", str(md)]
    out = runner.main(paths)
    assert out["failed"] == [] and set(out["sections"]) == {"alpha", "beta"}
    text = md.read_text()
    assert "## T-alpha" in text and "## T-beta" in text and "python -m bench" in text
    assert "CPUs" in text and "torch" in text  # machine info
    md.write_text(text.replace("| beta False |", "| beta edited by hand |") + "\n## Written elsewhere\n\nkept\n")
    runner.main(["--only", "alpha", *paths])
    again = md.read_text()
    assert "| beta edited by hand |" in again and "## Written elsewhere\n\nkept" in again  # kept verbatim
    assert again.count("## T-alpha") == 1 and "python -m bench --only alpha" in again  # replaced in place
    assert again.index("## T-alpha") < again.index("## T-beta") < again.index("## Written elsewhere")


def test_runner_smoke_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "discover", lambda: ["alpha"])
    monkeypatch.setattr(runner, "run_one", _fake)
    out = runner.main(["--smoke", "--results", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md")])
    assert out["sections"]["alpha"]["figures"] == {"x": 1}
    assert list(tmp_path.iterdir()) == []


def test_runner_rejects_unknown_name(monkeypatch):
    monkeypatch.setattr(runner, "discover", lambda: ["alpha"])
    with pytest.raises(SystemExit):
        runner.main(["--smoke", "--only", "nope"])


def test_failing_bench_is_reported_not_raised(monkeypatch):
    def boom(smoke=False):
        raise RuntimeError("kaput")

    monkeypatch.setattr(importlib, "import_module", lambda name: type("M", (), {"run": staticmethod(boom)}))
    sec = runner.run_one("whatever", smoke=True)
    assert sec["ok"] is False and "kaput" in sec["markdown"]


def _setup_alloc(mb: int):
    return mb


def _work_alloc(mb: int):
    import numpy as np

    a = np.ones(mb * 2**20 // 8)  # touched, so resident
    return float(a.sum())


def test_measure_sees_peak_memory_in_a_fresh_process():
    res = bench.measure(_setup_alloc, _work_alloc, 64)
    assert res["result"] == 64 * 2**20 // 8
    assert res["seconds"] > 0
    if res["peak_exact"]:
        assert 60 <= res["peak_mb"] < 200
    small = bench.measure(_setup_alloc, _work_alloc, 1, isolate=False)
    assert small["result"] == 2**20 // 8
