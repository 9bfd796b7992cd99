"""python -m data_builders.anchor_pairs on SynthPEDES with a tiny CLIP: contract, rules, options, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_builders import anchor_pairs


@pytest.fixture(scope="module")
def mined(synth_root, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    cache = tmp_path_factory.mktemp("feat_cache")
    stats = anchor_pairs.main([
        "--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--retriever", str(tiny_clip),
        "--out", str(out), "--negatives-per-caption", "2", "--positives-per-caption", "2", "--top-k", "6",
        "--eval-fraction", "0.2", "--export", "llamafactory", "--cache-dir", str(cache), "--no-progress",
    ])
    return out, stats, cache


def _splits(root):
    from mllm_tune.core.pedes import load_pedes

    ds = load_pedes(root, "cuhk-pedes")
    return {s: ds.split(s) for s in ds.splits}


def test_rows_follow_the_rules(mined, synth_root, tiny_clip):
    import datasets

    out, stats, _ = mined
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "eval"}
    views = _splits(synth_root)
    train = views["train"]
    train_paths = {str(Path(p).resolve()) for p in train.gallery_paths}
    other_paths = {str(Path(p).resolve()) for s, v in views.items() if s != "train" for p in v.gallery_paths}
    path_pid = {str(Path(p).resolve()): pid for p, pid in zip(train.gallery_paths, train.gallery_pids)}

    # the true top-6 of each caption, recomputed with the same retriever
    from mllm_tune.core.retrievers import load_retriever

    r = load_retriever(str(tiny_clip))
    sims = r.encode_texts(train.query_texts, progress=False) @ r.encode_images(train.gallery_paths, progress=False).T
    top6 = sims.topk(6, dim=1).indices

    for split in ("train", "eval"):
        for row in dd[split]:
            img = row["images"][0]
            assert Path(img).is_absolute() and img in train_paths and img not in other_paths
            assert row["image_pid"] == path_pid[img]
            assert train.query_texts[row["caption_index"]] == row["caption"]
            assert train.query_pids[row["caption_index"]] == row["caption_pid"]
            user, answer = row["messages"]
            assert user["role"] == "user" and user["content"][0]["type"] == "image"
            assert row["caption"] in user["content"][1]["text"]
            if row["label"] == 1:
                assert answer["content"][0]["text"] == "Yes" and row["image_pid"] == row["caption_pid"]
            else:
                assert answer["content"][0]["text"] == "No" and row["image_pid"] != row["caption_pid"]
                assert row["image_index"] in top6[row["caption_index"]].tolist()
    # each caption's own image is a Yes pair
    own = {(r["caption_index"], r["image_index"]) for s in dd for r in dd[s] if r["label"] == 1}
    assert all((c, train.query_image_index[c]) in own for c in range(len(train.query_texts)))
    # held-out identities: eval captions' ids never appear among train captions
    assert not {r["caption_pid"] for r in dd["eval"]} & {r["caption_pid"] for r in dd["train"]}
    assert stats["eval_identities"] >= 1 and len(dd["eval"]) == stats["eval_pairs"] > 0


def test_counts_stats_jsonl_and_export(mined, synth_root):
    out, stats, _ = mined
    disk = json.loads((out / "stats.json").read_text())
    assert disk["splits_used"] == ["train"]
    assert disk["retriever"]["identity"] and disk["settings"]["negatives_per_caption"] == 2
    n_cap = len(_splits(synth_root)["train"].query_texts)
    # 2 negatives per caption (top-6 of ~80 images always holds 2 other ids); SynthPEDES has >= 2 images per id
    assert disk["no"] == 2 * n_cap and disk["yes"] == 2 * n_cap
    assert disk["yes_no_ratio"] == pytest.approx(1.0)
    assert sum(disk["negative_rank_histogram"].values()) == disk["no"]
    lines = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == disk["pairs"] == disk["train_pairs"] + disk["eval_pairs"]
    assert {x["split"] for x in lines} == {"train", "eval"}
    lf = out / "llamafactory"
    info = json.loads((lf / "dataset_info.json").read_text())
    entry = info["icl_anchor_pairs_train"]
    assert entry["formatting"] == "sharegpt" and entry["columns"]["images"] == "images"
    items = json.loads((lf / entry["file_name"]).read_text())
    assert len(items) == disk["train_pairs"]
    assert items[0]["messages"][0]["content"].startswith("<image>") and items[0]["messages"][1]["content"] in ("Yes", "No")


def test_sft_loader_accepts_the_output(mined):
    from mllm_tune.sft import load_pairs
    from mllm_tune.sft_config import DataArguments

    out, stats, _ = mined
    train, ev, info = load_pairs(DataArguments(dataset_name=str(out)))
    assert len(train) == stats["train_pairs"] and len(ev) == stats["eval_pairs"]
    assert info["train_yes_fraction"] == pytest.approx(
        sum(r["label"] for r in map(json.loads, (out / "pairs.jsonl").read_text().splitlines()) if r["split"] == "train")
        / stats["train_pairs"], abs=1e-4)


def test_ratio_cap_and_determinism(mined, synth_root, tiny_clip, tmp_path):
    _, _, cache = mined
    args = ["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--retriever", str(tiny_clip),
            "--negatives-per-caption", "3", "--yes-no-ratio", "0.5", "--max-pairs", "90", "--seed", "7",
            "--cache-dir", str(cache), "--eval-fraction", "0", "--no-progress"]
    a = anchor_pairs.main([*args, "--out", str(tmp_path / "a")])
    b = anchor_pairs.main([*args, "--out", str(tmp_path / "b")])
    assert a["pairs"] == 90 and a["yes"] == 30 and a["no"] == 60
    assert (tmp_path / "a" / "pairs.jsonl").read_text() == (tmp_path / "b" / "pairs.jsonl").read_text()
    c = anchor_pairs.main([*args[:-1], "--seed", "8", "--no-progress", "--out", str(tmp_path / "c")])
    assert (tmp_path / "a" / "pairs.jsonl").read_text() != (tmp_path / "c" / "pairs.jsonl").read_text()
    assert c["pairs"] == 90


def test_clean_filter(mined, synth_root, tiny_clip, tmp_path):
    _, _, cache = mined
    s = anchor_pairs.main(["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--retriever",
                           str(tiny_clip), "--out", str(tmp_path / "o"), "--clean-top-r", "3", "--cache-dir",
                           str(cache), "--eval-fraction", "0", "--no-progress"])
    assert s["captions_kept"] < s["captions"]
    rows = [json.loads(x) for x in (tmp_path / "o" / "pairs.jsonl").read_text().splitlines()]
    assert len({r["caption_index"] for r in rows}) == s["captions_kept"]


def test_errors(synth_root, tiny_clip, tmp_path):
    from mllm_tune.core.pedes import PedesFormatError
    from mllm_tune.core.retrievers import RetrieverLoadError

    base = ["--dataset-root", str(synth_root), "--retriever", str(tiny_clip), "--out", str(tmp_path / "x")]
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        anchor_pairs.main([*base, "--dataset", "nope"])
    with pytest.raises(RetrieverLoadError, match="does not exist"):
        anchor_pairs.main(["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--retriever",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(RetrieverLoadError, match="empty_model"):
        anchor_pairs.main(["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--retriever",
                           str(tmp_path / "empty_model"), "--out", str(tmp_path / "x")])
    # a dataset without a train split
    root = tmp_path / "no_train"
    root.mkdir()
    recs = [r for r in json.loads((synth_root / "reid_raw.json").read_text()) if r["split"] != "train"]
    (root / "reid_raw.json").write_text(json.dumps(recs))
    shutil.copytree(synth_root / "imgs", root / "imgs")
    with pytest.raises(PedesFormatError, match="split 'train' has no records"):
        anchor_pairs.main(["--dataset-root", str(root), "--dataset", "cuhk-pedes", "--retriever", str(tiny_clip),
                           "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="cannot exceed top_k"):
        anchor_pairs.main([*base, "--dataset", "cuhk-pedes", "--top-k", "2", "--negatives-per-caption", "3"])
    assert not (tmp_path / "x").exists()  # nothing written on failure


def test_rde_consensus_clean_set_keeps_only_its_captions(synth_root, tiny_clip, tmp_path):
    import json

    from data_builders.anchor_pairs import cli, main
    from mllm_tune.core.pedes import load_pedes

    n = len(load_pedes(synth_root, "synthpedes").split("train").query_texts)
    keep = list(range(0, n, 3))
    folder = tmp_path / "rde_run"
    folder.mkdir()
    (folder / "clean.json").write_text(json.dumps({"format": "rde-consensus-clean-set/1", "num_pairs": n,
                                                   "caption_indices": keep, "epoch": 3}))
    base = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", str(tiny_clip), "--no-progress"]
    stats = main(base + ["--out", str(tmp_path / "p"), "--clean", "rde-consensus", "--clean-set", str(folder)])
    rows = [json.loads(x) for x in (tmp_path / "p" / "pairs.jsonl").read_text().splitlines()]
    assert rows and {r["caption_index"] for r in rows} <= set(keep)
    assert stats["captions_kept"] <= len(keep) and stats["clean_set"]["captions"] == len(keep)
    # no clean.json where --clean rde-consensus looks: one error line naming the file
    assert cli(base + ["--out", str(tmp_path / "q"), "--clean", "rde-consensus", "--clean-set", str(tmp_path)]) == 2
