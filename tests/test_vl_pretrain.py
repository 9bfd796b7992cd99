"""SynthPEDES-VL pre-training data builder: train split only, formats, labels, determinism."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict

import pytest

from synthpedes.dataset import consistent, load_ground_truth, mentioned_facts
from synthpedes.vl_pretrain import (
    STAGES,
    TASKS,
    Builder,
    build,
    build_rows,
    counterfactual,
    main,
)
from mllm_tune.core.prompts import DEFAULT_PROMPTS, is_yes


def _train_pids(root) -> set[int]:
    records = json.loads((root / "reid_raw.json").read_text())
    return {r["id"] for r in records if r["split"] == "train"}


def _user_text(row) -> str:
    return row["messages"][0]["content"][-1]["text"]


def _answer(row) -> str:
    return row["messages"][1]["content"][0]["text"]


@pytest.fixture
def seen_facts(monkeypatch) -> list[dict]:
    """Every fact set the builder computes for a caption (``mentioned_facts``), in call order."""
    from synthpedes import vl_pretrain

    seen: list[dict] = []
    orig = vl_pretrain.mentioned_facts

    def spy(a, groups):
        facts = orig(a, groups)
        seen.append(facts)
        return facts

    monkeypatch.setattr(vl_pretrain, "mentioned_facts", spy)
    return seen


def test_rows_use_only_train_identities_and_images(synth_root):
    rows = build_rows(synth_root, 300, "all", seed=0)
    train = _train_pids(synth_root)
    assert {r["image_pid"] for r in rows} <= train
    for r in rows:
        for path in r["images"]:
            assert "/imgs/train/" in path, path
    # held-out identities never appear, not even in negative captions' source
    records = json.loads((synth_root / "reid_raw.json").read_text())
    test_paths = {r["file_path"] for r in records if r["split"] != "train"}
    assert not any(p.endswith(tp) for r in rows for p in r["images"] for tp in test_paths)


def test_trl_vision_conversational_format(synth_root):
    rows = build_rows(synth_root, 120, "all", seed=1)
    tasks = Counter(r["task"] for r in rows)
    assert set(tasks) == set(STAGES["all"]) and set(tasks) <= set(TASKS)
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert all(isinstance(c, dict) and c["type"] in ("image", "text") for c in user["content"])
        n_image = sum(c["type"] == "image" for c in user["content"])
        assert n_image == len(r["images"]) == (0 if r["task"] == "aggr" else 1)
        assert user["content"][-1]["type"] == "text" and _user_text(r)
        assert assistant["content"] == [{"type": "text", "text": _answer(r)}] and _answer(r)
        assert all(isinstance(p, str) for p in r["images"])
        assert r["length"] > 0
    loc = [r for r in rows if r["task"].startswith("loc")]
    assert loc and all(_user_text(r).startswith(DEFAULT_PROMPTS.render_loc("x").split('"')[0]) for r in loc)
    assert all(_answer(r) in ("Yes", "No") and _answer(r) == r["label"] for r in loc)
    full = [r for r in rows if r["task"] == "vqa_full"]
    assert full and all(_user_text(r) == DEFAULT_PROMPTS.render_vqa() for r in full)
    assert all(len(_answer(r).splitlines()) == 15 for r in full)


def test_labels_balanced_per_task(synth_root):
    rows = build_rows(synth_root, 400, "matching", seed=2)
    for task in ("loc_easy", "loc_hard", "attr_yesno"):
        labels = Counter(r["label"] for r in rows if r["task"] == task)
        assert abs(labels["Yes"] - labels["No"]) <= 1, (task, labels)


def test_loc_labels_are_true_to_the_ground_truth(synth_root):
    """A Yes caption fits the image's identity; a hard No contradicts it in one or two facts."""
    gt = load_ground_truth(synth_root)
    b = Builder(synth_root, seed=3)
    from synthpedes.dataset import make_caption
    import random

    for _ in range(60):
        row = b.loc(hard=True)
        a = gt["ids"][row["image_pid"]]
        assert row["label"] in ("Yes", "No") and is_yes(row["label"]) == (row["label"] == "Yes")
    # counterfactual persons differ from the original only in the keys asked for
    rng = random.Random(0)
    for pid, a in list(gt["ids"].items())[:30]:
        _, groups = make_caption(a, rng)
        keys = [k for g in groups for k in {"hair": ("hair_color",), "upper": ("upper_color",),
                                            "lower": ("lower_color",), "shoes": ("shoes_color",)}.get(g, ())]
        if not keys:
            continue
        c = counterfactual(a, keys, 1, rng)
        assert c is not None and c != a
        changed = [k for k, v in asdict(a).items() if asdict(c)[k] != v]
        assert changed and set(changed) <= set(keys) | {"lower_length", "sleeve", "bag_color"}


