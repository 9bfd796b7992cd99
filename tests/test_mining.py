"""data_builders.mining on plain feature tensors: selection rules, options, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_builders.mining import MiningOptions, mine, split_identities


def toy(ids: int = 30, per_id: int = 3, caps: int = 2, dim: int = 16, noise: float = 0.9, seed: int = 0):
    """Features with identity structure: images and captions near a per-identity prototype."""
    g = torch.Generator().manual_seed(seed)
    n_img = ids * per_id
    image_pids = torch.arange(n_img) % ids
    caption_image = torch.arange(n_img).repeat_interleave(caps)
    caption_pids = image_pids[caption_image]
    proto = torch.randn(ids, dim, generator=g)
    img = torch.nn.functional.normalize(proto[image_pids] + noise * torch.randn(n_img, dim, generator=g), dim=1)
    txt = torch.nn.functional.normalize(proto[caption_pids] + noise * torch.randn(len(caption_pids), dim, generator=g), dim=1)
    return txt, img, caption_pids, image_pids, caption_image


@pytest.fixture(scope="module")
def data():
    return toy()


def full_ranks(txt, img):
    """rank[c, i] = 0-based position of image i in caption c's descending ranking."""
    order = torch.argsort(txt @ img.T, dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(img.shape[0]).expand_as(order))
    return ranks


def run(data, **kw):
    kw.setdefault("chunk_size", 16)
    return mine(*data, MiningOptions(**kw), progress=False)


def test_yes_is_own_identity_no_is_other_identity_in_top_k(data):
    txt, img, cp, ip, ci = data
    pairs, stats = run(data, negatives_per_caption=2, positives_per_caption=2, top_k=5)
    ranks = full_ranks(txt, img)
    c, i = pairs.caption_index, pairs.image_index
    yes, no = pairs.label, ~pairs.label
    assert (ip[i[yes]] == cp[c[yes]]).all()
    assert (ip[i[no]] != cp[c[no]]).all()
    assert (ranks[c[no], i[no]] < 5).all()
    assert (pairs.rank == ranks[c, i].numpy()).all()  # stored ranks are the true ranks
    # every caption's own image is among its Yes pairs
    own = {(int(cc), int(ii)) for cc, ii in zip(c[yes], i[yes])}
    assert all((k, int(ci[k])) in own for k in range(len(cp)))
    assert stats["yes"] == yes.sum() and stats["no"] == no.sum()
    assert sum(stats["negative_rank_histogram"].values()) == stats["no"]


def test_counts_follow_per_caption_options(data):
    _, _, cp, _, _ = data
    for n_neg, n_pos in [(1, 1), (3, 2), (0, 1), (2, 0)]:
        pairs, _ = run(data, negatives_per_caption=n_neg, positives_per_caption=n_pos, top_k=10)
        yes = np.bincount(pairs.caption_index[pairs.label], minlength=len(cp))
        no = np.bincount(pairs.caption_index[~pairs.label], minlength=len(cp))
        # 3 images per identity: at most 3 positives; top-10 of 90 images always holds >= 3 negatives here
        assert (yes == min(n_pos, 3)).all()
        assert (no == n_neg).all()


def test_yes_no_ratio_and_cap(data):
    pairs, stats = run(data, negatives_per_caption=3, positives_per_caption=1, yes_no_ratio=1.0)
    assert stats["yes"] == stats["no"] == 180
    pairs, stats = run(data, negatives_per_caption=1, positives_per_caption=3, yes_no_ratio=0.5)
    assert stats["no"] == 180 and stats["yes"] == 90 and stats["yes_no_ratio"] == 0.5
    pairs, stats = run(data, negatives_per_caption=3, positives_per_caption=1, yes_no_ratio=0.25, max_pairs=100)
    assert stats["pairs"] == len(pairs) == 100
    assert stats["yes"] == 20 and stats["no"] == 80  # the cap keeps the ratio
    assert stats["yes_before_balance"] == 180 and stats["no_before_balance"] == 540


