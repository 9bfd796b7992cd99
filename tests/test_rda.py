"""data_builders.rda with the SynthPEDES oracle: alignment, resume without repeated calls, fallbacks."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from data_builders import rda
from mllm_tune.core.backends import MLLMBackend, make_backend


class Counting(MLLMBackend):
    """Wraps a backend; records every request it is sent and can fail after some batches."""

    kind = "counting"

    def __init__(self, inner: MLLMBackend, fail_after_batches: int | None = None, answer=None):
        self.inner, self.fail_after, self.answer = inner, fail_after_batches, answer
        self.sent: list[tuple] = []
        self.batches = 0
        self.simulated = inner.simulated

    def identity(self):
        return self.inner.identity()  # same identity across runs, so the cache is shared

    def generate(self, requests):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.batches += 1
        self.sent += [(r.task, r.prompt, r.image) for r in requests]
        if self.answer is not None:
            return [self.answer(r) for r in requests]
        return self.inner.generate(requests)


def _train_captions(root):
    recs = json.loads((root / "reid_raw.json").read_text())
    return [(i, j, c) for i, r in enumerate(recs) if r["split"] == "train" for j, c in enumerate(r["captions"])]


def _run(root, out, backend, **kw):
    kw.setdefault("batch_size", 16)
    return rda.run(root, "cuhk-pedes", out, backend, progress=False, **kw)


def test_output_aligned_with_annotation(synth_root, tmp_path):
    from mllm_tune.rda_text import read_rda_file

    stats = rda.main(["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--mllm", "oracle",
                      "--out", str(tmp_path), "--m", "2", "--no-progress"])
    lines = [json.loads(x) for x in (tmp_path / "rda.jsonl").read_text().splitlines()]
    expect = _train_captions(synth_root)
    assert [(x["record_index"], x["caption_index"], x["caption"]) for x in lines] == expect
    for x in lines:
        assert x["groups"] and all(1 <= len(g) <= 2 for g in x["groups"])
        assert x["enriched"].startswith(x["caption"].rstrip("."))  # the oracle keeps the caption first
    entries = read_rda_file(tmp_path / "rda.jsonl")  # the trainer's reader accepts it
    assert len(entries) == len(expect)
    assert stats["simulated"] is True and stats["captions"] == len(expect)
    assert stats["requests"]["vqa"] == stats["images"] < stats["captions"]  # VQA asked once per image
    disk = json.loads((tmp_path / "rda_stats.json").read_text())
    assert disk["backend_calls"] == stats["backend_calls"]


def test_killed_run_resumes_without_repeating_a_call(synth_root, tmp_path):
    oracle = make_backend("oracle", dataset_root=synth_root)
    first = Counting(oracle, fail_after_batches=7)  # dies in the decomposition stage
    with pytest.raises(KeyboardInterrupt):
        _run(synth_root, tmp_path, first, limit=60)
    assert not (tmp_path / "rda.jsonl").exists()  # nothing half-written
    assert 0 < len(first.sent) and first.batches == 7

    second = Counting(oracle)
    s2 = _run(synth_root, tmp_path, second, limit=60)
    everything = first.sent + second.sent
    dup = [k for k, n in Counter(everything).items() if n > 1]
    assert dup == []  # no request was sent twice over the two runs
    assert sum(s2["backend_calls"].values()) == len(second.sent)
    assert sum(s2["cache_hits"].values()) >= len(first.sent)  # what the first run got is reused

    third = Counting(oracle)
    s3 = _run(synth_root, tmp_path, third, limit=60)
    assert third.sent == [] and sum(s3["backend_calls"].values()) == 0
    assert (tmp_path / "rda.jsonl").read_text().count("\n") == 60


def test_recombination_is_deterministic_for_a_seed(synth_root, tmp_path):
    from mllm_tune.rda_text import read_rda_file, recombine

    _run(synth_root, tmp_path, make_backend("oracle", dataset_root=synth_root), limit=20)
    entries = list(read_rda_file(tmp_path / "rda.jsonl").values())
    a = [recombine(e.groups, random.Random(3)) for e in entries]
    b = [recombine(e.groups, random.Random(3)) for e in entries]
    c = [recombine(e.groups, random.Random(4)) for e in entries]
    assert a == b and a != c


def test_unparseable_answers_fall_back(synth_root, tmp_path):
    oracle = make_backend("oracle", dataset_root=synth_root)
    blank = Counting(oracle, answer=lambda r: "" if r.task in ("dec", "rwt") else oracle.generate([r])[0])
    stats = _run(synth_root, tmp_path, blank, limit=5, cache_dir=tmp_path / "c2")
    lines = [json.loads(x) for x in (tmp_path / "rda.jsonl").read_text().splitlines()]
    assert stats["dec_fallback"] == 5 and stats["rwt_fallback"] == 5
    assert all(x["groups"] == [[x["enriched"]]] for x in lines)


def test_errors(synth_root, tmp_path):
    with pytest.raises(ValueError, match="m \\(paraphrases"):
        _run(synth_root, tmp_path, make_backend("oracle", dataset_root=synth_root), m=0, limit=2)
    with pytest.raises(ValueError, match="needs --model"):
        rda.main(["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown dataset"):
        rda.main(["--dataset-root", str(synth_root), "--dataset", "nope", "--mllm", "oracle", "--out", str(tmp_path)])


def test_tiny_hf_backend_end_to_end_and_cached(synth_root, tiny_qwen2_vl, tmp_path):
    """The real backend path: a tiny random Qwen2-VL answers (nonsense); parsing falls back, the
    output stays aligned, and a rerun is served entirely from the answer cache."""
    argv = ["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--mllm", "hf", "--model",
            str(tiny_qwen2_vl), "--max-new-tokens", "8", "--limit", "2", "--m", "2", "--out", str(tmp_path),
            "--no-progress"]
    first = rda.main(argv)
    lines = [json.loads(x) for x in (tmp_path / "rda.jsonl").read_text().splitlines()]
    assert [(x["record_index"], x["caption_index"], x["caption"]) for x in lines] == _train_captions(synth_root)[:2]
    assert all(x["groups"] and all(g for g in x["groups"]) for x in lines)
    assert first["simulated"] is False and sum(first["backend_calls"].values()) > 0
    again = rda.main(argv)
    assert sum(again["backend_calls"].values()) == 0
    assert sum(again["cache_hits"].values()) == sum(first["requests"].values())
