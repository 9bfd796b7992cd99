"""Z+/Z- anchor-localization pair mining on features (SPEC §4): pure logic, no I/O.

Input: L2-normalised caption and image features of the *training* split, the person ids of
both, and each caption's own image. Output: (caption, image, Yes/No, rank) pairs.

- Scoring is chunked over captions: one ``chunk x images`` score block at a time, of which only
  the top-K indices/values and the ranks of the chosen positives are kept, so a CUHK-sized split
  (68k x 34k) never holds the full matrix.
- Z+: the caption's own image first, then other images of its identity (seeded order).
- Z-: images of another identity among the caption's top-k (seeded random pick, or the hardest).
- Options: negatives / positives per caption, an overall Yes:No ratio, a clean filter (keep
  captions whose own identity is within the top-R), a cap on pairs, a seed. Every random choice
  comes from one ``numpy`` generator per purpose seeded by ``seed``: same inputs + options give
  the same pairs.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

YES, NO = "Yes", "No"


@dataclass(frozen=True)
class MiningOptions:
    """Settings of the miner; all are recorded in stats.json."""

    top_k: int = 10  # negatives come from the caption's top-k images (SPEC §4: 10)
    negatives_per_caption: int = 1
    positives_per_caption: int = 1
    yes_no_ratio: float | None = None  # overall Yes:No after selection, e.g. 1.0; None keeps all
    clean_top_r: int | None = None  # keep only captions whose identity is within the top-R
    max_pairs: int | None = None  # cap on all pairs (the ratio is kept)
    negative_pick: str = "random"  # "random" among the top-k negatives, or "hardest" first
    seed: int = 0
    chunk_size: int = 1024  # captions scored at once

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.negatives_per_caption < 0 or self.positives_per_caption < 0:
            raise ValueError("negatives_per_caption and positives_per_caption must be >= 0")
        if self.negatives_per_caption > self.top_k:
            raise ValueError(
                f"negatives_per_caption ({self.negatives_per_caption}) cannot exceed top_k ({self.top_k}): "
                "negatives are drawn from the top-k"
            )
        if self.negatives_per_caption == 0 and self.positives_per_caption == 0:
            raise ValueError("negatives_per_caption and positives_per_caption are both 0: nothing to mine")
        if self.yes_no_ratio is not None and not self.yes_no_ratio > 0:
            raise ValueError(f"yes_no_ratio must be > 0 (Yes pairs per No pair), got {self.yes_no_ratio}")
        if self.clean_top_r is not None and self.clean_top_r < 1:
            raise ValueError(f"clean_top_r must be >= 1, got {self.clean_top_r}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {self.max_pairs}")
        if self.negative_pick not in ("random", "hardest"):
            raise ValueError(f"negative_pick must be 'random' or 'hardest', got {self.negative_pick!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Candidates:
    """What scoring keeps per caption."""

    top_idx: torch.Tensor  # [C, K'] image indices by descending score (K' = max(top_k, clean_top_r))
    top_val: torch.Tensor  # [C, K'] their scores
    pos_idx: torch.Tensor  # [C, P] chosen positive image indices, -1 = none
    pos_rank: torch.Tensor  # [C, P] 0-based rank of each positive over all images, -1 = none
    identity_rank: torch.Tensor  # [C] rank of the first image of the caption's identity, -1 if beyond K'


@dataclass
class Pairs:
    """Mined pairs as parallel arrays, sorted by (caption, Yes before No, rank)."""

    caption_index: np.ndarray
    image_index: np.ndarray
    label: np.ndarray  # bool: True = Yes
    rank: np.ndarray  # 0-based rank of the image in the caption's ranking

    def __len__(self) -> int:
        return len(self.caption_index)

    def take(self, keep: np.ndarray) -> "Pairs":
        return Pairs(self.caption_index[keep], self.image_index[keep], self.label[keep], self.rank[keep])


def _as_long(x: Any, name: str, n: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).long().flatten()
    if n is not None and t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, expected {n}")
    return t


def check_inputs(text_feats, image_feats, caption_pids, image_pids, caption_image):
    """Validate shapes and ids; returns tensors."""
    tf = torch.as_tensor(text_feats)
    imf = torch.as_tensor(image_feats)
    if tf.ndim != 2 or imf.ndim != 2 or tf.shape[1] != imf.shape[1]:
        raise ValueError(
            f"caption features {tuple(tf.shape)} and image features {tuple(imf.shape)} must be 2-D with the "
            "same width (were they encoded by the same retriever?)"
        )
    if tf.shape[0] == 0 or imf.shape[0] == 0:
        raise ValueError("no captions or no images to mine from")
    cp = _as_long(caption_pids, "caption_pids", tf.shape[0])
    ip = _as_long(image_pids, "image_pids", imf.shape[0])
    ci = _as_long(caption_image, "caption_image", tf.shape[0])
    if int(ci.min()) < 0 or int(ci.max()) >= imf.shape[0]:
        raise ValueError(f"caption_image indices must lie in [0, {imf.shape[0]}), got {int(ci.min())}..{int(ci.max())}")
    if not torch.equal(ip[ci], cp):
        bad = int((ip[ci] != cp).nonzero()[0])
        raise ValueError(f"caption {bad} has pid {int(cp[bad])} but its own image {int(ci[bad])} has pid {int(ip[ci[bad]])}")
    return tf, imf, cp, ip, ci


def choose_positives(caption_pids: torch.Tensor, image_pids: torch.Tensor, caption_image: torch.Tensor,
                     per_caption: int, seed: int) -> torch.Tensor:
    """[C, per_caption] positive images: the own image, then others of the identity in a seeded
    order; -1 pads identities with fewer images."""
    c = caption_pids.numel()
    out = torch.full((c, per_caption), -1, dtype=torch.long)
    if per_caption == 0:
        return out
    out[:, 0] = caption_image
    if per_caption == 1:
        return out
    by_pid: dict[int, list[int]] = {}
    for j, p in enumerate(image_pids.tolist()):
        by_pid.setdefault(p, []).append(j)
    for i, (p, own) in enumerate(zip(caption_pids.tolist(), caption_image.tolist())):
        others = [j for j in by_pid[p] if j != own]
        if others:
            # a generator per caption: its choice does not depend on the other captions
            order = np.random.default_rng([seed, 1, i]).permutation(len(others))
            sel = [others[o] for o in order[: per_caption - 1]]
            out[i, 1 : 1 + len(sel)] = torch.tensor(sel)
    return out


def score_candidates(
    text_feats: torch.Tensor,
    image_feats: torch.Tensor,
    caption_pids: torch.Tensor,
    image_pids: torch.Tensor,
    pos_idx: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    progress: bool = True,
) -> Candidates:
    """Chunked caption x image scoring; keeps top-k, the positives' ranks and the identity rank."""
    num_c, num_i = text_feats.shape[0], image_feats.shape[0]
    k = min(k, num_i)
    img_t = image_feats.float().T.contiguous()
    top_idx = torch.empty((num_c, k), dtype=torch.long)
    top_val = torch.empty((num_c, k), dtype=torch.float32)
    pos_rank = torch.full_like(pos_idx, -1)
    ident_rank = torch.full((num_c,), -1, dtype=torch.long)
    for lo in tqdm(range(0, num_c, chunk_size), desc="scoring captions x images", disable=not progress,
                   unit="chunk"):
        hi = min(lo + chunk_size, num_c)
        block = text_feats[lo:hi].float() @ img_t  # the only chunk x images matrix alive
        vals, idx = block.topk(k, dim=1)  # sorted, descending
        top_idx[lo:hi], top_val[lo:hi] = idx, vals
        p = pos_idx[lo:hi]
        has = p >= 0
        if bool(has.any()):
            pv = block.gather(1, p.clamp(min=0))
            # rank = images scoring strictly higher (one positive column at a time: chunk x images bools)
            ranks = torch.stack([(block > pv[:, j : j + 1]).sum(1) for j in range(p.shape[1])], 1)
            pos_rank[lo:hi] = torch.where(has, ranks, torch.full_like(ranks, -1))
        same = image_pids[idx] == caption_pids[lo:hi, None]
        first = same.to(torch.int8).argmax(1)
        ident_rank[lo:hi] = torch.where(same.any(1), first, torch.full_like(first, -1))
        del block
    return Candidates(top_idx, top_val, pos_idx, pos_rank, ident_rank)