def test_clean_filter_keeps_captions_with_identity_in_top_r(data):
    txt, img, cp, ip, _ = data
    ranks = full_ranks(txt, img)
    same = ip[None, :] == cp[:, None]
    best = torch.where(same, ranks, torch.full_like(ranks, 10**9)).min(1).values
    for r in (1, 3, 15):
        pairs, stats = run(data, clean_top_r=r, top_k=5)
        expect = set(torch.nonzero(best < r).flatten().tolist())
        assert set(pairs.caption_index.tolist()) == expect
        assert stats["captions_kept"] == len(expect)
    assert 0 < len(set(run(data, clean_top_r=1)[0].caption_index.tolist())) < len(cp)  # the filter bites


def test_hardest_pick_takes_best_ranked_negatives(data):
    pairs, _ = run(data, negatives_per_caption=2, negative_pick="hardest")
    _, _, cp, ip, _ = data
    txt, img = data[0], data[1]
    ranks = full_ranks(txt, img)
    for c in range(0, len(cp), 17):
        order = torch.argsort(ranks[c])
        negs = [int(j) for j in order if ip[j] != cp[c]][:2]
        got = pairs.image_index[(pairs.caption_index == c) & ~pairs.label].tolist()
        assert got == negs


def test_deterministic_for_seed_and_chunk_size(data):
    a, sa = run(data, negatives_per_caption=2, positives_per_caption=2, yes_no_ratio=1.5, seed=3, chunk_size=7)
    b, sb = run(data, negatives_per_caption=2, positives_per_caption=2, yes_no_ratio=1.5, seed=3, chunk_size=1000)
    c, _ = run(data, negatives_per_caption=2, positives_per_caption=2, yes_no_ratio=1.5, seed=4)
    for f in ("caption_index", "image_index", "label", "rank"):
        assert (getattr(a, f) == getattr(b, f)).all()
    assert sa["negative_rank_histogram"] == sb["negative_rank_histogram"]
    assert len(a) != len(c) or not (a.image_index == c.image_index).all()


def test_numpy_inputs_and_settings_recorded(data):
    arrays = [x.numpy() for x in data]
    pairs, stats = mine(*arrays, MiningOptions(top_k=4, seed=9), progress=False)
    assert stats["settings"]["top_k"] == 4 and stats["settings"]["seed"] == 9
    assert len(pairs) == 2 * len(arrays[2])


def test_bad_inputs(data):
    txt, img, cp, ip, ci = data
    with pytest.raises(ValueError, match="same width"):
        mine(txt, img[:, :8], cp, ip, ci, progress=False)
    with pytest.raises(ValueError, match="caption_pids has"):
        mine(txt, img, cp[:-1], ip, ci, progress=False)
    wrong = ci.clone()
    wrong[0] = 1  # image 1 belongs to another identity
    with pytest.raises(ValueError, match="caption 0 has pid"):
        mine(txt, img, cp, ip, wrong, progress=False)
    with pytest.raises(ValueError, match="cannot exceed top_k"):
        MiningOptions(top_k=2, negatives_per_caption=3)
    with pytest.raises(ValueError, match="yes_no_ratio"):
        MiningOptions(yes_no_ratio=0)
    with pytest.raises(ValueError, match="negative_pick"):
        MiningOptions(negative_pick="easy")
    with pytest.raises(ValueError, match="nothing to mine"):
        MiningOptions(negatives_per_caption=0, positives_per_caption=0)


def test_split_identities():
    pids = list(range(40)) * 2
    a = split_identities(pids, 0.1, seed=0)
    assert len(a) == 4 and a == split_identities(pids, 0.1, seed=0)
    assert a != split_identities(pids, 0.1, seed=1)
    assert split_identities(pids, 0.0, 0) == set()
    assert len(split_identities([1, 2], 0.01, 0)) == 1
    with pytest.raises(ValueError):
        split_identities(pids, 1.0, 0)
