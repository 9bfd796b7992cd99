"""Peer metrics on hand-computed cases: first-match rank (with the tie rule), Recall@K vs the
project's Rank-K, cumulative Hits@K, mFR and PlugIR's BRI."""

from __future__ import annotations

import math

import pytest
import torch

from eval.peer_metrics import bri, first_match_ranks, hits_at_k, mean_first_rank, per_round
from mllm_tune.core.metrics import rank_metrics


def test_first_match_rank_by_hand_and_ties():
    gp = [0, 1, 0, 2]
    S = torch.tensor([[0.9, 0.8, 0.1, 0.5],    # query of id 0: gallery 0 first -> rank 0
                      [0.9, 0.8, 0.1, 0.5],    # id 1: below 0.9 -> rank 1
                      [0.9, 0.5, 0.1, 0.95],   # id 2: best -> 0
                      [0.7, 0.7, 0.7, 0.7]])   # id 1, all tied: gallery 0 comes first -> rank 1
    assert first_match_ranks(S, [0, 1, 2, 1], gp).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="query 0 has no match"):
        first_match_ranks(S[:1], [5], gp)


def test_recall_equals_rank_k_of_the_metrics_module():
    g = torch.Generator().manual_seed(0)
    S = torch.rand(50, 40, generator=g)
    qp, gp = torch.randint(0, 8, (50,), generator=g).tolist(), (list(range(8)) * 5)
    r = first_match_ranks(S, qp, gp, chunk=7)
    m = rank_metrics(S, qp, gp)
    for k in (1, 5, 10):
        assert per_round([r], ks=(k,))[0][f"Recall@{k}"] == pytest.approx(m[f"R{k}"], abs=1e-3)


def test_hits_mfr_bri_by_hand():
    # two queries over three rounds (0-based first-match ranks)
    hist = [torch.tensor([3, 0]), torch.tensor([0, 2]), torch.tensor([5, 1])]
    assert hits_at_k(hist, 1) == [50.0, 100.0, 100.0]   # query 0 found in round 1 stays found
    assert mean_first_rank(hist[0]) == 2.5              # (4 + 1) / 2
    # best ranks so far: q0 3,0,0 and q1 0,0,0; q0 log-ranks ln4,0,0: trapezoid averages ln4 (t=0), ln4/2, ln4/4
    assert bri(hist) == pytest.approx([math.log(4) / 2, math.log(4) / 4, math.log(4) / 8])
    row = per_round(hist, ks=(1,))[2]
    assert row["Recall@1"] == 0.0 and row["Hits@1"] == 100.0 and row["mFR"] == 4.0
