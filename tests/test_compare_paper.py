"""eval.compare_paper: our rows beside the published ones, deltas computed by hand."""

from __future__ import annotations

import json

import pytest

from eval.compare_paper import compare, load_table, main, to_markdown


def _results(target="cuhk-pedes", retriever="rde:/ckpt/best.pth", base=(76.0, 68.0), thi=(78.5, 69.0)):
    return {"config": {"dataset": "cuhk-pedes", "target": target, "retriever": retriever,
                       "retriever_identity": "rde-abc"},
            "base": {"R1": base[0], "mAP": base[1], "R5": 0, "R10": 0, "mINP": 0},
            "rounds": [{"round": 1, "R1": 1.0, "mAP": 1.0}, {"round": 5, "R1": thi[0], "mAP": thi[1]}]}


def test_table_file_has_every_row_of_the_spec():
    t = load_table()
    assert t["datasets"]["rstpreid"]["ICL* (RDA + THI)"] == {"R1": 70.55, "mAP": 53.68}
    assert set(t["datasets"]) == {"cuhk-pedes", "icfg-pedes", "rstpreid"} and "Table 1" in t["source"]


def test_deltas_and_gain_against_the_icl_rows():
    cmp = compare(_results(), family="icl")
    base, thi = cmp["rows"]
    assert base["paper_setting"] == "ICL (RDA)" and base["delta"] == {"R1": round(76.0 - 76.41, 2), "mAP": round(68.0 - 68.04, 2)}
    assert thi["paper_setting"] == "ICL* (RDA + THI)" and thi["delta"] == {"R1": round(78.5 - 77.91, 2), "mAP": round(69.0 - 69.13, 2)}
    assert cmp["thi_gain"] == {"ours": {"R1": 2.5, "mAP": 1.0}, "paper": {"R1": 1.5, "mAP": 1.09}}
    md = to_markdown(cmp)
    assert "| ours: THI, 5 rounds | ICL* (RDA + THI) | 78.50 | 77.91 | +0.59 |" in md and cmp["same_data"]


def test_family_from_the_spec_and_a_missing_row():
    cmp = compare(_results())  # rde: -> RDE; the paper has no RDE + THI row
    assert cmp["rows"][0]["paper_setting"] == "RDE" and cmp["rows"][1]["paper"] is None
    assert "no THI row" in to_markdown(cmp)


def test_other_data_needs_a_paper_dataset_and_says_so(tmp_path, capsys):
    res = _results(target="synthpedes", retriever="demo_models/clip-synthpedes")
    res["config"]["retriever_identity"] = "clip-123"
    with pytest.raises(ValueError, match="--paper-dataset"):
        compare(res)
    cmp = compare(res, paper_dataset="rstpreid")
    assert not cmp["same_data"] and "DIFFERENT DATA" in cmp["title"] and cmp["rows"][0]["paper_setting"] == "CLIP"
    f = tmp_path / "results.json"
    f.write_text(json.dumps(res))
    assert main([str(f)]) == 1 and capsys.readouterr().err.startswith("error: ")
    assert main([str(tmp_path / "missing.json")]) == 1 and "does not exist" in capsys.readouterr().err
