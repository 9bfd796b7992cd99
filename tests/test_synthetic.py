"""SynthPEDES: determinism, identity-disjoint splits, ambiguity of captions, ground truth."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mllm_tune.core.pedes import load_pedes
from synthpedes.dataset import (
    caption_ambiguity,
    consistent,
    generate,
    load_ground_truth,
    main,
    mentioned_facts,
)


def _digest(root: Path) -> str:
    h = hashlib.sha256((root / "reid_raw.json").read_bytes())
    for p in sorted((root / "imgs").rglob("*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path):
    generate(tmp_path / "a", num_ids=12, seed=3, progress=False)
    generate(tmp_path / "b", num_ids=12, seed=3, progress=False)
    generate(tmp_path / "c", num_ids=12, seed=4, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_layout_is_cuhk_and_splits_are_identity_disjoint(synth_root):
    ds = load_pedes(synth_root, "cuhk-pedes")  # also checks every image exists
    ids = {s: {r.pid for r in ds.records if r.split == s} for s in ("train", "val", "test")}
    assert all(ids.values())
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    per_id: dict[int, int] = {}
    for r in ds.records:
        per_id[r.pid] = per_id.get(r.pid, 0) + 1
        assert len(r.captions) == 2
    assert set(per_id.values()) <= {2, 3, 4}


def test_captions_are_true_and_often_ambiguous(synth_root):
    gt = load_ground_truth(synth_root)
    records = json.loads((synth_root / "reid_raw.json").read_text())
    for r in records:
        attrs = gt["ids"][r["id"]]
        groups = gt["mentions"][r["file_path"]]
        assert len(groups) == len(r["captions"])
        for g in groups:
            assert consistent(attrs, mentioned_facts(attrs, g))  # a caption never lies
            assert {"upper", "lower", "upper_color", "lower_color"} & set(g)  # and always mentions clothing
    amb = caption_ambiguity(synth_root, "train")  # the largest split of the small fixture
    # random attribute subsets: a good share of queries fit several identities, not all
    assert 0.1 < amb["ambiguous_fraction"] < 0.9
    assert amb["mean_ids_per_caption"] > 1.1


def test_captions_vary_in_wording(synth_root):
    records = json.loads((synth_root / "reid_raw.json").read_text())
    starts = {c.split()[0] + " " + c.split()[1] for r in records for c in r["captions"]}
    assert len(starts) >= 6


def test_cli_prints_statistics(tmp_path, capsys):
    stats = main(["--out", str(tmp_path), "--num-ids", "10", "--seed", "1"])
    out = capsys.readouterr().out
    assert "test captions fitting more than one identity" in out
    assert stats["train"]["ids"] + stats["val"]["ids"] + stats["test"]["ids"] == 10
    assert json.loads((tmp_path / "stats.json").read_text())["test"]["ids"] == stats["test"]["ids"]