def test_hard_negatives_contradict_the_image(synth_root, seen_facts):
    """Recompute, for hard negatives, that the caption's facts cannot be read off the image."""
    gt = load_ground_truth(synth_root)
    seen = seen_facts
    b = Builder(synth_root, seed=4)
    negatives = 0
    for _ in range(40):
        seen.clear()
        row = b.loc(hard=True)
        if row["label"] == "No":
            negatives += 1
            a = gt["ids"][row["image_pid"]]
            assert not consistent(a, seen[-1])
            assert 1 <= sum(asdict(a)[k] != v for k, v in seen[-1].items()) <= 2
    assert negatives == 20


def test_deterministic_and_seed_dependent(synth_root):
    a = build_rows(synth_root, 80, "attributes", seed=5)
    b = build_rows(synth_root, 80, "attributes", seed=5)
    c = build_rows(synth_root, 80, "attributes", seed=6)
    assert a == b
    assert a != c


def test_attributes_stage_uses_one_group_captions(synth_root):
    gt = load_ground_truth(synth_root)
    rows = [r for r in build_rows(synth_root, 200, "attributes", seed=7) if r["task"].startswith("loc")]
    assert rows
    # one clothing/hair/bag group at most: short captions (plus the optional gender and an extra sentence)
    for r in rows:
        caption = _user_text(r).split('"')[1]
        assert caption.count(" and ") == 0, caption


