"""`make demo` end to end at toy sizes, with the shipped demo models: every stage runs and the
summary carries the numbers the README promises."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_with_shipped_models(tmp_path):
    from synthpedes.demo import main

    out = tmp_path / "demo"
    s = main(["--out", str(out), "--num-ids", "24", "--max-pairs", "48", "--sft-steps", "2",
              "--max-new-tokens", "24"])
    assert json.loads((out / "summary.json").read_text())["thi"]["base"] == s["thi"]["base"]
    acc = s["anchor_localization_accuracy"]
    assert 0.0 <= acc["shipped_model"] <= 1.0 and 0.0 <= acc["lora_tuned"] <= 1.0
    auc = s["anchor_localization_auc"]
    assert 0.0 <= auc["shipped_model"] <= 1.0 and 0.0 <= auc["lora_tuned"] <= 1.0
    assert len(s["thi"]["rounds"]) == 5 and s["thi"]["calls"]["loc"] > 0
    assert s["pairs"]["splits_used"] == ["train"]
    assert (out / "lora" / "adapter_config.json").is_file()
    res = json.loads((out / "icl_end2end" / "results.json").read_text())
    from synthpedes.demo_assets import DEMO_THI_XI

    # THI ran at the ξ calibrated for the shipped retriever, and the summary says so
    assert res["config"]["xi"] == s["thi"]["xi"] == DEMO_THI_XI