def select_pairs(cands: Candidates, caption_pids: torch.Tensor, image_pids: torch.Tensor,
                 opts: MiningOptions, clean_captions: Any = None) -> tuple[Pairs, dict[str, Any]]:
    """Apply the clean filters, pick negatives, balance Yes:No, cap; deterministic for the seed.

    ``clean_captions``: caption indices to keep (e.g. RDE's consensus clean set), or None."""
    num_c = caption_pids.numel()
    k = min(opts.top_k, cands.top_idx.shape[1])
    keep_cap = np.ones(num_c, dtype=bool)
    if opts.clean_top_r is not None:
        r = cands.identity_rank.numpy()
        keep_cap = (r >= 0) & (r < opts.clean_top_r)
    if clean_captions is not None:
        idx = np.fromiter(clean_captions, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= num_c):
            raise ValueError(f"the clean set names caption {int(idx.max())}, but the split has {num_c} captions: "
                             "was it written for this dataset's training split?")
        in_set = np.zeros(num_c, dtype=bool)
        in_set[idx] = True
        keep_cap &= in_set
    info: dict[str, Any] = {"captions": int(num_c), "captions_kept": int(keep_cap.sum())}

    # negatives: top-k entries of another identity
    top = cands.top_idx[:, :k]
    is_neg = (image_pids[top] != caption_pids[:, None]).numpy()
    is_neg &= keep_cap[:, None]
    n_neg = opts.negatives_per_caption
    if opts.negative_pick == "random":
        # one key per (caption, slot) drawn up front: the pick of a caption does not depend on
        # which other captions the filter keeps
        keys = np.random.default_rng([opts.seed, 3]).random(is_neg.shape)
    else:
        keys = np.broadcast_to(np.arange(k, dtype=np.float64), is_neg.shape).copy()
    keys[~is_neg] = np.inf
    order = np.argsort(keys, axis=1, kind="stable")[:, :n_neg]
    picked = np.take_along_axis(is_neg, order, 1)
    neg_c, neg_slot = np.nonzero(picked)
    neg_rank = order[neg_c, neg_slot]
    neg_img = top.numpy()[neg_c, neg_rank]
    info["captions_without_negative"] = int((keep_cap & ~is_neg.any(1)).sum())

    pos = cands.pos_idx.numpy()
    pos_ok = (pos >= 0) & keep_cap[:, None]
    pos_c, pos_slot = np.nonzero(pos_ok)
    pos_img = pos[pos_c, pos_slot]
    pos_rank = cands.pos_rank.numpy()[pos_c, pos_slot]

    yes = np.ones(len(pos_c), dtype=bool)
    pairs = Pairs(
        np.concatenate([pos_c, neg_c]).astype(np.int64),
        np.concatenate([pos_img, neg_img]).astype(np.int64),
        np.concatenate([yes, np.zeros(len(neg_c), dtype=bool)]),
        np.concatenate([pos_rank, neg_rank]).astype(np.int64),
    )
    info["yes_before_balance"], info["no_before_balance"] = int(len(pos_c)), int(len(neg_c))
    pairs = _balance(pairs, opts)
    order = np.lexsort((pairs.rank, ~pairs.label, pairs.caption_index))
    return pairs.take(order), info


