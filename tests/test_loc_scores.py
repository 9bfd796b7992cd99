"""T_loc as a score (issue 13): p_yes from the hf backend's single forward pass and the oracle,
stored in the answer cache, and the THI gate / options / ξ x τ grid built on it."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import pytest
import torch

from eval.thi import THIConfig, run_thi
from mllm_tune.core.backends import CachedBackend, CacheMiss, LocAnswer, MLLMRequest, make_backend
from mllm_tune.core.backends.cache import merge_caches
from mllm_tune.core.pedes import load_split
from mllm_tune.core.prompts import DEFAULT_PROMPTS as P
from mllm_tune.core.prompts import is_yes
from mllm_tune.core.yes_no import p_yes_from_logits, p_yes_from_logprobs, yes_no_ids
from synthpedes.demo_assets import demo_model

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def split(synth_root):
    return load_split(synth_root, "cuhk-pedes", "test")


def _loc_requests(split, n: int) -> list[MLLMRequest]:
    Q, G = len(split.query_texts), len(split.gallery_paths)
    return [MLLMRequest("loc", P.render_loc(split.query_texts[i % Q]), split.gallery_paths[(7 * i + i // Q + 3) % G])
            for i in range(n)]


# -- the Yes/No maths ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_yes_no_ids_on_each_tiny_family(tiny_models, family):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_models(family))
    ids = yes_no_ids(proc)
    tok = proc.tokenizer
    assert "Yes" in ids.yes_strings and "No" in ids.no_strings
    assert not set(ids.yes) & set(ids.no)
    for i, s in zip(ids.all, ids.yes_strings + ids.no_strings):
        assert tok(s, add_special_tokens=False)["input_ids"] == [i]  # a variant is used only as one token
        assert tok.decode([i]) == s


def test_shipped_tokenizer_ids_as_documented():
    from transformers import AutoTokenizer

    ids = yes_no_ids(AutoTokenizer.from_pretrained(demo_model("synthpedes-vl")))
    assert ids.as_dict() == {"yes": {"Yes": 551, "yes": 686, " Yes": 692},
                             "no": {"No": 284, "no": 286, " No": 689, " no": 287}}


def test_p_yes_is_the_renormalised_softmax():
    from mllm_tune.core.yes_no import YesNoIds

    ids = YesNoIds((1, 4), (2,), ("Yes", "yes"), ("No",))
    logits = torch.tensor([[0.3, 2.0, -1.0, 5.0, 0.5], [10.0, -3.0, 4.0, 0.0, -50.0]])
    p = torch.softmax(logits, -1)
    want = (p[:, 1] + p[:, 4]) / (p[:, 1] + p[:, 4] + p[:, 2])
    assert torch.allclose(p_yes_from_logits(logits, ids), want, atol=1e-6)
    lp = torch.log_softmax(logits, -1)
    for row in range(2):
        table = {i: float(lp[row, i]) for i in range(5)}
        assert p_yes_from_logprobs(table, (1, 4), (2,)) == pytest.approx(float(want[row]), abs=1e-6)
    assert p_yes_from_logprobs({"Yes": -0.1}, ("Yes",), ("No",)) == 1.0  # No absent from the top list
    assert p_yes_from_logprobs({"The": -0.1}, ("Yes",), ("No",)) is None


# -- hf: one forward pass ------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_hf_localize_batched_equals_single_and_full_logits(tiny_models, split, family):
    be = make_backend("hf", model=str(tiny_models(family)), batch_size=8, max_new_tokens=4, loc_answer="forward")
    reqs = _loc_requests(split, 6)
    reqs.append(MLLMRequest("loc", P.render_loc(split.query_texts[0] + " She carries a bag."), None))  # text only
    batched = be.localize(reqs)
    single = [be.localize([r])[0] for r in reqs]
    for a, b in zip(batched, single):
        assert 0.0 <= a.p_yes <= 1.0 and abs(a.p_yes - b.p_yes) < 1e-5 and a.text == b.text
    # the same number as the softmax of a plain forward's full logits at the last prompt position
    inputs = be._inputs(reqs[:1])
    with torch.no_grad():
        full = be._model(**inputs).logits[:, -1, :]
    assert abs(float(p_yes_from_logits(full, be.yes_no())[0]) - batched[0].p_yes) < 1e-5
    # the forward answer is constrained to Yes/No: the greedy first token when that is Yes/No
    texts = be.generate(reqs)
    n_other = 0
    for a, t, r in zip(batched, texts, reqs):
        top = int(torch.argmax(be._next_token_logits([r], True)))
        assert a.text == ("Yes" if a.p_yes > 0.5 else "No")
        if top in be.yes_no().all:
            assert a.text == ("Yes" if top in be.yes_no().yes else "No") and t.startswith(a.text[0])
        else:
            n_other += 1
    assert be.loc_first_not_yes_no == 2 * n_other  # counted in the batched and in the single calls


@pytest.fixture(scope="module")
def shipped_hf():
    be = make_backend("hf", model=str(demo_model("synthpedes-vl")), batch_size=16, max_new_tokens=8)
    yield be
    be.close()


class Spy:
    """Records every T_loc request THI sends through ``localize``."""

    def __init__(self, inner):
        self.inner, self.kind, self.simulated, self.scores_loc = inner, inner.kind, inner.simulated, True
        self.loc: list[MLLMRequest] = []

    def identity(self):
        return self.inner.identity()

    def localize(self, reqs):
        self.loc += list(reqs)
        return self.inner.localize(reqs)

    def generate(self, reqs):
        return self.inner.generate(reqs)

    def close(self):
        pass


def _base_and_feats(split, Q: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    G = len(split.gallery_paths)
    base = torch.rand(Q, G, generator=g) * 0.6 + 0.2
    feats = torch.nn.functional.normalize(torch.randn(G, 16, generator=g), dim=-1)

    def encode(texts):
        return torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(len(t))) for t in texts])

    return base, feats, encode


def test_p_yes_agrees_with_greedy_text_on_every_loc_call_of_a_thi_run(shipped_hf, split):
    Q = 24
    base, feats, encode = _base_and_feats(split, Q)
    spy = Spy(shipped_hf)
    texts = split.query_texts[:Q]
    scored = run_thi(base, texts, split.gallery_paths, spy, encode, feats, THIConfig(rounds=3, xi=0.5, batch_size=8),
                     progress=False)
    assert len(spy.loc) >= Q
    greedy = shipped_hf.generate(spy.loc)
    answers = shipped_hf.localize(spy.loc)  # loc_answer="generate": the greedy text itself, plus p_yes
    assert [a.text for a in answers] == greedy
    assert shipped_hf.loc_first_not_yes_no == 0  # the shipped model always starts with a Yes/No token
    first_yes = [t.split()[0].strip(".,").lower().startswith("yes") for t in greedy]
    assert set(first_yes) == {True, False}  # both answers occur, so agreement can fail
    fwd = make_backend("hf", model=str(demo_model("synthpedes-vl")), batch_size=16, loc_answer="forward")
    quick = fwd.localize(spy.loc)
    for a, q, y in zip(answers, quick, first_yes):
        assert (a.p_yes > 0.5) == y == (q.text == "Yes")  # p_yes decides as the greedy first token
        assert abs(a.p_yes - q.p_yes) < 1e-4  # generate's first step = the single forward pass
    # the τ = 0.5 run decides exactly as the text rule (the greedy first token is the decision here)
    at_half = run_thi(base, texts, split.gallery_paths, shipped_hf, encode, feats,
                      THIConfig(rounds=3, xi=0.5, batch_size=8, tau=0.5), progress=False)
    same = [(d.refined_round, d.anchor) for d in scored.decisions]
    assert [(d.refined_round, d.anchor) for d in at_half.decisions] == same
    assert all(p is not None for d in scored.decisions for p in d.p_yes.values())
    fast = run_thi(base, texts, split.gallery_paths, fwd, encode, feats, THIConfig(rounds=3, xi=0.5, batch_size=8),
                   progress=False)
    if all(is_yes(t) == y for t, y in zip(greedy, first_yes)):  # no "No ... yes" ramble among these calls
        assert [(d.refined_round, d.anchor) for d in fast.decisions] == same


# -- the oracle, the cache and the THI options ----------------------------------------------------

@pytest.fixture(scope="module")
def oracle(synth_root):
    return make_backend("oracle", dataset_root=synth_root, error_rate=0.1)


def test_oracle_p_yes_is_on_the_side_of_its_answer(oracle, split):
    reqs = _loc_requests(split, 60)
    out = oracle.localize(reqs)
    assert [a.text for a in out] == oracle.generate(reqs)
    assert all((a.p_yes > 0.5) == (a.text == "Yes") and 0 <= a.p_yes <= 1 for a in out)
    assert len({round(a.p_yes, 3) for a in out}) > 10  # graded, not two values


def _old_cache(path: Path) -> None:
    """An answer cache as written before p_yes existed (7 columns)."""
    con = sqlite3.connect(path)
    con.executescript("""CREATE TABLE answers (key TEXT PRIMARY KEY, identity TEXT NOT NULL, task TEXT NOT NULL,
        prompt TEXT NOT NULL, image TEXT, answer TEXT NOT NULL, created REAL NOT NULL);
        CREATE TABLE identities (hash TEXT PRIMARY KEY, identity TEXT NOT NULL);""")
    con.commit()
    con.close()


def test_cache_stores_p_yes_and_reasks_old_entries_only_for_scores(oracle, split, tmp_path):
    reqs = _loc_requests(split, 5)
    _old_cache(tmp_path / "answers.sqlite")
    text_only = CachedBackend(Spy(oracle), tmp_path)
    text_only.generate(reqs)  # old-style entries: text, no score
    assert text_only.calls["loc"] == 5
    text_only.close_cache()
    c = CachedBackend(oracle, tmp_path)
    again = c.localize(reqs)  # no score needed: the text entries are reused
    assert c.calls["loc"] == 0 and all(a.p_yes is None for a in again)
    scored = c.localize(reqs, need_score=True)  # a score is needed: asked once, stored
    assert c.calls["loc"] == 5 and [a.p_yes for a in scored] == [a.p_yes for a in oracle.localize(reqs)]
    assert [a.p_yes for a in c.localize(reqs, need_score=True)] == [a.p_yes for a in scored] and c.calls["loc"] == 5
    c.close_cache()
    replay = CachedBackend(None, tmp_path, identity=oracle.identity())
    assert [a.p_yes for a in replay.localize(reqs, need_score=True)] == [a.p_yes for a in scored]
    more = _loc_requests(split, 7)[5:]
    CachedBackend(oracle, tmp_path / "other").generate(more)
    with pytest.raises(CacheMiss, match="scored"):
        CachedBackend(None, tmp_path / "other", identity=oracle.identity()).localize(more, need_score=True)


def test_merge_keeps_a_score_over_an_unscored_answer(oracle, split, tmp_path):
    reqs = _loc_requests(split, 4)
    _old_cache(tmp_path / "a.sqlite")
    a = CachedBackend(oracle, tmp_path / "a")
    a.generate(reqs)
    a.close_cache()
    b = CachedBackend(oracle, tmp_path / "b")
    b.localize(reqs, need_score=True)
    b.close_cache()
    old = tmp_path / "old.sqlite"
    _old_cache(old)
    rows = merge_caches(tmp_path / "m" / "answers.sqlite", [tmp_path / "a", old, tmp_path / "b"])
    assert rows == 4
    m = CachedBackend(None, tmp_path / "m", identity=oracle.identity())
    assert all(x.p_yes is not None for x in m.localize(reqs, need_score=True))


def test_options_max_p_anchor_and_fusion(oracle, split):
    Q = 30
    base, feats, encode = _base_and_feats(split, Q, seed=1)
    texts, paths = split.query_texts[:Q], split.gallery_paths
    first = run_thi(base, texts, paths, oracle, encode, feats, THIConfig(rounds=4, xi=0.9), progress=False)
    maxp = run_thi(base, texts, paths, oracle, encode, feats, THIConfig(rounds=4, xi=0.9, anchor="max-p"),
                   progress=False)
    moved = 0
    for d in maxp.decisions:
        # ξ = 0.9 is above every top-1 here: round 0 is asked but cannot accept, rounds 1.. can
        assert set(d.loc) == set(range(4))
        yes = {r: p for r, p in d.p_yes.items() if p > 0.5}
        best = max(yes, key=lambda r: (yes[r], -r)) if yes else None
        assert d.refined_round == (None if best in (None, 0) else best)
        f = first.decisions[d.query]
        moved += f.refined_round != d.refined_round
    assert moved > 0  # the option changes some anchors
    assert sum(map(len, (d.loc for d in maxp.decisions))) >= sum(map(len, (d.loc for d in first.decisions)))
    # fusion: weight 0 is the plain run; weight w moves exactly the asked candidates by w (p - 0.5)
    fused = run_thi(base, texts, paths, oracle, encode, feats, THIConfig(rounds=4, xi=0.9, fuse=0.2), progress=False)
    plain, f_s = first.scores(), fused.scores()
    for d in fused.decisions:
        want = plain[d.query].clone()
        for r, p in d.p_yes.items():
            want[d.candidates[r]] += 0.2 * (p - 0.5)
        assert torch.allclose(f_s[d.query], want, atol=1e-6)
    qp, gp = [0] * Q, [1] * len(paths)
    qp = list(split.query_pids[:Q])
    gp = list(split.gallery_pids)
    from mllm_tune.core.metrics import rank_metrics

    assert fused.metrics(qp, gp) == pytest.approx(rank_metrics(f_s, qp, gp), abs=1e-4)


def test_tau_grid_replays_without_a_loc_call(synth_root, tmp_path):
    from eval.icl_end2end import main

    argv = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", "synth-bow",
            "--mllm", "oracle", "--oracle-error-rate", "0.1", "--rounds", "3", "--out", str(tmp_path / "o"),
            "--no-progress", "--no-plots", "--tau-sweep", "0.3", "0.5", "0.8"]
    res = main(argv)
    grid = res["tau_grid"]
    assert len(grid) == 3 * len({e["xi"] for e in res["xi_sweep"]}) and "loc" not in res["tau_grid_backend_calls"]
    assert res["config"]["tau"] is None and res["loc_scores"]["scored"] == res["loc_scores"]["answers"] > 0
    # oracle answers are Yes exactly when p_yes > 0.5: the τ = 0.5 cell at the run's ξ is the run itself
    cell = next(e for e in grid if e["tau"] == 0.5 and e["xi"] == res["config"]["xi"])
    assert {k: cell[k] for k in ("R1", "mAP")} == {k: res["rounds"][-1][k] for k in ("R1", "mAP")}
    assert len({(e["R1"], e["mAP"]) for e in grid}) > 1
    rows = [json.loads(line) for line in (tmp_path / "o" / "decisions.jsonl").read_text().splitlines()]
    assert all(set(r["p_yes"]) == set(r["loc"]) and all(0 <= p <= 1 for p in r["p_yes"].values()) for r in rows)
    # a τ run replays the same cache: decisions by p_yes, not one T_loc call
    at = main(argv[:-4] + ["--tau", "0.8", "--xi-sweep"])
    assert "loc" not in at["backend_calls"] or at["backend_calls"]["loc"] == 0
    cell = next(e for e in grid if e["tau"] == 0.8 and e["xi"] == res["config"]["xi"])
    assert at["rounds"][-1]["R1"] == cell["R1"] and at["config"]["loc_decision"] == "p_yes > 0.8"
    assert not math.isnan(at["rounds"][-1]["mAP"])


def test_bad_tau_is_a_clear_error(synth_root, tmp_path):
    from eval.icl_end2end import main

    with pytest.raises(SystemExit, match="τ must be in"):
        main(["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", "synth-bow",
              "--mllm", "oracle", "--out", str(tmp_path / "o"), "--no-progress", "--no-plots", "--tau", "1.5"])


def test_loc_answer_rejects_a_probability_out_of_range():
    with pytest.raises(ValueError):
        LocAnswer("Yes", 1.2)


def test_loc_score_report_for_every_backend_kind():
    """results.json's loc_scores: the first-token counter where a backend keeps one (hf, vllm), the hf
    answer mode only for hf. A vllm run used to end in AttributeError here, after all its answers."""
    from types import SimpleNamespace as NS

    from eval.icl_end2end import loc_score_report

    res = NS(decisions=[NS(p_yes={0: 0.9, 1: None}), NS(p_yes={0: 0.3})])
    hf_like = NS(loc_first_not_yes_no=2, loc_answer="forward")
    vllm_like = NS(loc_first_not_yes_no=1)
    openai_like = NS()
    common = {"answers": 3, "scored": 2, "mean_p_yes": 0.6}
    assert loc_score_report(res, hf_like) == {**common, "first_token_not_yes_no": 2, "hf_loc_answer": "forward"}
    assert loc_score_report(res, vllm_like) == {**common, "first_token_not_yes_no": 1}
    assert loc_score_report(res, openai_like) == common
