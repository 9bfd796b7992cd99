"""Backend interface, answer cache and the SynthPEDES oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllm_tune.core.pedes import load_split
from synthpedes.dataset import load_ground_truth, vqa_answers
from mllm_tune.core.backends import BackendError, CachedBackend, CacheMiss, MLLMBackend, MLLMRequest, make_backend
from mllm_tune.core.prompts import DEFAULT_PROMPTS as P
from mllm_tune.core.prompts import is_yes, split_answer_sentences


class CountingBackend(MLLMBackend):
    kind = "counting"

    def __init__(self) -> None:
        self.seen: list[MLLMRequest] = []

    def identity(self):
        return {"kind": "counting", "v": 1}

    def generate(self, requests):
        self.seen.extend(requests)
        return [f"{r.task}:{r.prompt}:{Path(r.image).name if r.image else '-'}" for r in requests]


@pytest.fixture(scope="module")
def test_split(synth_root):
    return load_split(synth_root, "cuhk-pedes", "test")


def test_request_validation():
    with pytest.raises(ValueError, match="task"):
        MLLMRequest("caption", "hi")
    with pytest.raises(ValueError, match="prompt"):
        MLLMRequest("loc", "  ")
    with pytest.raises(ValueError, match="unknown MLLM backend"):
        make_backend("gpt5")


def test_cache_persists_dedups_and_counts(tmp_path, test_split):
    img0, img1 = test_split.gallery_paths[:2]
    inner = CountingBackend()
    cb = CachedBackend(inner, tmp_path / "c")
    reqs = [MLLMRequest("loc", "a", img0), MLLMRequest("loc", "a", img0), MLLMRequest("vqa", "q", img1),
            MLLMRequest("aggr", "t")]
    out = cb.generate(reqs)
    assert out[0] == out[1] == "loc:a:" + Path(img0).name
    assert len(inner.seen) == 3  # in-batch duplicate asked once
    assert cb.calls == {"loc": 1, "vqa": 1, "aggr": 1} and cb.hits == {"loc": 1}
    cb.close()
    # a new process: everything from disk, nothing asked
    inner2 = CountingBackend()
    cb2 = CachedBackend(inner2, tmp_path / "c")
    assert cb2.generate(reqs) == out and inner2.seen == [] and cb2.hits["loc"] == 2
    # same image bytes at another path hit; another image does not
    copy = tmp_path / "copy.png"
    copy.write_bytes(Path(img0).read_bytes())
    cb2.generate([MLLMRequest("loc", "a", str(copy)), MLLMRequest("loc", "a", img1)])
    assert len(inner2.seen) == 1 and inner2.seen[0].image == img1
    # replay-only cache: hits work, misses raise
    rp = CachedBackend(None, tmp_path / "c", identity=inner.identity())
    assert rp.generate(reqs[:1]) == out[:1]
    with pytest.raises(CacheMiss):
        rp.generate([MLLMRequest("loc", "never asked", img0)])


def test_cache_identity_separates_models(tmp_path):
    a, b = CountingBackend(), CountingBackend()
    b.identity = lambda: {"kind": "counting", "v": 2}  # e.g. another adapter hash
    CachedBackend(a, tmp_path).generate([MLLMRequest("aggr", "x")])
    CachedBackend(b, tmp_path).generate([MLLMRequest("aggr", "x")])
    assert len(a.seen) == len(b.seen) == 1


def test_cache_killed_batch_loses_only_that_batch(tmp_path):
    class Dies(CountingBackend):
        def generate(self, requests):
            if any(r.prompt == "boom" for r in requests):
                raise KeyboardInterrupt  # a kill while the batch is in flight
            return super().generate(requests)

    cb = CachedBackend(Dies(), tmp_path)
    cb.generate([MLLMRequest("aggr", "1"), MLLMRequest("aggr", "2")])
    with pytest.raises(KeyboardInterrupt):
        cb.generate([MLLMRequest("aggr", "3"), MLLMRequest("aggr", "boom")])
    assert len(CachedBackend(None, tmp_path, identity=cb.identity())) == 2


def test_oracle_answers_from_ground_truth(synth_root, test_split):
    gt = load_ground_truth(synth_root)
    for rule in ("identity", "consistent"):
        orc = make_backend("oracle", dataset_root=synth_root, loc_rule=rule)
        assert orc.simulated and orc.identity()["simulated"]
        qi = 0
        own = test_split.gallery_paths[test_split.query_image_index[qi]]
        reqs = [MLLMRequest("loc", P.render_loc(test_split.query_texts[qi]), p) for p in test_split.gallery_paths]
        ans = orc.generate(reqs)
        assert is_yes(ans[test_split.query_image_index[qi]])
        for a, pid in zip(ans, test_split.gallery_pids):
            if rule == "identity":
                assert is_yes(a) == (pid == test_split.query_pids[qi])
        if rule == "consistent":  # an ambiguous caption fits other people too, never fewer
            assert sum(map(is_yes, ans)) >= sum(p == test_split.query_pids[qi] for p in test_split.gallery_pids)
    pid1 = test_split.gallery_pids[0] + 1
    vqa = orc.generate([MLLMRequest("vqa", P.render_vqa(), test_split.gallery_paths[0])])[0]
    assert vqa.splitlines()[0].startswith("1. ") and len(vqa.splitlines()) == 15
    assert vqa.splitlines()[2][3:] == vqa_answers(gt["ids"][pid1])[2]
    facts = split_answer_sentences(vqa)
    merged = orc.generate([MLLMRequest("aggr", P.render_aggr("A man walks.", facts))])[0]
    assert merged.startswith("A man walks.") and facts[1] in merged


def test_oracle_errors_are_deterministic_and_rate_matches(synth_root, test_split):
    orc = make_backend("oracle", dataset_root=synth_root, loc_rule="identity", error_rate=0.3, seed=1)
    # several images per caption: the flips depend on the (tmp) image paths, so enough requests that
    # the rate lands in the band on any path (binomial sd ~0.03 at n ~ 200)
    reqs = [MLLMRequest("loc", P.render_loc(t), test_split.gallery_paths[g]) for t in test_split.query_texts
            for g in range(4)]
    a1 = orc.generate(reqs)
    a2 = [orc.generate([r])[0] for r in reversed(reqs)][::-1]  # batching/order does not matter
    assert a1 == a2
    perfect = make_backend("oracle", dataset_root=synth_root, loc_rule="identity").generate(reqs)
    flips = sum(x != y for x, y in zip(a1, perfect)) / len(reqs)
    assert 0.15 < flips < 0.45


def test_oracle_bad_input(tmp_path, synth_root, test_split):
    with pytest.raises(BackendError, match="SynthPEDES"):
        make_backend("oracle", dataset_root=tmp_path)
    orc = make_backend("oracle", dataset_root=synth_root)
    with pytest.raises(BackendError, match="caption not found"):
        orc.generate([MLLMRequest("loc", P.render_loc("A unicorn."), test_split.gallery_paths[0])])
    stray = tmp_path / "x.png"
    stray.write_bytes(Path(test_split.gallery_paths[0]).read_bytes())
    with pytest.raises(BackendError, match="not under"):
        orc.generate([MLLMRequest("vqa", P.render_vqa(), str(stray))])
    json.dumps(orc.identity())