def test_cli_saves_a_datasetdict(synth_root, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "vl"
    main(["--dataset-root", str(synth_root), "--out", str(out), "--stage", "matching", "--num-samples", "50"])
    ds = load_from_disk(str(out))
    assert list(ds) == ["train"] and len(ds["train"]) == 50
    assert {"messages", "images", "task", "label", "length"} <= set(ds["train"].column_names)
    stats = json.loads((out / "vl_pretrain_stats.json").read_text())
    assert stats["rows"] == 50 and stats["stage"] == "matching"


def test_bad_input_is_named(tmp_path, synth_root):
    with pytest.raises(FileNotFoundError, match="reid_raw.json"):
        build_rows(tmp_path, 10)
    with pytest.raises(ValueError, match="unknown stage"):
        build_rows(synth_root, 10, stage="nope")


def test_rows_train_through_trl_collator(synth_root, tiny_qwen2_vl):
    """The rows go through TRL's vision collator with assistant-only labels, text-only rows included."""
    from datasets import Dataset, Image, Sequence
    from transformers import AutoProcessor
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = AutoProcessor.from_pretrained(tiny_qwen2_vl)
    rows = build_rows(synth_root, 12, "all", seed=8)
    rows = sorted(rows, key=lambda r: r["task"] != "aggr")[:4]  # one text-only row in the batch
    assert any(r["task"] == "aggr" for r in rows)
    ds = Dataset.from_list(rows).cast_column("images", Sequence(Image()))
    collator = DataCollatorForVisionLanguageModeling(processor)
    batch = collator([ds[i] for i in range(len(ds))])
    assert batch["pixel_values"].shape[0] > 0 and (batch["labels"] != -100).any()


def test_one_word_answers_are_the_ground_truth(synth_root):
    gt = load_ground_truth(synth_root)
    b = Builder(synth_root, seed=9)
    for _ in range(60):
        row = b.attr_word()
        a = asdict(gt["ids"][row["image_pid"]])
        answer = _answer(row)
        assert " " not in answer or answer in ("shoulder bag",), answer
        assert answer in {str(v) for v in a.values()} | {"Yes", "No"}
        assert _user_text(row).endswith("Answer with one word.")


def test_batches_for_a_sequential_sampler_mix_short_tasks(synth_root):
    from synthpedes.vl_pretrain import LONG_TASKS

    mix = {"attr_word": 0.5, "loc_hard": 0.25, "vqa_full": 0.25}  # 240 short rows, 80 long: whole batches
    rows = build_rows(synth_root, 320, "all", seed=10, mix=mix, batch_size=16)
    plain = build_rows(synth_root, 320, "all", seed=10, mix=mix)
    assert Counter(r["task"] for r in rows) == Counter(r["task"] for r in plain) and rows != plain
    batches = [rows[i:i + 16] for i in range(0, 320, 16)]
    long_batches = [b for b in batches if all(r["task"] in LONG_TASKS for r in b)]
    short_batches = [b for b in batches if not any(r["task"] in LONG_TASKS for r in b)]
    assert len(long_batches) == 5 and len(short_batches) == 15
    # short batches mix the tasks (no one-question batches)
    assert all(len({r["task"] for r in b}) == 2 for b in short_batches)
    assert build_rows(synth_root, 320, "all", seed=10, mix=mix, batch_size=16) == rows


def test_color_yesno_asks_only_colours_and_is_true(synth_root):
    gt = load_ground_truth(synth_root)
    b = Builder(synth_root, seed=8)
    rows = [b.color_yesno() for _ in range(80)]
    assert Counter(r["label"] for r in rows) == {"Yes": 40, "No": 40}
    for r in rows:
        a = asdict(gt["ids"][r["image_pid"]])
        q = _user_text(r)
        key = next(k for k, prefix in (("upper_color", "Is the upper-body garment "), ("lower_color", "Are the trousers or skirt "),
                                       ("hair_color", "Is the person's hair "), ("shoes_color", "Are the shoes "))
                   if q.startswith(prefix))
        asked = q.split("?")[0].rsplit(" ", 1)[1]
        assert (asked == a[key]) == (r["label"] == "Yes"), (q, a[key], r["label"])


def test_loc_color_negatives_differ_only_in_colours(synth_root, seen_facts):
    """A loc_color No caption contradicts the image in one or two colours and nothing else."""
    gt = load_ground_truth(synth_root)
    seen = seen_facts
    b = Builder(synth_root, seed=9, max_groups=2)
    negatives = 0
    for _ in range(40):
        seen.clear()
        row = b.draw("loc_color")
        assert row["task"] == "loc_color"
        if row["label"] == "No":
            negatives += 1
            a = asdict(gt["ids"][row["image_pid"]])
            wrong = {k for k, v in seen[-1].items() if a[k] != v}
            assert wrong and wrong <= {"upper_color", "lower_color", "hair_color", "shoes_color"}, wrong
    assert negatives == 20


def test_two_turn_bridges_read_out_the_truth_then_ask(synth_root):
    """color_yesno_mt / loc_color_mt: turn 1 is the ground-truth colour readout of the image,
    turn 2 the same Yes/No question as the one-turn task, with a balanced, true label."""
    gt = load_ground_truth(synth_root)
    b = Builder(synth_root, seed=10, max_groups=2)
    for task in ("color_yesno_mt", "loc_color_mt"):
        rows = [b.draw(task) for _ in range(30)]
        assert Counter(r["label"] for r in rows) == {"Yes": 15, "No": 15}
        for r in rows:
            a = asdict(gt["ids"][r["image_pid"]])
            user1, readout, user2, answer = r["messages"]
            assert r["task"] == task and [m["role"] for m in r["messages"]] == ["user", "assistant", "user", "assistant"]
            assert user1["content"][0] == {"type": "image"} and all(c["type"] == "text" for c in user2["content"])
            said = readout["content"][0]["text"]
            if task == "loc_color_mt":
                assert said == f"upper {a['upper_color']}, lower {a['lower_color']}, hair {a['hair_color']}, shoes {a['shoes_color']}"
                assert user2["content"][0]["text"].startswith("Look at the pedestrian")
            else:
                assert said in {a[k] for k in ("upper_color", "lower_color", "hair_color", "shoes_color")}
            assert answer["content"][0]["text"] == r["label"]


def test_slot_swapped_colours_and_near_negatives(synth_root):
    """swap_p=1: every wrong colour asked about is worn elsewhere by the same person (when it can
    be); loc_near negatives describe another identity and contradict the image."""
    from synthpedes.vl_pretrain import COLOR_KEYS, other_value

    gt = load_ground_truth(synth_root)
    b = Builder(synth_root, seed=12, swap_p=1.0, max_groups=3)
    swapped = checked = 0
    for _ in range(60):
        r = b.color_yesno()
        if r["label"] == "Yes":
            continue
        a = asdict(gt["ids"][r["image_pid"]])
        asked = _user_text(r).split("?")[0].rsplit(" ", 1)[1]
        worn = {a[k] for k in COLOR_KEYS}
        checked += 1
        swapped += asked in worn
    assert checked == 30 and swapped >= 20  # some persons wear no other colour the slot allows
    import random

    rng = random.Random(0)
    d = asdict(next(iter(gt["ids"].values())))
    assert all(other_value(d, "upper_color", rng, 0.0) != d["upper_color"] for _ in range(20))
    near = [b.draw("loc_near") for _ in range(20)]
    assert Counter(r["label"] for r in near) == {"Yes": 10, "No": 10} and {r["task"] for r in near} == {"loc_near"}


def test_loc_small_mentions_hair_or_shoes_and_negatives_differ_only_there(synth_root, seen_facts):
    """Both labels mention the hair or the shoes (no "mentions shoes -> No" shortcut), and a No
    caption contradicts the image only in the hair or shoe colour."""
    gt = load_ground_truth(synth_root)
    seen = seen_facts
    b = Builder(synth_root, seed=13, max_groups=3, swap_p=0.6)
    for _ in range(40):
        seen.clear()
        row = b.draw("loc_small")
        caption = _user_text(row).split('"')[1]
        assert "hair" in caption or "shoes" in caption, caption
        if row["label"] == "No":
            a = asdict(gt["ids"][row["image_pid"]])
            wrong = {k for k, v in seen[-1].items() if a[k] != v}
            assert wrong and wrong <= {"hair_color", "shoes_color"}, wrong
