"""RDE's per-sample TAL and consensus selection against plain transcriptions of their rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mllm_tune.rde_objectives import (
    clean_set_quality,
    consensus,
    gmm_clean_probability,
    inject_noise,
    split_clean,
    tal_per_sample,
    weighted_tal,
)


def _tal_by_hand(sim, pids, tau, margin):
    n = len(pids)
    out = []
    sim_t = [list(col) for col in zip(*sim)]
    for i in range(n):
        total = 0.0
        for s in (sim, sim_t):
            pos_idx = [j for j in range(n) if pids[j] == pids[i]]
            neg_idx = [j for j in range(n) if pids[j] != pids[i]]
            ws = [math.exp(s[i][j] / tau) for j in pos_idx]
            pos = sum(w / sum(ws) * s[i][j] for w, j in zip(ws, pos_idx))
            neg = tau * math.log(sum(math.exp(s[i][j] / tau) for j in neg_idx)) if neg_idx else -1e4 * tau
            total += max(0.0, margin - pos + neg)
        out.append(total)
    return out


def test_tal_per_sample_equals_the_formula():
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(6, 6, generator=g, dtype=torch.float64) * 2 - 1
    pids = torch.tensor([0, 0, 1, 2, 2, 3])
    for tau, margin in ((0.015, 0.1), (0.5, 0.3)):
        got = tal_per_sample(sim, pids, tau, margin)
        want = _tal_by_hand(sim.tolist(), pids.tolist(), tau, margin)
        assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-9)
    clean = torch.tensor([1, 0, 1, 1, 0, 1])
    assert float(weighted_tal(sim, pids, clean, 0.5, 0.3)) == pytest.approx(
        sum(c * v for c, v in zip(clean.tolist(), _tal_by_hand(sim.tolist(), pids.tolist(), 0.5, 0.3))))


def test_gmm_finds_the_low_loss_mode_and_split_rules():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(700, generator=g) * 0.2 + 0.1
    noisy = torch.rand(300, generator=g) * 0.3 + 1.0
    p = gmm_clean_probability(torch.cat([clean, noisy]))
    assert (p[:700] > 0.5).float().mean() > 0.98 and (p[700:] < 0.5).float().mean() > 0.98
    # everything above the threshold: the lowest 1% are forced noisy
    forced = split_clean(torch.linspace(0.6, 1.0, 200))
    assert int((~forced).sum()) == 3 and not forced[:3].any()


def test_consensus_rules_by_hand():
    g = torch.Generator().manual_seed(2)
    la = torch.cat([torch.full((50,), 0.1), torch.full((50,), 1.0)]) + torch.rand(100, generator=g) * 0.01
    lb = torch.cat([torch.full((25,), 0.1), torch.full((50,), 1.0), torch.full((25,), 0.1)]) + torch.rand(100, generator=g) * 0.01
    c = consensus(la, lb, disagreement="noisy")
    a, b = c.clean_bge.tolist(), c.clean_tse.tolist()
    assert c.clean.tolist() == [x and y for x, y in zip(a, b)] and sum(c.clean.tolist()) == 25
    coin = consensus(la, lb, disagreement="coin", generator=torch.Generator().manual_seed(0))
    used = coin.clean.tolist()
    assert all(u for u, x, y in zip(used, a, b) if x and y) and not any(u for u, x, y in zip(used, a, b) if not x and not y)
    flipped = [u for u, x, y in zip(used, a, b) if x != y]
    assert 0 < sum(flipped) < len(flipped)  # disagreements: a coin, some kept, some dropped
    assert coin.fractions()["agreed"] == 0.25


def test_noise_protocol_seeded_and_from_file(tmp_path):
    idx = inject_noise(1000, 0.3, seed=5)
    assert (idx == inject_noise(1000, 0.3, seed=5)).all() and sorted(idx.tolist()) == list(range(1000))
    moved = (idx != np.arange(1000)).mean()
    assert 0.28 <= moved <= 0.3
    np.save(tmp_path / "noise.npy", idx)
    assert (inject_noise(1000, 0.0, index_file=tmp_path / "noise.npy") == idx).all()
    with pytest.raises(ValueError, match="expected \\(10,\\)"):
        inject_noise(10, 0.0, index_file=tmp_path / "noise.npy")
    q = clean_set_quality([True, True, False, False], [True, False, True, False])
    assert q["precision"] == 0.5 and q["recall"] == 0.5
