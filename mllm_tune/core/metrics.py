"""Retrieval metrics of text-to-image person re-ID: R1/R5/R10, mAP, mINP (SPEC §3).

The definitions are those of IRRA/RDE: for each query the gallery is sorted by descending
similarity; Rank-k is 1 when a match is among the first k; AP is the non-interpolated mean of
precision@(j+1) over the ranks j holding a match; INP = (#matches) / (1-based rank of the last
match). Each is averaged over queries and multiplied by 100.

How it is computed: no sort of the gallery. All a query's metrics depend only on the 0-based
ranks of its positives, and the rank of a positive with score p is ``#{negatives scoring above
p}`` plus the number of positives before it. To count scores above each positive, every score of
the row goes through one monotone map to an integer bin (G/8 bins, at most 2,048, over the
positives' range, half as many below it, everything further out in the two end bins) and the
bins are histogrammed; a monotone map never reorders scores across bins, so a score in a higher
bin than p is above p and one in a lower bin is below it. Only the few scores that share a bin
with a positive (the "hits") are compared exactly, through integer sort keys of (row, score).
That is a handful of elementwise passes over the row (O(G) per query, no G log G sort), exact
whatever the map, and done in blocks of rows small enough (about 1M scores) to stay in the CPU
caches, so only the first pass reads the matrix from memory; the Q x G index/match matrices of
the public code never exist. With several torch threads on CPU, each thread takes whole blocks
and runs their operations single-threaded (no barrier per operation).

Tie rule (deterministic): gallery items with equal scores are ordered by ascending gallery
index, i.e. exactly what a *stable* descending sort gives. Ties among positives alone never
change the result; a row where a positive ties with a negative is recomputed with a stable sort
of that row. The public implementations use an unstable sort and leave ties undefined; on
tie-free data all agree.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")

# Scores of one block of rows. On CPU a block (2.5 MB of float32, then its bins in place) and its
# histogram stay in the caches, so only the first pass reads memory; on an accelerator larger
# blocks mean fewer kernel launches.
_BLOCK_CPU = 1 << 20
_BLOCK_ACCEL = 1 << 24
# CPU threads that take blocks (each holds about 8 MB of buffers): torch's intra-op thread count,
# at most this many
_MAX_THREADS = 8
# Value bins over the positives' range per row: about G/8, 64 .. 2,048.
_MAX_BINS = 2048


def _bins_for(num_g: int) -> int:
    return min(_MAX_BINS, max(64, 1 << max(0, (num_g // 8 - 1).bit_length())))


def _max_rows(bins_per_row: int) -> int:
    """Rows of one block: their bin ids (row * bins_per_row + bin) must be exact integers in float32."""
    return max(1, (1 << 24) // bins_per_row - 1)


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
    """Buffers of one block, reused across blocks (fresh large tensors cost page faults)."""

    def __init__(self, rows: int, num_g: int, bins_per_row: int, below: int, device: torch.device):
        n = rows * num_g
        self.u = torch.empty(n, dtype=torch.float32, device=device)  # scores -> bins, in place
        self.mask = torch.zeros(-(-n // 64) * 64, dtype=torch.bool, device=device)  # whole words of words
        self.any8 = torch.zeros(self.mask.numel() // 8, dtype=torch.bool, device=device)
        self.shared = torch.zeros(rows * bins_per_row, dtype=torch.bool, device=device)
        self.lane = torch.arange(8, device=device)
        # per row of a block: its first bin, and #scores in it and the rows before it
        self.first = (torch.arange(rows, device=device, dtype=torch.float32) * bins_per_row + below).unsqueeze(1)
        self.row_end = (torch.arange(1, rows + 1, device=device) * num_g).unsqueeze(1)


def _nonzero_sparse(ws: "_Workspace", n: int) -> torch.Tensor:
    """Positions of the True entries among the first ``n`` of the sparse mask ``ws.mask``.

    ``nonzero`` costs per element looked at, so look at words of 64 entries first (two casts
    to bool make a byte per 8 entries, then a word per 64), and only inside the words that
    hold a hit after that (``index_select`` / ``masked_select``: no advanced indexing)."""
    mask, lane = ws.mask, ws.lane
    mask[n:] = False
    b8 = ws.any8.copy_(mask.view(torch.int64))  # one byte per 8 entries: any of them set
    w64 = b8.view(torch.int64).nonzero().view(-1)
    w8 = (w64.unsqueeze(1) * 8 + lane).view(-1)
    w8 = w8.masked_select(b8.index_select(0, w8))
    cand = (w8.unsqueeze(1) * 8 + lane).view(-1)
    return cand.masked_select(mask.index_select(0, cand))


class _Plan:
    """What every block needs: the positives of each query (ascending scores, their gallery
    columns) and each row's monotone map of scores to bins. Small: Q x Pmax."""

    def __init__(self, sim: torch.Tensor, q: torch.Tensor, g: torch.Tensor):
        num_q, num_g = sim.shape
        dev = sim.device
        # CSR view of the gallery grouped by pid, so a query's positives are one slice (no Q x G mask)
        g_order = torch.sort(g, stable=True).indices
        uniq, counts = torch.unique_consecutive(g[g_order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.searchsorted(uniq, q).clamp(max=uniq.numel() - 1)
        has_pos = uniq[slot] == q
        if not bool(has_pos.all()):
            raise _missing_positive_error(q, ~has_pos)
        self.npos = counts[slot]
        self.p_max = p_max = int(self.npos.max())
        self.col = torch.arange(p_max, device=dev)
        self.valid = self.col.unsqueeze(0) < self.npos.unsqueeze(1)
        gidx = g_order[(starts[slot].unsqueeze(1) + self.col).clamp(max=num_g - 1)]
        gidx = torch.where(self.valid, gidx, gidx[:, :1])  # padding: the first positive again (harmless)
        pos = sim.gather(1, gidx).masked_fill(~self.valid, float("inf"))
        self.pos_asc, order = pos.sort(dim=1)  # padding (+inf) stays at the end
        self.pos_gidx = gidx.gather(1, order)
        # the map of row r: score s -> (s - lo) * scale, clamped to [-below, above]; the positives'
        # range [lo, top] gets bins 0 .. above-1, the ``below`` bins under it spread the many scores
        # below every positive over distinct bins (the histogram slows down when one bin takes
        # most of the row). Any width works: it only sets how many scores share a positive's bin.
        self.above = _bins_for(num_g)
        self.below = self.above // 2
        self.bins_per_row = self.below + self.above + 1
        lo = self.pos_asc[:, :1]
        span = self.pos_asc.masked_fill(~self.valid, float("-inf")).amax(1, keepdim=True) - lo
        span = torch.where(span > 0, span, lo.abs().clamp_min(1e-6))  # one distinct positive: a narrow window
        self.lo = lo
        # finite and non-zero, so no 0 * inf (NaN) below even where s - lo overflows
        self.scale = ((self.above - 1) / span).clamp(min=1e-30, max=1e30)
        # sort keys of (row, score) pairs, for the exact part
        self.row_key = (torch.arange(num_q, device=dev) << 32).unsqueeze(1)
        # float32 scores map to ordered integer keys directly; other dtypes (float64) get keys per
        # block from the ranks of the block's distinct hit and positive scores
        self.direct_keys = sim.dtype == torch.float32
        self.pos_key = self.row_key + _order_key(self.pos_asc) if self.direct_keys else None


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) ordered as the float32 scores ``x`` are (+-inf included); equal scores,
    -0.0 and 0.0 included, get equal keys."""
    bits = (x + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() + (1 << 31)


def _block(plan: _Plan, sim: torch.Tensor, a: int, b: int, pm: int, ws: _Workspace,
           above_all: torch.Tensor, equal_all: torch.Tensor) -> None:
    """Rows a..b-1: for each ascending positive, #scores strictly above it (into ``above_all``)
    and #scores equal to it (into ``equal_all``).

    A score outside every positive's bin is above a positive exactly when its bin is (the map is
    monotone): those are counted from the histogram. The scores inside the positives' bins (the
    hits: the positives themselves and the few scores sharing their bins) are compared exactly."""
    c, num_g = b - a, sim.shape[1]
    n, nbins = c * num_g, c * plan.bins_per_row
    rows = sim[a:b]
    if not rows.is_contiguous():
        rows = rows.contiguous()
    # map: subtract, check, multiply, clamp, offset to the row's own bins, truncate. Each step is
    # monotone, so is the map; the offsets r*nb + below are integers below 2**24, so exact.
    u = torch.sub(rows, plan.lo[a:b], out=ws.u[:n].view(c, num_g))
    # finite unless the rows hold NaN/inf (or a difference overflows: then check elementwise)
    if not bool(torch.isfinite(u.sum())) and not bool(torch.isfinite(rows).all()):
        bad = int((~torch.isfinite(rows)).any(1).nonzero()[0]) + a
        raise ValueError(f"similarity row {bad} holds NaN or inf; scores must be finite")
    u.mul_(plan.scale[a:b]).clamp_(-plan.below, plan.above).add_(ws.first[:c])
    bins = ws.u[:n].view(torch.int32)
    bins.copy_(ws.u[:n])  # float -> int32 in place (elementwise, same positions)
    counts = torch.bincount(bins, minlength=nbins)
    pos_bin = bins.view(c, num_g).gather(1, plan.pos_gidx[a:b, :pm]).long()
    shared = ws.shared[:nbins]
    shared.zero_()
    shared.index_fill_(0, pos_bin.view(-1), True)
    # histogram part: #scores in bins above the positive's
    cum = counts.cumsum_(0)
    above = ws.row_end[:c] - cum.index_select(0, pos_bin.view(-1)).view(c, pm)
    # exact part: the hits (scores in a positive's bin, the positives included), sorted by (row,
    # score). In that order their bins are sorted too, so for the k-th positive of row r
    # #hits of r in bins up to the positive's  -  #hits of r scoring up to it
    # = #hits in the positive's bin scoring above it, what the histogram left out.
    torch.index_select(shared, 0, bins, out=ws.mask[:n])
    hit = _nonzero_sparse(ws, n)  # flat (row-major) positions
    row_key = plan.row_key[a:b].view(-1).index_select(0, hit // num_g)
    val = rows.view(-1).index_select(0, hit)
    if plan.direct_keys:
        pos_key = plan.pos_key[a:b, :pm].contiguous()
        score_key = row_key + _order_key(val)
    else:
        pos_asc = plan.pos_asc[a:b, :pm]
        rank = torch.unique(torch.cat([val, pos_asc.reshape(-1)]), return_inverse=True)[1]
        pos_key = plan.row_key[a:b] + rank[val.numel():].view(c, pm)
        score_key = row_key + rank[: val.numel()]
    score_key, order = score_key.sort()
    bin_key = (row_key + bins.index_select(0, hit)).index_select(0, order)
    upto = torch.searchsorted(score_key, pos_key, right=True)
    above += torch.searchsorted(bin_key, plan.row_key[a:b] + pos_bin, right=True) - upto
    above_all[a:b, :pm] = above
    equal_all[a:b, :pm] = upto - torch.searchsorted(score_key, pos_key)


def _run_blocks(plan: _Plan, sim: torch.Tensor, chunk_size: int, above_all: torch.Tensor,
                equal_all: torch.Tensor) -> None:
    """All blocks of ``chunk_size`` rows; on CPU spread over torch's intra-op threads as whole
    blocks (each thread runs its blocks' operations single-threaded, so there is no barrier
    per operation and a thread slowed by other jobs simply takes fewer blocks)."""
    num_q, num_g = sim.shape
    starts = list(range(0, num_q, chunk_size))
    npos = plan.npos
    pad = (-num_q) % chunk_size
    if pad:
        npos = torch.cat([npos, npos.new_zeros(pad)])
    pms = npos.view(-1, chunk_size).amax(1).tolist()
    rows_ws = min(chunk_size, num_q)
    threads = min(torch.get_num_threads(), _MAX_THREADS) if sim.device.type == "cpu" else 1
    threads = max(1, min(threads, len(starts)))
    if threads == 1:
        ws = _Workspace(rows_ws, num_g, plan.bins_per_row, plan.below, sim.device)
        for i, a in enumerate(starts):
            _block(plan, sim, a, min(a + chunk_size, num_q), pms[i], ws, above_all, equal_all)
        return
    before = torch.get_num_threads()
    jobs = iter(range(len(starts)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        torch.set_num_threads(1)  # this thread's operations; the caller's setting is restored below
        try:
            ws = _Workspace(rows_ws, num_g, plan.bins_per_row, plan.below, sim.device)
            while not errors:
                with lock:
                    i = next(jobs, None)
                if i is None:
                    return
                a = starts[i]
                _block(plan, sim, a, min(a + chunk_size, num_q), pms[i], ws, above_all, equal_all)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)

    helpers = [threading.Thread(target=work, name=f"rank-metrics-{k}", daemon=True) for k in range(threads - 1)]
    try:
        for t in helpers:
            t.start()
        work()  # the calling thread takes blocks too
        for t in helpers:
            t.join()
    finally:
        torch.set_num_threads(before)
    if errors:
        raise errors[0]


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
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    plan = _Plan(sim, q, g)
    if chunk_size is None:
        block = _BLOCK_CPU if dev.type == "cpu" else _BLOCK_ACCEL
        chunk_size = max(1, block // num_g)
    chunk_size = min(chunk_size, _max_rows(plan.bins_per_row), num_q)
    above_all = torch.zeros((num_q, plan.p_max), dtype=torch.long, device=dev)
    equal_all = torch.zeros((num_q, plan.p_max), dtype=torch.long, device=dev)
    _run_blocks(plan, sim, chunk_size, above_all, equal_all)
    npos, col, valid = plan.npos.unsqueeze(1), plan.col, plan.valid
    pleq = torch.searchsorted(plan.pos_asc, plan.pos_asc, right=True)  # positives scoring <= each
    # more scores equal to a positive than positives of that score: a negative tied with it
    tied = ((equal_all > pleq - torch.searchsorted(plan.pos_asc, plan.pos_asc)) & valid).any(1)
    del equal_all
    neg_above = (above_all - (npos - pleq)).masked_fill_(~valid, 0)  # [:, k] for the k-th smallest positive
    # descending j-th positive (j = 1..P) is the ascending (P - j + 1)-th; its rank is the
    # negatives above it plus the j-1 positives before it (ties among positives are harmless).
    ranks = neg_above.gather(1, (npos - 1 - col).clamp(min=0)).add_(col).masked_fill_(~valid, 0)
    t_all = tied.nonzero().flatten()
    if t_all.numel():
        for t in t_all.split(chunk_size):
            pm = int(plan.npos[t].max())
            r2, _ = _ranks_by_stable_sort(sim[t], q[t], g, pm)
            ranks[t, :pm] = r2.masked_fill(~valid[t, :pm], 0)
        logger.info("%d of %d queries had a positive tied with a negative (ordered by gallery index)",
                    t_all.numel(), num_q)
    return ranks, valid


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
    query rows processed at once (default: about 1M scores per block on CPU, 16M on an
    accelerator; capped so that a block's bin ids stay exact in float32). On CPU,
    ``torch.get_num_threads()`` threads (at most 8) take blocks; the caller's thread setting is
    left as it was. Raises
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
