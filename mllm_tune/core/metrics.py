"""Retrieval metrics of text-to-image person re-ID: R1/R5/R10, mAP, mINP (SPEC §3).

The definitions are those of IRRA/RDE: for each query the gallery is sorted by descending
similarity; Rank-k is 1 when a match is among the first k; AP is the non-interpolated mean of
precision@(j+1) over the ranks j holding a match; INP = (#matches) / (1-based rank of the last
match). Each is averaged over queries and multiplied by 100.

How it is computed: no full sort. All a query's metrics depend only on the 0-based ranks of its
positives, and the rank of a positive with score p is ``#{negatives scoring above p}`` plus the
number of positives before it. Counting negatives above each positive needs the positives'
scores sorted (a handful per query) and one ``searchsorted`` of the row into them, i.e.
O(G log P) per query instead of O(G log G), and the work is chunked over queries so only a
``chunk x G`` block is ever held (the Q x G index/match matrices of the public code never exist).

Tie rule (deterministic): gallery items with equal scores are ordered by ascending gallery
index, i.e. exactly what a *stable* descending sort gives. Ties among positives alone never
change the result; a row where a positive ties with a negative is recomputed with a stable sort
of that row. The public implementations use an unstable sort and leave ties undefined; on
tie-free data all agree.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")

# Elements of one chunk x G block; 2**22 int64 = 32 MiB per temporary (more saves no time).
_DEFAULT_BLOCK = 1 << 22


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # noqa: BLE001 - re-raised with the argument name
        raise TypeError(f"{name} must be a torch tensor, numpy array or sequence: {exc}") from exc


def _as_pids(x: Any, name: str, device: torch.device) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one person id per row/column), got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point:
        if not torch.equal(t, t.round()):
            raise ValueError(f"{name} must hold integer person ids, got non-integer values")
    elif t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"{name} must hold integer person ids, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def _check_inputs(similarity: Any, query_pids: Any, gallery_pids: Any):
    sim = _as_tensor(similarity, "similarity")
    if sim.ndim != 2:
        raise ValueError(f"similarity must be a 2-D queries x gallery matrix, got shape {tuple(sim.shape)}")
    if not sim.dtype.is_floating_point:
        sim = sim.to(torch.float32)
    elif sim.dtype in (torch.float16, torch.bfloat16):
        sim = sim.to(torch.float32)  # exact, so ties stay ties
    q = _as_pids(query_pids, "query_pids", sim.device)
    g = _as_pids(gallery_pids, "gallery_pids", sim.device)
    if sim.shape[0] != q.numel() or sim.shape[1] != g.numel():
        raise ValueError(
            f"shape mismatch: similarity is {tuple(sim.shape)} (queries x gallery) but there are "
            f"{q.numel()} query pids and {g.numel()} gallery pids"
        )
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity is empty ({tuple(sim.shape)}): need at least one query and one gallery item")
    return sim, q, g


def _missing_positive_error(qpids: torch.Tensor, bad: torch.Tensor) -> ValueError:
    idx = bad.nonzero().flatten()
    first = ", ".join(f"query {int(i)} (pid {int(qpids[i])})" for i in idx[:5])
    return ValueError(
        f"{idx.numel()} of {qpids.numel()} queries have no image of their identity in the gallery "
        f"(first: {first}); every query needs at least one match. Check that queries and gallery "
        "come from the same split and that pids use the same numbering."
    )


def _metrics_from_ranks(ranks: torch.Tensor, valid: torch.Tensor, ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per-query metrics from the ascending 0-based ranks of the positives.

    ``ranks`` is rows x P (padded), ``valid`` marks real positives, which come first in a row.
    """
    ranks = ranks.to(torch.float64)
    n_pos = valid.sum(1)
    j = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64, device=ranks.device)
    prec = torch.where(valid, j / (ranks + 1.0), torch.zeros((), dtype=torch.float64, device=ranks.device))
    ap = prec.sum(1) / n_pos
    last = ranks.gather(1, (n_pos - 1).unsqueeze(1)).squeeze(1)
    inp = n_pos.to(torch.float64) / (last + 1.0)
    first = ranks[:, 0]
    out = {f"R{k}": (first < k).to(torch.float64) for k in ks}
    out["AP"] = ap
    out["INP"] = inp
    return out


