"""Retrieval metrics of text-to-image person re-ID: R1/R5/R10, mAP, mINP (SPEC §3).

The definitions are those of IRRA/RDE: for each query the gallery is sorted by descending
similarity; Rank-k is 1 when a match is among the first k; AP is the non-interpolated mean of
precision@(j+1) over the ranks j holding a match; INP = (#matches) / (1-based rank of the last
match). Each is averaged over queries and multiplied by 100.

How it is computed: no sort of the gallery. All a query's metrics depend only on the 0-based
ranks of its positives, and the rank of a positive with score p is ``#{negatives scoring above
p}`` plus the number of positives before it. To count scores above each positive, every score of
the row goes through one monotone map to an integer bin (about G/4 bins, at most 4,096, over the
positives' range, everything outside it in two end bins) and the bins are histogrammed; a
monotone map never reorders scores across bins, so a score in a higher bin than p is above p and
one in a lower bin is below it. Only the few scores that share a bin with a positive are
compared exactly. That is a handful of elementwise passes over the row (O(G) per query, no
binary search, no G log G sort), exact whatever the map, and chunked over queries so only a
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

# Elements of one chunk x G block: 2**24 scores = 64 MiB per temporary (fewer, larger blocks keep
# the per-operation overhead of a busy machine small; about 260 MB of buffers in all).
_DEFAULT_BLOCK = 1 << 24
# Value bins per row: about G/4 (so a positive's bin holds a few other scores), at most 4,096.
_MAX_BINS = 4096


def _bins_for(num_g: int) -> int:
    return min(_MAX_BINS, max(64, 1 << max(0, (num_g // 4 - 1).bit_length())))


def _max_rows(bins: int) -> int:
    """Rows of one block: their bin ids (row * (bins + 1) + bin) must be exact integers in float32."""
    return (1 << 24) // (bins + 1) - 1


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


class _Workspace:
    """Buffers of one chunk x G block, reused across chunks (fresh large tensors cost page faults)."""

    def __init__(self, rows: int, num_g: int, device: torch.device):
        n = rows * num_g
        self.u = torch.empty(n, dtype=torch.float32, device=device)
        self.bins = torch.empty(n, dtype=torch.int32, device=device)
        self.mask = torch.zeros(-(-n // 8) * 8, dtype=torch.bool, device=device)  # whole int64 words
        self.lane = torch.arange(8, device=device)


def _nonzero_sparse(mask: torch.Tensor, n: int, lane: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries among the first ``n`` of a sparse word-padded mask: look at
    it 8 bytes at a time first (8x fewer elements for ``nonzero``), then inside the hit words."""
    mask[n:] = False
    words = mask.view(torch.int64).nonzero().squeeze(1)
    cand = (words.unsqueeze(1) * 8 + lane).view(-1)
    return cand[mask[cand]]


