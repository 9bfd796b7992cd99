"""mllm_tune.core.metrics: IRRA/RDE definitions, chunking, the tie rule, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mllm_tune.core.metrics import positive_ranks, rank_metrics, rank_metrics_fullsort


def plain_reference(sim, qpids, gpids, ks=(1, 5, 10)) -> dict[str, float]:
    """Loop-by-loop definition of SPEC §3; ties by ascending gallery index."""
    sim = np.asarray(sim, dtype=np.float64)
    out = {f"R{k}": 0.0 for k in ks}
    ap_sum = inp_sum = 0.0
    for i, row in enumerate(sim):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        match = [gpids[j] == qpids[i] for j in order]
        hits = [r for r, m in enumerate(match) if m]
        for k in ks:
            out[f"R{k}"] += float(hits[0] < k)
        ap_sum += sum((n + 1) / (r + 1) for n, r in enumerate(hits)) / len(hits)
        inp_sum += len(hits) / (hits[-1] + 1)
    q = len(sim)
    out = {k: v / q * 100 for k, v in out.items()}
    out["mAP"] = ap_sum / q * 100
    out["mINP"] = inp_sum / q * 100
    return out


def random_case(q: int, g: int, ids: int, seed: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    gp = rng.integers(0, ids, g)
    gp[:ids] = np.arange(ids)  # every identity has an image
    qp = rng.integers(0, ids, q)
    # a random permutation of distinct levels per row: tie-free within each row
    sim = (rng.random((q, g)).argsort(1) / g).astype(np.float32)
    if ties:
        sim = np.round(sim * 4) / 4  # a handful of distinct values: ties everywhere
    return sim, qp, gp


def assert_close(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


@pytest.mark.parametrize("seed,q,g,ids", [(0, 37, 29, 7), (1, 120, 90, 30), (2, 200, 150, 5)])
def test_matches_plain_reference_on_tie_free_data(seed, q, g, ids):
    sim, qp, gp = random_case(q, g, ids, seed)
    assert all(len(np.unique(row)) == g for row in sim)  # tie-free rows
    ref = plain_reference(sim, qp, gp)
    for chunk in (1, 7, None):
        assert_close(rank_metrics(sim, qp, gp, chunk_size=chunk), ref)
    # the public (unstable sort) implementation agrees on tie-free data
    assert_close(rank_metrics_fullsort(sim, qp, gp, stable=False), ref)


def test_hand_computed():
    # gallery by descending score: g0(pid1) g1(pid0) g2(pid2) g3(pid0)
    sim = [[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6]]
    gp = [1, 0, 2, 0]
    m = rank_metrics(sim, [0, 2], gp)
    # query 0: matches at 0-based ranks 1 and 3: AP = (1/2 + 2/4) / 2 = 0.5, INP = 2/4
    # query 1: match at rank 2: AP = 1/3, INP = 1/3
    assert m["R1"] == 0.0 and m["R5"] == 100.0 and m["R10"] == 100.0
    assert m["mAP"] == pytest.approx((50 + 100 / 3) / 2)
    assert m["mINP"] == pytest.approx((50 + 100 / 3) / 2)
    assert set(m) == {"R1", "R5", "R10", "mAP", "mINP"}
    one = rank_metrics([[0.1, 0.2, 0.3]], [5], [5, 6, 7])  # the match is last of 3
    assert one == pytest.approx({"R1": 0.0, "R5": 100.0, "R10": 100.0, "mAP": 100 / 3, "mINP": 100 / 3})


def test_tie_rule_is_gallery_index_order():
    # a positive tied with a negative ranks by gallery index
    assert rank_metrics([[0.5, 0.5]], [0], [1, 0])["R1"] == 0.0  # negative (index 0) first
    assert rank_metrics([[0.5, 0.5]], [0], [0, 1])["R1"] == 100.0
    ranks, valid = positive_ranks([[0.5, 0.5, 0.5, 0.9]], [0], [1, 0, 0, 2])
    assert ranks[0][valid[0]].tolist() == [2, 3]
    # ties among positives alone change nothing: both orders give ranks 1 and 2
    m = rank_metrics([[0.7, 0.5, 0.5]], [0], [1, 0, 0])
    assert m["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)


def test_ties_everywhere_match_stable_reference():
    sim, qp, gp = random_case(150, 80, 9, seed=3, ties=True)
    ref = plain_reference(sim, qp, gp)
    for chunk in (1, 13, None):
        assert_close(rank_metrics(sim, qp, gp, chunk_size=chunk), ref)
    assert_close(rank_metrics_fullsort(sim, qp, gp, stable=True), ref)


def test_input_types_and_devices_agree():
    sim, qp, gp = random_case(40, 30, 6, seed=4)
    base = rank_metrics(sim, qp, gp)
    assert_close(rank_metrics(torch.from_numpy(sim), torch.from_numpy(qp), torch.from_numpy(gp)), base)
    assert_close(rank_metrics(sim.astype(np.float64), qp.tolist(), gp.tolist()), base)
    assert_close(rank_metrics(sim.tolist(), qp.astype(np.float64), gp), base)
    # half precision is widened exactly, so its own ties follow the same rule
    half = torch.from_numpy(sim).half()
    assert_close(rank_metrics(half, qp, gp), plain_reference(half.float().numpy(), qp, gp))


def test_perfect_and_worst_rankings():
    gp = np.array([0, 0, 1, 1, 2])
    qp = np.array([0, 1, 2])
    perfect = (qp[:, None] == gp[None, :]).astype(np.float32) + np.linspace(0, 0.01, 5, dtype=np.float32)
    assert rank_metrics(perfect, qp, gp) == pytest.approx(
        {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}
    )
    m = rank_metrics(-perfect, qp, gp)
    assert m["R1"] == 0.0 and m["mINP"] < 100


def test_bad_inputs():
    sim = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        rank_metrics(sim, [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="shape mismatch"):
        rank_metrics(sim, [0, 1], [0, 1])
    with pytest.raises(ValueError, match="2-D"):
        rank_metrics(np.zeros(3), [0], [0, 1, 2])
    with pytest.raises(ValueError, match=r"1 of 2 queries have no image.*query 1 \(pid 9\)"):
        rank_metrics(sim, [0, 9], [0, 1, 2])
    with pytest.raises(ValueError, match="no image"):
        rank_metrics_fullsort(sim, [0, 9], [0, 1, 2])
    with pytest.raises(ValueError, match="NaN or inf"):
        rank_metrics(np.array([[0.1, np.nan, 0.2]]), [0], [0, 1, 2])
    with pytest.raises(ValueError, match="integer person ids"):
        rank_metrics(sim, [0.5, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="chunk_size"):
        rank_metrics(sim, [0, 1], [0, 1, 2], chunk_size=0)
    with pytest.raises(ValueError, match="empty"):
        rank_metrics(np.zeros((0, 3)), [], [0, 1, 2])


def _stable_ranks(sim: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor) -> list[list[int]]:
    """0-based ranks of each row's positives under a stable descending sort (the tie rule)."""
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    return [(gp[order[i]] == qp[i]).nonzero().flatten().tolist() for i in range(sim.shape[0])]


