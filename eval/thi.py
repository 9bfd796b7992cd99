"""THI: test-time human-centred interaction (SPEC §5, Algorithm 1 as released).

Pure: base similarity S (queries x gallery), gallery features, query captions, gallery image
paths, an MLLM backend and a text encoder go in; per-query decisions and a way to build the
re-ranked scores of any round (and any λ) come out. No files are read or written here.

Per round r = 0..K-1, for every query not refined yet, T_loc(caption, C_i[r]) is asked; a Yes is
accepted when
  r = 0: S[i, C_i[0]] > ξ;
  r > 0: no earlier round answered Yes for i, and s ≤ ξ, where s = S[i, C_i[0]] (the released
         gate, default) or s = S[i, C_i[r]] (the paper's gate, ``gate="paper"``).
Accepted queries get T_vqa on the anchor image, then T_aggr(caption, VQA sentences) = q̂_i; after
each round S̄[i] = f_text(q̂_i)·F_galleryᵀ with S̄[i, anchor] = 1 for refined queries and S̄[i] = S[i]
otherwise, and Ŝ = λS + (1-λ)S̄.

Minimal-call mode (default) asks T_loc at round r only if some round r' ≥ r could still accept
for that query (e.g. a query whose top-1 is above ξ matters only in round 0 with the released
gate, and a Yes in round 0 at or below ξ ends the query). That set of rounds shrinks as r grows,
so skipping never hides an answer a later decision needs: the decisions, hence the rankings,
equal those of ``exhaustive=True``, which asks every unrefined query in every round as the
released code does. Minimal mode also asks T_vqa once per distinct anchor image.

T_loc as a score (beyond the released loop; the defaults keep it): every T_loc call also
returns p_yes, P(Yes) over the Yes/No tokens (``MLLMBackend.localize``), stored in each
decision. ``tau=None`` (default) decides Yes by the released text rule; ``tau=t`` accepts when
p_yes > t (t = 0.5 is the greedy Yes/No). Two labelled options, both off by default:
``anchor="max-p"`` asks T_loc on every candidate a round could accept and takes as anchor the
one with the highest p_yes above τ (instead of the first Yes); ``fuse=w`` adds w * (p_yes - 0.5)
to the re-ranked score of every candidate asked. ``cover`` lists extra (ξ, τ) settings whose
T_loc answers this run must also ask, so a ξ x τ grid replays from the cache without a T_loc call.

Scale: C_i comes from a top-K per row (``top_candidates``: the order of a stable descending
sort, without sorting the row), and Ŝ is never copied per round or λ: it differs from S only in
the refined rows, so ``THIResult`` builds those rows on demand (``refined_rows``) and computes
metrics as the base's per-query values with the refined rows ranked again (``metrics``).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from mllm_tune.core.backends import CachedBackend, MLLMBackend, MLLMRequest
from mllm_tune.core.backends.base import localize_any
from mllm_tune.core.metrics import mean_metrics, per_query_metrics
from mllm_tune.core.prompts import DEFAULT_PROMPTS, PromptSet, is_yes

logger = logging.getLogger(__name__)

GATES = ("released", "paper")
ANCHOR_RULES = ("first", "max-p")  # first Yes (released) / highest p_yes among the candidates asked
TextEncoder = Callable[[list[str]], torch.Tensor]
ROW_CHUNK = 1024  # rows of Q x G work held at once (1024 x 19,848 float32 = 81 MB)


@dataclass(frozen=True)
class THIConfig:
    rounds: int = 5  # K
    xi: float = 0.50  # ξ (0.55 on ICFG-PEDES)
    lam: float = 0.8  # λ
    gate: str = "released"
    exhaustive: bool = False
    batch_size: int = 128  # requests per backend call (a kill loses at most one batch)
    encode_batch: int = 64
    tau: float | None = None  # None: the released text rule; else accept a Yes when p_yes > tau
    anchor: str = "first"  # option (a): "max-p"
    fuse: float = 0.0  # option (b): weight of (p_yes - 0.5) added to the candidates asked
    cover: tuple[tuple[float, float | None], ...] = ()  # extra (ξ, τ) settings whose T_loc calls to ask

    def __post_init__(self) -> None:
        if self.gate not in GATES:
            raise ValueError(f"THI gate must be one of {GATES}, got {self.gate!r}")
        if self.anchor not in ANCHOR_RULES:
            raise ValueError(f"THI anchor rule must be one of {ANCHOR_RULES}, got {self.anchor!r}")
        for t in [self.tau, *(c[1] for c in self.cover)]:
            if t is not None and not 0.0 <= t < 1.0:
                raise ValueError(f"τ must be in [0, 1), got {t}")
        if self.fuse < 0:
            raise ValueError(f"the p_yes fusion weight must be >= 0, got {self.fuse}")
        if self.rounds < 1:
            raise ValueError(f"THI needs at least one round, got rounds={self.rounds}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"λ must be in [0, 1], got {self.lam}")
        if self.batch_size < 1 or self.encode_batch < 1:
            raise ValueError("batch sizes must be positive")

    @property
    def needs_scores(self) -> bool:
        """Whether decisions read p_yes (then unscored cached T_loc answers are asked again)."""
        return (self.tau is not None or self.anchor != "first" or self.fuse > 0
                or any(t is not None for _, t in self.cover))


@dataclass
class QueryDecision:
    query: int  # row of S
    candidates: list[int]  # C_i (gallery indices, best first)
    loc: dict[int, str] = field(default_factory=dict)  # round -> T_loc answer (rounds asked only)
    p_yes: dict[int, float | None] = field(default_factory=dict)  # round -> P(Yes) (None: not scored)
    refined_round: int | None = None
    anchor: int | None = None  # gallery index
    vqa: str | None = None
    facts: list[str] = field(default_factory=list)
    refined_text: str | None = None

    def says_yes(self, r: int, tau: float | None) -> bool:
        """The round-r answer is a Yes: the released text rule (tau None), else p_yes > tau
        (the text rule where the backend gave no p_yes)."""
        p = self.p_yes.get(r)
        if tau is None or p is None:
            return is_yes(self.loc[r])
        return p > tau

    def yes_before(self, r: int, tau: float | None) -> bool:
        return any(self.says_yes(rr, tau) for rr in self.loc if rr < r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loc"] = {str(k): v for k, v in self.loc.items()}
        d["p_yes"] = {str(k): v for k, v in self.p_yes.items()}
        return d


@dataclass
class THIResult:
    config: THIConfig
    base: torch.Tensor  # S [Q, G]
    gallery_feats: torch.Tensor | None  # [G, D]
    decisions: list[QueryDecision]
    refined_feats: dict[int, torch.Tensor]  # query -> f_text(q̂_i), L2-normalised [D]
    calls: dict[str, int]  # requests THI asked per stage (independent of the cache)
    stage_seconds: dict[str, float]
    _base_metrics: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # memo of metrics(S)

    @property
    def refined(self) -> list[int]:
        return [d.query for d in self.decisions if d.refined_round is not None]

    def refined_count(self, after_round: int | None = None) -> int:
        last = self.config.rounds - 1 if after_round is None else after_round
        return sum(d.refined_round is not None and d.refined_round <= last for d in self.decisions)

    def _refined_by(self, after_round: int | None) -> list[QueryDecision]:
        last = self.config.rounds - 1 if after_round is None else after_round
        return [d for d in self.decisions if d.refined_round is not None and d.refined_round <= last]

    def _changed_by(self, after_round: int | None) -> list[QueryDecision]:
        """Queries whose row of Ŝ differs from S after ``after_round``: the refined ones and, with
        p_yes fusion, every query with a scored candidate asked by then."""
        last = self.config.rounds - 1 if after_round is None else after_round
        if self.config.fuse <= 0:
            return self._refined_by(after_round)
        return [d for d in self.decisions
                if (d.refined_round is not None and d.refined_round <= last)
                or any(r <= last and p is not None for r, p in d.p_yes.items())]

    def refined_rows(self, after_round: int | None = None, lam: float | None = None,
                     chunk: int = ROW_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(query indices, their rows of Ŝ), ``chunk`` queries at a time, for the queries refined by
        ``after_round`` (and, with fusion, those with a scored candidate): every other row of Ŝ is
        the base row, so this is all of Ŝ that is new."""
        if self.gallery_feats is None:
            raise RuntimeError("this THI run did not re-encode queries (encode=False): no scores to build")
        lam = self.config.lam if lam is None else lam
        last = self.config.rounds - 1 if after_round is None else after_round
        rows = self._changed_by(after_round)
        for s in range(0, len(rows), chunk):
            part = rows[s : s + chunk]
            idx = torch.tensor([d.query for d in part])
            out = self.base[idx].clone()
            ref = [j for j, d in enumerate(part) if d.refined_round is not None and d.refined_round <= last]
            if ref:
                rj = torch.tensor(ref)
                sbar = torch.stack([self.refined_feats[part[j].query] for j in ref]) @ self.gallery_feats.T
                sbar[torch.arange(len(ref)), torch.tensor([part[j].anchor for j in ref])] = 1.0
                out[rj] = lam * out[rj] + (1.0 - lam) * sbar
            if self.config.fuse > 0:
                w = self.config.fuse
                for j, d in enumerate(part):
                    for r, p in d.p_yes.items():
                        if r <= last and p is not None:
                            out[j, d.candidates[r]] += w * (p - 0.5)
            yield idx, out

    def scores(self, after_round: int | None = None, lam: float | None = None) -> torch.Tensor:
        """Ŝ after round ``after_round`` (default: the last) with balance ``lam`` (default: config.λ).
        A full Q x G copy: for metrics or a few rows use ``metrics`` / ``score_rows``."""
        out = self.base.clone()
        for idx, rows in self.refined_rows(after_round, lam):
            out[idx] = rows
        return out

    def score_rows(self, queries: Sequence[int], after_round: int | None = None, lam: float | None = None) -> torch.Tensor:
        """Rows of Ŝ for the given queries (refined or not), in that order."""
        want = torch.as_tensor(list(queries), dtype=torch.long)
        out = self.base[want].clone()
        where = {int(q): i for i, q in enumerate(want.tolist())}
        for idx, rows in self.refined_rows(after_round, lam):
            for j, q in enumerate(idx.tolist()):
                if q in where:
                    out[where[q]] = rows[j]
        return out

    def top1(self, after_round: int | None = None, lam: float | None = None) -> torch.Tensor:
        """argmax of every row of Ŝ (first maximum, as ``torch.argmax``) without building Ŝ."""
        best = torch.cat([self.base[s : s + ROW_CHUNK].argmax(1) for s in range(0, self.base.shape[0], ROW_CHUNK)])
        for idx, rows in self.refined_rows(after_round, lam):
            best[idx] = rows.argmax(1)
        return best

    def base_per_query(self, query_pids: Any, gallery_pids: Any) -> dict[str, torch.Tensor]:
        """``per_query_metrics(S, ...)``, computed once per result (and reusable across results
        of the same S, e.g. a ξ sweep: pass it to ``metrics(base_per_query=...)``)."""
        key = (torch.as_tensor(query_pids).tolist(), torch.as_tensor(gallery_pids).tolist())
        if self._base_metrics.get("key") != key:
            self._base_metrics.update(key=key, values=per_query_metrics(self.base, query_pids, gallery_pids))
        return self._base_metrics["values"]

    def metrics(self, query_pids: Any, gallery_pids: Any, after_round: int | None = None, lam: float | None = None,
                base_per_query: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        """``rank_metrics(self.scores(after_round, lam), query_pids, gallery_pids)``, equal to it,
        without building Ŝ: a query's metrics depend on its own row only, so the base's per-query
        values are kept and only the refined rows are ranked again."""
        base_pq = base_per_query if base_per_query is not None else self.base_per_query(query_pids, gallery_pids)
        per_q = {k: v.clone() for k, v in base_pq.items()}
        qp = torch.as_tensor(query_pids)
        for idx, rows in self.refined_rows(after_round, lam):
            part = per_query_metrics(rows, qp[idx], gallery_pids)
            for k in per_q:
                per_q[k][idx] = part[k]
        return mean_metrics(per_q)


def top_candidates(base: torch.Tensor, k: int, chunk: int = ROW_CHUNK) -> torch.Tensor:
    """The first ``k`` columns of each row in a stable descending sort (ties by ascending gallery
    index), without sorting the rows: a top-k gives each row's k-th largest score, and only the
    columns at or above it (k of them, more when ties straddle it) are ordered."""
    Q, G = base.shape
    k = min(k, G)
    out = torch.empty((Q, k), dtype=torch.long)
    for s in range(0, Q, chunk):
        rows = base[s : s + chunk]
        top = rows.topk(k, dim=1).values  # NaN counts as the largest value here, as in a sort
        kth = top[:, -1:]
        if bool(torch.isnan(top).any()):
            raise ValueError(f"THI: the similarity rows {s}..{s + len(rows) - 1} hold NaN; scores must be finite")
        r, c = (rows >= kth).nonzero(as_tuple=True)  # row-major: ascending columns within a row
        by_score = torch.sort(rows[r, c], descending=True, stable=True).indices  # equal scores keep column order
        regroup = by_score[torch.sort(r[by_score], stable=True).indices]  # back to rows, order kept
        r, c = r[regroup], c[regroup]
        first = torch.searchsorted(r, torch.arange(len(rows)))  # where each row's run starts
        out[s : s + len(rows)] = c[first.unsqueeze(1) + torch.arange(k)]
    return out


def _can_accept(gate: str, r: int, cand_sims: Sequence[float], xi: float) -> bool:
    """Could a Yes at round r be accepted, assuming no earlier Yes?"""
    if r == 0:
        return cand_sims[0] > xi
    s = cand_sims[0] if gate == "released" else cand_sims[r]
    return s <= xi


def accepts(gate: str, r: int, yes: bool, earlier_yes: bool, cand_sims: Sequence[float], xi: float) -> bool:
    """The acceptance rule of Algorithm 1 for one query at round r."""
    if not yes or (r > 0 and earlier_yes):
        return False
    return _can_accept(gate, r, cand_sims, xi)


def loc_matters(gate: str, r: int, earlier_yes: bool, cand_sims: Sequence[float], xi: float, rounds: int) -> bool:
    """Can the T_loc answer at round r change the outcome? Only if some round r' ≥ r could still
    accept. False at r implies False at every later round, so skipping is safe."""
    if r > 0 and earlier_yes:
        return False
    return any(_can_accept(gate, rr, cand_sims, xi) for rr in range(r, rounds))


def _score_or_text(d: QueryDecision, r: int) -> float:
    p = d.p_yes.get(r)
    return float(p) if p is not None else float(is_yes(d.loc[r]))


_warned_unscored: set[str] = set()


def _localize_into(backend: MLLMBackend, ask: list[QueryDecision], r: int, loc_prompts: Sequence[str],
                   gallery_paths: Sequence[str], batch_size: int, progress: bool, need_scores: bool) -> None:
    """Ask T_loc(caption, C_i[r]) for the decisions in ``ask`` and store text and p_yes."""
    reqs = [MLLMRequest("loc", loc_prompts[d.query], gallery_paths[d.candidates[r]]) for d in ask]
    if isinstance(backend, CachedBackend):
        answer = lambda part: backend.localize(part, need_score=need_scores)  # noqa: E731
    else:
        answer = lambda part: localize_any(backend, part)  # noqa: E731
    out = _ask(answer, reqs, batch_size, f"T_loc round {r}", progress)
    for d, a in zip(ask, out):
        d.loc[r], d.p_yes[r] = a.text, a.p_yes
    kind = getattr(backend, "kind", type(backend).__name__)
    if need_scores and any(a.p_yes is None for a in out) and kind not in _warned_unscored:
        _warned_unscored.add(kind)
        logger.warning("the %s backend gave no p_yes for %d T_loc answers: those are decided by the text rule",
                       kind, sum(a.p_yes is None for a in out))


def _ask(answer: Callable[[list[MLLMRequest]], list], reqs: list[MLLMRequest], batch_size: int, desc: str,
         progress: bool) -> list:
    """``answer`` (a backend's generate or localize) over ``reqs``, ``batch_size`` at a time."""
    out: list = []
    starts = range(0, len(reqs), batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(reqs) <= batch_size, leave=False):
        out.extend(answer(reqs[s : s + batch_size]))
    return out


def _encode(encode_text: TextEncoder, texts: list[str], batch: int) -> torch.Tensor:
    # fixed chunks in query order, so the features of a query do not depend on who else is refined
    parts = [encode_text(texts[s : s + batch]).float() for s in range(0, len(texts), batch)]
    feats = torch.cat(parts)
    return torch.nn.functional.normalize(feats, dim=-1)


def run_thi(
    base: torch.Tensor,
    query_texts: Sequence[str],
    gallery_paths: Sequence[str],
    backend: MLLMBackend,
    encode_text: TextEncoder | None,
    gallery_feats: torch.Tensor | None,
    config: THIConfig = THIConfig(),
    prompts: PromptSet = DEFAULT_PROMPTS,
    progress: bool = True,
) -> THIResult:
    """Run Algorithm 1 over all rows of ``base``. With ``encode_text=None`` only the MLLM part
    runs (used to fill the answer cache from a shard of queries)."""
    base = base.float()
    Q, G = base.shape
    if len(query_texts) != Q or len(gallery_paths) != G:
        raise ValueError(f"THI: S is {Q}x{G} but got {len(query_texts)} captions and {len(gallery_paths)} images")
    if encode_text is not None and (gallery_feats is None or gallery_feats.shape[0] != G):
        raise ValueError(f"THI: gallery features must have {G} rows to match S")
    K = min(config.rounds, G)
    cfg = config
    order = top_candidates(base, K)
    cand_sims = torch.gather(base, 1, order).tolist()
    decisions = [QueryDecision(i, order[i].tolist()) for i in range(Q)]
    calls: Counter[str] = Counter()
    secs: Counter[str] = Counter()
    refined_feats: dict[int, torch.Tensor] = {}
    vqa_memo: dict[int, str] = {}  # anchor -> answer (minimal mode asks each anchor once)
    loc_prompts = [prompts.render_loc(t) for t in query_texts]
    vqa_prompt = prompts.render_vqa()

    settings = [(cfg.xi, cfg.tau), *cfg.cover]
    need_scores = cfg.needs_scores
    chosen: dict[int, int] = {}  # max-p anchor rule: query -> round of its anchor
    if cfg.anchor == "max-p":
        # option (a): every candidate the released loop could ask is asked first (as if no earlier
        # round said Yes); the candidate with the highest p_yes among those answered Yes is the
        # anchor if its round's gate accepts it (ties: the earlier round). The top-1 winning at a
        # round that cannot accept (round 0 at or below ξ) leaves the ranking alone, as a round-0
        # Yes does in the released loop.
        t0 = time.perf_counter()
        for r in range(K):
            ask = [d for d in decisions if any(loc_matters(cfg.gate, r, False, cand_sims[d.query], x, K) for x, _ in settings)]
            _localize_into(backend, ask, r, loc_prompts, gallery_paths, cfg.batch_size, progress, need_scores)
            calls["loc"] += len(ask)
        secs["loc"] += time.perf_counter() - t0
        for d in decisions:
            yes = [r for r in d.loc if d.says_yes(r, cfg.tau)
                   and loc_matters(cfg.gate, r, False, cand_sims[d.query], cfg.xi, K)]
            if yes:
                best = max(yes, key=lambda r: (_score_or_text(d, r), -r))
                if _can_accept(cfg.gate, best, cand_sims[d.query], cfg.xi):
                    chosen[d.query] = best

    for r in tqdm(range(K), desc="THI rounds", unit="round", disable=not progress):
        # -- anchor localization ------------------------------------------------------------
        accepted = []
        if cfg.anchor == "max-p":
            for d in decisions:
                if d.refined_round is None and chosen.get(d.query) == r:
                    d.refined_round, d.anchor = r, d.candidates[r]
                    accepted.append(d)
        else:
            ask = []
            for d in decisions:
                # a refined query is asked again only for a covered setting where it is not refined
                if d.refined_round is not None and (cfg.exhaustive or not cfg.cover):
                    continue
                if cfg.exhaustive or any(
                        loc_matters(cfg.gate, r, d.yes_before(r, t), cand_sims[d.query], x, K) for x, t in settings):
                    ask.append(d)
            t0 = time.perf_counter()
            _localize_into(backend, ask, r, loc_prompts, gallery_paths, cfg.batch_size, progress, need_scores)
            secs["loc"] += time.perf_counter() - t0
            calls["loc"] += len(ask)
            for d in ask:
                if d.refined_round is None and accepts(cfg.gate, r, d.says_yes(r, cfg.tau), d.yes_before(r, cfg.tau), cand_sims[d.query], cfg.xi):
                    d.refined_round, d.anchor = r, d.candidates[r]
                    accepted.append(d)
        if not accepted:
            continue
        # -- human-centred VQA on the anchors -------------------------------------------------
        if cfg.exhaustive:
            need = [d.anchor for d in accepted]
        else:
            need = list(dict.fromkeys(d.anchor for d in accepted if d.anchor not in vqa_memo))
        t0 = time.perf_counter()
        vqa_answers = _ask(backend.generate, [MLLMRequest("vqa", vqa_prompt, gallery_paths[g]) for g in need],
                           cfg.batch_size, f"T_vqa round {r}", progress)
        secs["vqa"] += time.perf_counter() - t0
        calls["vqa"] += len(need)
        if cfg.exhaustive:
            for d, a in zip(accepted, vqa_answers):
                d.vqa = a
        else:
            vqa_memo.update(zip(need, vqa_answers))
            for d in accepted:
                d.vqa = vqa_memo[d.anchor]  # type: ignore[index]
        # -- aggregation (text only) ---------------------------------------------------------
        for d in accepted:
            d.facts = prompts.parse_vqa(d.vqa or "")  # ours, or the released handling (PromptSet.answer_handling)
        t0 = time.perf_counter()
        merged = _ask(backend.generate, [MLLMRequest("aggr", prompts.render_aggr(query_texts[d.query], d.facts)) for d in accepted],
                      cfg.batch_size, f"T_aggr round {r}", progress)
        secs["aggr"] += time.perf_counter() - t0
        calls["aggr"] += len(accepted)
        for d, m in zip(accepted, merged):
            m = " ".join(m.split())
            if not m:  # an empty merge would erase the query: keep the caption plus the facts
                logger.warning("T_aggr returned an empty answer for query %d; using caption + facts", d.query)
                m = " ".join([query_texts[d.query], *d.facts])
            d.refined_text = m
        # -- re-encode only the newly refined queries ------------------------------------------
        if encode_text is not None:
            t0 = time.perf_counter()
            with torch.no_grad():
                feats = _encode(encode_text, [d.refined_text for d in accepted], cfg.encode_batch)  # type: ignore[misc]
            for d, f in zip(accepted, feats):
                refined_feats[d.query] = f
            secs["encode"] += time.perf_counter() - t0
        logger.info("THI round %d: %d T_loc calls, %d newly refined", r, len(ask), len(accepted))

    return THIResult(
        config=cfg,
        base=base,
        gallery_feats=None if gallery_feats is None else gallery_feats.float(),
        decisions=decisions,
        refined_feats=refined_feats,
        calls={t: int(calls[t]) for t in ("loc", "vqa", "aggr")},
        stage_seconds={t: round(float(secs[t]), 4) for t in ("loc", "vqa", "aggr", "encode")},
    )