def _subsample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n >= len(idx):
        return idx
    return np.sort(rng.choice(idx, size=n, replace=False))


def _balance(pairs: Pairs, opts: MiningOptions) -> Pairs:
    """Yes:No ratio first, then the cap (which keeps the ratio)."""
    yes_i = np.nonzero(pairs.label)[0]
    no_i = np.nonzero(~pairs.label)[0]
    rng = np.random.default_rng([opts.seed, 4])
    if opts.yes_no_ratio is not None and len(yes_i) and len(no_i):
        r = opts.yes_no_ratio
        if len(yes_i) > r * len(no_i):
            yes_i = _subsample(yes_i, max(1, round(r * len(no_i))), rng)
        else:
            no_i = _subsample(no_i, max(1, round(len(yes_i) / r)), rng)
    total = len(yes_i) + len(no_i)
    if opts.max_pairs is not None and total > opts.max_pairs:
        n_yes = round(opts.max_pairs * len(yes_i) / total)
        yes_i = _subsample(yes_i, n_yes, rng)
        no_i = _subsample(no_i, opts.max_pairs - n_yes, rng)
    return pairs.take(np.sort(np.concatenate([yes_i, no_i])))


def split_identities(pids: Sequence[int], eval_fraction: float, seed: int) -> set[int]:
    """A seeded set of identities held out for the eval part (at least one when fraction > 0)."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    uniq = np.unique(np.asarray(pids))
    if eval_fraction == 0 or len(uniq) < 2:
        return set()
    n = min(len(uniq) - 1, max(1, round(eval_fraction * len(uniq))))
    return set(np.random.default_rng([seed, 5]).choice(uniq, size=n, replace=False).tolist())


def mine(
    text_feats: Any,
    image_feats: Any,
    caption_pids: Any,
    image_pids: Any,
    caption_image: Any,
    opts: MiningOptions = MiningOptions(),
    progress: bool = True,
    clean_captions: Any = None,
) -> tuple[Pairs, dict[str, Any]]:
    """Mine Z+/Z- pairs. Returns the pairs and statistics (counts, ratio, rank histograms).
    ``clean_captions``: only these caption indices give pairs (RDE's clean set; None: all)."""
    tf, imf, cp, ip, ci = check_inputs(text_feats, image_feats, caption_pids, image_pids, caption_image)
    pos_idx = choose_positives(cp, ip, ci, opts.positives_per_caption, opts.seed)
    k_keep = max(opts.top_k, opts.clean_top_r or 0)
    cands = score_candidates(tf, imf, cp, ip, pos_idx, k_keep, opts.chunk_size, progress)
    pairs, info = select_pairs(cands, cp, ip, opts, clean_captions)
    stats = pair_stats(pairs, cands, info, opts)
    logger.info("mined %d Yes + %d No pairs from %d captions", stats["yes"], stats["no"], stats["captions_kept"])
    return pairs, stats


def pair_stats(pairs: Pairs, cands: Candidates, info: dict[str, Any], opts: MiningOptions) -> dict[str, Any]:
    n_yes = int(pairs.label.sum())
    n_no = int(len(pairs) - n_yes)
    neg_ranks = Counter(pairs.rank[~pairs.label].tolist())
    pos_ranks = pairs.rank[pairs.label]
    ident = cands.identity_rank.numpy()
    return {
        **info,
        "pairs": int(len(pairs)),
        "yes": n_yes,
        "no": n_no,
        "yes_no_ratio": (n_yes / n_no) if n_no else None,
        "negative_rank_histogram": {str(r): int(neg_ranks.get(r, 0)) for r in range(min(opts.top_k, cands.top_idx.shape[1]))},
        "positive_rank": {
            "median": float(np.median(pos_ranks)) if len(pos_ranks) else None,
            "top1": float((pos_ranks == 0).mean()) if len(pos_ranks) else None,
            "top10": float((pos_ranks < 10).mean()) if len(pos_ranks) else None,
        },
        "identity_in_top_k": float(((ident >= 0) & (ident < opts.top_k)).mean()),
        "settings": opts.to_dict(),
    }