def _count_above(rows: torch.Tensor, pos_asc: torch.Tensor, pos_gidx: torch.Tensor, valid: torch.Tensor,
                 npos: torch.Tensor, ws: _Workspace, bins_per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row: #scores strictly above each ascending positive [c, pm], and whether a
    negative ties a positive [c]. ``pos_asc`` / ``pos_gidx``: the positives' scores (ascending,
    padded with +inf) and gallery columns; ``valid`` marks the real ones (at least one a row)."""
    c, num_g = rows.shape
    n = c * num_g
    dev = rows.device
    nb = bins_per_row + 1  # bins 0 .. bins_per_row of one row
    # the map: positives' range -> bins 1 .. bins_per_row-1; any width works, it only sets how many
    # scores share a positive's bin (a row with one distinct positive gets a narrow window)
    lo = pos_asc[:, :1]
    span = pos_asc.masked_fill(~valid, float("-inf")).amax(1, keepdim=True) - lo
    span = torch.where(span > 0, span, lo.abs().clamp_min(1e-6))
    scale = ((bins_per_row - 2) / span).clamp(max=1e30)  # finite, so no 0 * inf below
    first = torch.arange(c, device=dev, dtype=torch.float32).unsqueeze(1) * nb  # row r owns bins r*nb .. r*nb+nb-1
    # subtract, multiply, clamp, add, truncate: each step is monotone, so is the map
    u = torch.sub(rows, lo, out=ws.u[:n].view(c, num_g))
    u.mul_(scale).clamp_(-1.0, float(bins_per_row - 1)).add_(first + 1)  # integers below 2**24: exact
    bins = ws.bins[:n]
    bins.copy_(u.view(-1))
    counts = torch.bincount(bins, minlength=c * nb).view(c, nb)
    in_higher_bins = counts.sum(1, keepdim=True) - counts.cumsum(1)  # [r, k] = #scores in bins above k
    pos_bin = bins.view(c, num_g).gather(1, pos_gidx).long().masked_fill(~valid, -1)
    above = in_higher_bins.view(-1)[pos_bin.clamp(min=0)]
    # the exact part: scores in a positive's bin, compared with the positives of their row
    shared = torch.zeros(c * nb, dtype=torch.bool, device=dev)
    shared[pos_bin[valid]] = True
    torch.index_select(shared, 0, bins, out=ws.mask[:n])
    hit = _nonzero_sparse(ws.mask, n, ws.lane)  # flat (row-major) positions
    row = hit // num_g
    val = rows.reshape(-1)[hit].unsqueeze(1)
    same = pos_bin[row] == bins[hit].long().unsqueeze(1)  # hits x pm; padding (-1) never matches
    above.index_add_(0, row, (same & (val > pos_asc[row])).long())
    # each positive equals itself, so more equal scores than positives means a tied negative
    equal = torch.zeros(c, dtype=torch.long, device=dev).index_add_(0, row, (same & (val == pos_asc[row])).any(1).long())
    return above.masked_fill(~valid, 0), equal > npos


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
    bins_per_row = _bins_for(num_g)
    chunk_size = min(chunk_size, _max_rows(bins_per_row), num_q)
    ws = _Workspace(chunk_size, num_g, dev)
    tie_rows = 0
    for lo in range(0, num_q, chunk_size):
        hi = min(lo + chunk_size, num_q)
        rows = sim[lo:hi].contiguous()  # a copy only for transposed input
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
        pos_asc, order = pos_scores.sort(dim=1)  # padding (+inf) stays at the end
        above_all, tied = _count_above(rows, pos_asc, gidx.gather(1, order), valid, npos, ws, bins_per_row)
        pleq = torch.searchsorted(pos_asc, pos_asc, right=True)
        above_pos = npos.unsqueeze(1) - pleq  # #positives strictly above each positive
        neg_above = (above_all - above_pos).masked_fill(~valid, 0)  # [:, k] for the k-th smallest positive
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


def per_query_metrics(
    similarity: Any,
    query_pids: Any,
    gallery_pids: Any,
    chunk_size: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, torch.Tensor]:
    """Each query's ``R{k}`` (0/1), ``AP`` and ``INP`` (float64, not x100), one entry per row.

    A row's values depend on that row alone, so the metrics of a matrix that differs from a known
    one in a few rows (THI's re-ranking) are the known per-query values with those rows replaced:
    see :func:`mean_metrics`.
    """
    sim, q, g = _check_inputs(similarity, query_pids, gallery_pids)
    ranks, valid = _positive_ranks(sim, q, g, chunk_size)
    return _metrics_from_ranks(ranks, valid, ks)


def mean_metrics(per_query: dict[str, torch.Tensor], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """The averages (x100) that :func:`rank_metrics` reports, from :func:`per_query_metrics` values."""
    out = {f"R{k}": float(per_query[f"R{k}"].mean() * 100) for k in ks}
    out["mAP"] = float(per_query["AP"].mean() * 100)
    out["mINP"] = float(per_query["INP"].mean() * 100)
    return out


def rank_metrics(
    similarity: Any,
    query_pids: Any,
    gallery_pids: Any,
    chunk_size: int | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@k, mAP and mINP (x100) of a queries x gallery similarity matrix (SPEC §3).

    Accepts torch tensors (any device), numpy arrays or lists. ``chunk_size`` is the number of
    query rows processed at once (default: about 16M scores per block, at most 4,094 rows). Raises
    ``ValueError`` on a shape mismatch, non-finite scores, or a query whose identity has no image
    in the gallery. Ties: equal scores are ordered by ascending gallery index (a stable
    descending sort).
    """
    return mean_metrics(per_query_metrics(similarity, query_pids, gallery_pids, chunk_size, ks), ks)


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