def _assert_ranks_equal(sim, qp, gp, chunk_size=None):
    sim, qp, gp = torch.as_tensor(sim), torch.as_tensor(qp), torch.as_tensor(gp)
    ranks, valid = positive_ranks(sim, qp, gp, chunk_size=chunk_size)
    got = [ranks[i][valid[i]].tolist() for i in range(sim.shape[0])]
    assert got == _stable_ranks(sim, qp, gp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["wide", "narrow", "one_positive", "huge", "denormal", "constant", "clustered"])
def test_binned_counting_is_exact_on_awkward_scores(case, dtype):
    """The value bins only set speed: ranks equal a stable sort's for scores the bins resolve badly."""
    gen = torch.Generator().manual_seed(7)
    q, g, ids = 23, 1001, 9  # G not a multiple of 8: the word-wise hit search pads
    gp = torch.randint(0, ids, (g,), generator=gen)
    gp[:ids] = torch.arange(ids)
    qp = torch.randint(0, ids, (q,), generator=gen)
    sim = torch.randn(q, g, generator=gen)
    if case == "wide":  # positives spread over the whole row, plus outliers
        sim[:, :5] = torch.tensor([1e6, -1e6, 3e5, -7e4, 1e-3])
    elif case == "narrow":  # positives within a few ulps of each other, negatives in between
        sim = 0.5 + torch.randint(-3, 4, (q, g), generator=gen).float() * 6e-8
    elif case == "one_positive":
        gp = torch.arange(g) % 500  # ids 0..499 twice, 500.. once
        gp[-1] = 999
        qp = torch.full((q,), 999)
    elif case == "huge":
        sim = sim * 1e37
    elif case == "denormal":
        sim = sim * 1e-40
    elif case == "constant":
        sim = torch.full((q, g), 0.25)
    elif case == "clustered":  # many scores share the positives' exact values
        sim = torch.randint(0, 40, (q, g), generator=gen).float() / 40
    sim = sim.to(dtype)  # float32 gets integer sort keys from its bits, float64 from ranks
    for chunk in (None, 5):
        _assert_ranks_equal(sim, qp, gp, chunk)
    ref = plain_reference(sim.numpy(), qp.numpy(), gp.numpy())
    assert_close(rank_metrics(sim, qp, gp), ref)


def test_large_chunk_request_is_capped_and_exact():
    sim, qp, gp = random_case(300, 16, 4, seed=5)
    ref = plain_reference(sim, qp, gp)
    assert_close(rank_metrics(sim, qp, gp, chunk_size=10**6), ref)


def test_ties_everywhere_in_float64():
    sim, qp, gp = random_case(90, 70, 8, seed=6, ties=True)
    sim = sim.astype(np.float64)
    ref = plain_reference(sim, qp, gp)
    for chunk in (1, 11, None):
        assert_close(rank_metrics(sim, qp, gp, chunk_size=chunk), ref)
    _assert_ranks_equal(sim, qp, gp, 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_signed_zeros_are_equal_scores(dtype):
    # -0.0 == 0.0: a tie, so the lower gallery index comes first whatever the sign
    sim = torch.tensor([[0.0, -0.0, -1.0], [-0.0, 0.0, -1.0]], dtype=dtype)
    ranks, valid = positive_ranks(sim, [0, 0], [1, 0, 2])
    assert ranks[valid].tolist() == [1, 1]
    ranks, valid = positive_ranks(sim, [0, 0], [0, 1, 2])
    assert ranks[valid].tolist() == [0, 0]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_give_the_same_ranks_and_restore_the_setting(threads):
    before = torch.get_num_threads()
    sim, qp, gp = random_case(130, 90, 12, seed=8)
    ref = plain_reference(sim, qp, gp)
    try:
        torch.set_num_threads(threads)
        for chunk in (3, 7, None):
            assert_close(rank_metrics(sim, qp, gp, chunk_size=chunk), ref)
            assert torch.get_num_threads() == threads
        _assert_ranks_equal(sim, qp, gp, 4)
        # an error in any block (here the last row, taken by whichever thread) reaches the caller
        bad = sim.copy()
        bad[-1, 3] = np.inf
        with pytest.raises(ValueError, match="row 129 holds NaN or inf"):
            rank_metrics(bad, qp, gp, chunk_size=5)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
