"""What interactive-retrieval papers report besides Rank-k / mAP / mINP, per round (SPEC §9).

All of them start from one number per query and round: the 0-based rank of the query's
best-ranked true match (:func:`first_match_ranks`, with the project's tie rule: descending
score, equal scores in ascending gallery index). Round 0 is the base ranking.

- Recall@K(t): share of queries with a match in the top K at round t (x100; equals Rank-K).
- Hits@K(t) (ChatIR, PlugIR): share of queries with a match in the top K at ANY round <= t
  (cumulative; a query stays a hit once found).
- mFR(t), mean first rank (ChatPedes / DiaNA): the mean 1-based rank of the first true match
  at round t; lower is better. (Our reading of "mean first rank"; with a single target image it
  is the mean rank of the target.)
- BRI(t), best log-rank integral (PlugIR, arXiv 2406.03411): per query, the best rank reached so
  far, b_s = min over rounds <= s of the rank; BRI is the mean over queries of the trapezoidal
  average of log(b_s + 1) over s = 0..t (0-based ranks, natural log); lower is better; at t = 0
  it is the mean of log(rank + 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def first_match_ranks(similarity: torch.Tensor, query_pids: Sequence[int], gallery_pids: Sequence[int],
                      chunk: int = 1024) -> torch.Tensor:
    """0-based rank of each query's best-ranked match, without sorting a row.

    rank = #(scores above the best match score) + #(equal scores at a lower gallery index)."""
    qp = torch.as_tensor(list(query_pids))
    gp = torch.as_tensor(list(gallery_pids))
    if similarity.shape != (len(qp), len(gp)):
        raise ValueError(f"similarity is {tuple(similarity.shape)}, expected ({len(qp)}, {len(gp)})")
    idx = torch.arange(len(gp))
    out = torch.empty(len(qp), dtype=torch.long)
    for s in range(0, len(qp), chunk):
        S = similarity[s:s + chunk].float()
        match = qp[s:s + chunk, None] == gp[None, :]
        if not match.any(dim=1).all():
            bad = s + int((~match.any(dim=1)).nonzero()[0])
            raise ValueError(f"query {bad} has no match in the gallery (every query needs one)")
        best = torch.where(match, S, torch.full_like(S, -math.inf)).max(dim=1)
        # the best match itself: the lowest gallery index among matches holding that score
        first = torch.where(match & (S == best.values[:, None]), idx, len(gp)).min(dim=1).values
        above = (S > best.values[:, None]).sum(dim=1)
        tied_before = ((S == best.values[:, None]) & (idx[None, :] < first[:, None])).sum(dim=1)
        out[s:s + chunk] = above + tied_before
    return out


def recall_at_k(ranks: torch.Tensor, k: int) -> float:
    return float((ranks < k).float().mean() * 100)


def hits_at_k(rank_history: Sequence[torch.Tensor], k: int) -> list[float]:
    """Hits@K after each round (cumulative over rounds 0..t)."""
    hit = torch.zeros_like(rank_history[0], dtype=torch.bool)
    out = []
    for r in rank_history:
        hit |= r < k
        out.append(float(hit.float().mean() * 100))
    return out


def mean_first_rank(ranks: torch.Tensor) -> float:
    return float((ranks.double() + 1).mean())


def bri(rank_history: Sequence[torch.Tensor]) -> list[float]:
    """BRI after each round t = 0..T (see the module docstring)."""
    best = None
    logs = []
    out = []
    for r in rank_history:
        best = r if best is None else torch.minimum(best, r)
        logs.append(torch.log(best.double() + 1))
        if len(logs) == 1:
            out.append(float(logs[0].mean()))
        else:
            area = sum((a + b) / 2 for a, b in zip(logs[:-1], logs[1:])) / (len(logs) - 1)
            out.append(float(area.mean()))
    return out


def per_round(rank_history: Sequence[torch.Tensor], ks: Sequence[int] = (1, 5, 10)) -> list[dict[str, float]]:
    """One dict per round (0 = base): Recall@K, Hits@K, mFR and BRI, rounded to 4 decimals."""
    hits = {k: hits_at_k(rank_history, k) for k in ks}
    bris = bri(rank_history)
    rows = []
    for t, r in enumerate(rank_history):
        row: dict[str, float] = {"round": t}
        for k in ks:
            row[f"Recall@{k}"] = round(recall_at_k(r, k), 4)
            row[f"Hits@{k}"] = round(hits[k][t], 4)
        row["mFR"] = round(mean_first_rank(r), 4)
        row["BRI"] = round(bris[t], 4)
        rows.append(row)
    return rows
