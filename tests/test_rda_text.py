"""RDA on the trainer side: reading the JSON-lines file, recombination, token noise, gamma."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from mllm_tune.rda_text import RDAFormatError, rda_gamma, read_rda_file, recombine, token_noise

LINE = {"record_index": 3, "caption_index": 1, "caption": "A man in red.", "enriched": "A man in a red shirt.",
        "groups": [["He wears a red shirt", "His shirt is red."], ["He has short hair."], []]}


def test_read_rda_file_and_errors(tmp_path):
    f = tmp_path / "rda.jsonl"
    f.write_text(json.dumps(LINE) + "\n\n" + json.dumps({**LINE, "caption_index": 0}) + "\n", encoding="utf-8")
    entries = read_rda_file(f)
    e = entries[(3, 1)]
    assert len(entries) == 2 and e.caption == "A man in red."
    assert e.groups == (("He wears a red shirt", "His shirt is red."), ("He has short hair.",))  # empty group dropped

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(LINE) + "\n" + json.dumps(LINE)[:30] + "\n", encoding="utf-8")
    with pytest.raises(RDAFormatError, match=r"bad.jsonl:2: not valid JSON.*truncated"):
        read_rda_file(bad)
    bad.write_text(json.dumps({**LINE, "groups": "oops"}) + "\n", encoding="utf-8")
    with pytest.raises(RDAFormatError, match=r"bad.jsonl:1: field 'groups' must be list"):
        read_rda_file(bad)
    bad.write_text(json.dumps({k: v for k, v in LINE.items() if k != "record_index"}) + "\n", encoding="utf-8")
    with pytest.raises(RDAFormatError, match="'record_index' is missing"):
        read_rda_file(bad)
    bad.write_text(json.dumps(LINE) + "\n" + json.dumps(LINE) + "\n", encoding="utf-8")
    with pytest.raises(RDAFormatError, match="second line for record 3 caption 1"):
        read_rda_file(bad)
    with pytest.raises(FileNotFoundError):
        read_rda_file(tmp_path / "missing.jsonl")


def test_recombine_takes_one_paraphrase_per_group_in_shuffled_order():
    groups = [["a1", "a2"], ["b1", "b2", "b3"], ["c1"]]
    rng = random.Random(0)
    seen_orders, seen_picks = set(), set()
    for _ in range(200):
        text = recombine(groups, rng)
        parts = [s.rstrip(".") for s in text.split(" ")]
        assert len(parts) == 3 and sorted(p[0] for p in parts) == ["a", "b", "c"]
        seen_orders.add(tuple(p[0] for p in parts))
        seen_picks.update(parts)
    assert len(seen_orders) == 6  # every order occurs
    assert seen_picks == {"a1", "a2", "b1", "b2", "b3", "c1"}
    assert recombine([], rng) == "" and recombine([[]], rng) == ""
    assert recombine([["Red shirt"]], random.Random(1)) == "Red shirt."


def test_token_noise_rates():
    rng = random.Random(0)
    ids = list(range(10, 60))
    n_trials, stats = 400, Counter()
    for _ in range(n_trials):
        out = token_noise([1] + ids + [2], rng, p=0.2, mask_id=5, vocab_size=100, keep_ids=(1, 2))
        assert out[0] == 1 and out[-1] == 2  # specials kept
        body = out[1:-1]
        stats["deleted"] += len(ids) - len(body)
        stats["masked"] += body.count(5)
        stats["replaced"] += sum(1 for t in body if t not in ids and t != 5)
        assert all(t not in (1, 2) for t in body)
    total = n_trials * len(ids)
    # expected shares of all tokens: mask 0.12, replace 0.04, delete 0.04 (a replacement can hit an original id)
    assert abs(stats["masked"] / total - 0.12) < 0.01
    assert abs(stats["deleted"] / total - 0.04) < 0.008
    assert abs(stats["replaced"] / total - 0.04 * 47 / 97) < 0.006  # 97 allowed ids, 47 not in the input
    assert token_noise(ids, rng, p=0.0) == ids
    with pytest.raises(ValueError):
        token_noise(ids, rng, p=0.5)


def test_gamma_schedule():
    assert rda_gamma(1) == pytest.approx(0.97)
    assert rda_gamma(10) == pytest.approx(0.7)
    assert rda_gamma(60) == pytest.approx(0.1)
    assert rda_gamma(5, fixed=0.5) == 0.5