def _ranks_by_stable_sort(rows: torch.Tensor, qp: torch.Tensor, g: torch.Tensor, width: int):
    """Positive ranks of a few rows via a stable descending sort (the tie rule's reference)."""
    order = torch.sort(rows, dim=1, descending=True, stable=True).indices
    match = g[order] == qp.unsqueeze(1)
    n_pos = match.sum(1)
    # ascending rank positions of matches, padded with G
    pos = torch.where(match, torch.arange(rows.shape[1], device=rows.device), rows.shape[1])
    ranks = pos.sort(dim=1).values[:, :width]
    valid = torch.arange(width, device=rows.device).unsqueeze(0) < n_pos.unsqueeze(1)
    return ranks, valid


def positive_ranks(
    similarity: Any,
    query_pids: Any,
    gallery_pids: Any,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of every query's positives, ascending, as (ranks [Q,Pmax], valid [Q,Pmax]).

    Useful when a caller needs more than the averages (per-query analysis, THI).
    """
    sim, q, g = _check_inputs(similarity, query_pids, gallery_pids)
    return _positive_ranks(sim, q, g, chunk_size)


def _positive_ranks(sim: torch.Tensor, q: torch.Tensor, g: torch.Tensor, chunk_size: int | None):
    num_q, num_g = sim.shape
    dev = sim.device
    # CSR view of the gallery grouped by pid, so a query's positives are one slice (no Q x G mask).
    g_order = torch.sort(g, stable=True).indices
    uniq, counts = torch.unique_consecutive(g[g_order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.searchsorted(uniq, q).clamp(max=uniq.numel() - 1)
    has_pos = uniq[slot] == q
    if not bool(has_pos.all()):
        raise _missing_positive_error(q, ~has_pos)
    n_pos_all = counts[slot]
    p_max = int(n_pos_all.max())
    ranks_out = torch.empty((num_q, p_max), dtype=torch.long, device=dev)
    valid_out = torch.arange(p_max, device=dev).unsqueeze(0) < n_pos_all.unsqueeze(1)

    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_BLOCK // max(num_g, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    tie_rows = 0
    for lo in range(0, num_q, chunk_size):
        hi = min(lo + chunk_size, num_q)
        rows = sim[lo:hi].contiguous()  # a copy only for transposed input; searchsorted needs it
        # a row sum is finite unless the row holds NaN/inf (or overflows: then check elementwise)
        if not bool(torch.isfinite(rows.sum(1)).all()) and not bool(torch.isfinite(rows).all()):
            bad = int((~torch.isfinite(rows)).any(1).nonzero()[0]) + lo
            raise ValueError(f"similarity row {bad} holds NaN or inf; scores must be finite")
        c = hi - lo
        npos = n_pos_all[lo:hi]
        pm = int(npos.max())
        col = torch.arange(pm, device=dev).unsqueeze(0)
        valid = col < npos.unsqueeze(1)
        gidx = g_order[(starts[slot[lo:hi]].unsqueeze(1) + col).clamp(max=num_g - 1)]
        pos_scores = rows.gather(1, gidx).masked_fill(~valid, float("inf"))
        pos_asc = pos_scores.sort(dim=1).values  # padding (+inf) stays at the end
        # less[v] = #positives strictly below v; every gallery item v with less[v] >= k scores above
        # the k-th smallest positive.
        less = torch.searchsorted(pos_asc, rows)
        hist = torch.zeros((c, pm + 1), dtype=torch.long, device=dev)
        hist.scatter_add_(1, less, torch.ones((), dtype=torch.long, device=dev).expand_as(less))
        # v equals some positive iff the first positive not below it equals v; each positive
        # matches itself, so any extra match is a negative tied with a positive.
        first_geq = pos_asc.gather(1, less.clamp_(max=pm - 1))  # less is not needed after this
        tied = (first_geq == rows).sum(1) > npos
        del less, first_geq
        pleq = torch.searchsorted(pos_asc, pos_asc, right=True)
        above_all = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [:, k-1] = #gallery above k-th smallest
        above_pos = npos.unsqueeze(1) - pleq  # #positives strictly above each positive
        neg_above = (above_all - above_pos).masked_fill(~valid, 0)
        # descending j-th positive (j = 1..P) is the ascending (P - j + 1)-th; its rank is the
        # negatives above it plus the j-1 positives before it (ties among positives are harmless).
        asc_pos = (npos.unsqueeze(1) - 1 - col).clamp(min=0)
        ranks = neg_above.gather(1, asc_pos) + col
        if bool(tied.any()):
            t = tied.nonzero().flatten()
            tie_rows += t.numel()
            r2, _ = _ranks_by_stable_sort(rows[t], q[lo:hi][t], g, pm)
            ranks[t] = r2
        ranks_out[lo:hi, :pm] = ranks.masked_fill(~valid, 0)
        if pm < p_max:
            ranks_out[lo:hi, pm:] = 0
    if tie_rows:
        logger.info("%d of %d queries had a positive tied with a negative (ordered by gallery index)", tie_rows, num_q)
    return ranks_out, valid_out


def rank_metrics(
    similarity: Any,
    query_pids: Any,
    gallery_pids: Any,
    chunk_size: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@k, mAP and mINP (x100) of a queries x gallery similarity matrix (SPEC §3).

    Accepts torch tensors (any device), numpy arrays or lists. ``chunk_size`` is the number of
    query rows processed at once (default: about 16M scores per block). Raises ``ValueError`` on
    a shape mismatch, non-finite scores, or a query whose identity has no image in the gallery.
    Ties: equal scores are ordered by ascending gallery index (a stable descending sort).
    """
    sim, q, g = _check_inputs(similarity, query_pids, gallery_pids)
    ranks, valid = _positive_ranks(sim, q, g, chunk_size)
    per_q = _metrics_from_ranks(ranks, valid, ks)
    out = {f"R{k}": float(per_q[f"R{k}"].mean() * 100) for k in ks}
    out["mAP"] = float(per_q["AP"].mean() * 100)
    out["mINP"] = float(per_q["INP"].mean() * 100)
    return out


def rank_metrics_fullsort(
    similarity: Any,
    query_pids: Any,
    gallery_pids: Any,
    ks: Sequence[int] = (1, 5, 10),
    stable: bool = True,
) -> dict[str, float]:
    """The straightforward reference: argsort every row, build the full Q x G match matrix.

    Kept as the plain definition for tests and for ``bench/bench_metrics.py``; it holds several
    Q x G matrices at once, so do not use it on large inputs.
    """
    sim, q, g = _check_inputs(similarity, query_pids, gallery_pids)
    order = torch.argsort(sim, dim=1, descending=True, stable=stable)
    match = g[order] == q.unsqueeze(1)
    del order
    n_pos = match.sum(1)
    if bool((n_pos == 0).any()):
        raise _missing_positive_error(q, n_pos == 0)
    prec = match.cumsum(1).to(torch.float32)  # matches so far at each rank
    prec.div_(torch.arange(1, sim.shape[1] + 1, dtype=torch.float32, device=sim.device)).mul_(match)
    ap = prec.sum(1, dtype=torch.float64) / n_pos
    del prec
    last = sim.shape[1] - 1 - match.flip(1).to(torch.int8).argmax(1)
    inp = n_pos.to(torch.float64) / (last.to(torch.float64) + 1.0)
    out = {f"R{k}": float(match[:, :k].any(1).double().mean() * 100) for k in ks}
    out["mAP"] = float(ap.mean() * 100)
    out["mINP"] = float(inp.double().mean() * 100)
    return out


def format_metrics(metrics: dict[str, float], name: str = "") -> str:
    """One markdown table row: | name | R1 | R5 | R10 | mAP | mINP |."""
    cells = [name] + [f"{metrics[k]:.2f}" for k in METRIC_KEYS if k in metrics]
    return "| " + " | ".join(cells) + " |"
