"""End-to-end ICL evaluation: offline retriever -> base ranking -> THI with an MLLM -> metrics.

    python -m eval.icl_end2end --dataset-root DIR --dataset NAME --retriever SPEC \
        --mllm {hf,vllm,openai,oracle} --model PATH [--adapter PATH] --out DIR [...]

Prints a table like the paper's (base ranking and after each THI round) and writes to --out:
``results.json`` (config, per-round metrics, MLLM calls per stage, cache hits, wall time per
stage, refined-query count), ``decisions.jsonl`` (per query: T_loc answers, anchor, VQA facts,
rewritten query), ``table.md`` and the plots (metrics vs round, λ sweep, ξ sweep, top-10 strips).

Every MLLM answer goes through the on-disk answer cache (default ``OUT/cache``): rerunning the
same command after a kill resumes without repeating a call. ``accelerate launch -m
eval.icl_end2end ...`` (or torchrun) shards the queries: every process answers its share into its
own cache file (``shard-RANK.sqlite``), the main process merges them into ``answers.sqlite``
(atomically) and replays Algorithm 1 over all queries from the cache, so the numbers are those of
a single-process run (docs/multinode.md). ``--mllm openai`` takes ``--base-url`` several times
(requests spread over the servers, failover). With no arguments it runs the embedded default
(``default_args()``): the shipped SynthPEDES demo models on a generated SynthPEDES test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from eval.thi import ANCHOR_RULES, GATES, THIConfig, THIResult, run_thi
from mllm_tune.core.backends import (
    BACKEND_KINDS,
    BackendError,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    CachedBackend,
    MLLMBackend,
    make_backend,
    parse_max_new_tokens,
)
from mllm_tune.core.backends.cache import merge_shards, shard_files
from mllm_tune.core.backends.cli_flags import add_vllm_engine_flags, vllm_engine_options
from mllm_tune.core.cli_exit import CLIError, check_dataset_root, one_line, user_errors
from mllm_tune.core.prompts import load_prompts

logger = logging.getLogger("eval.icl_end2end")

SYNTH_BOW = "synth-bow"  # retriever alias of the SynthPEDES bag-of-words stand-in (a simulation)
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


# The embedded default run lives with the SynthPEDES simulation; it is reached by name so that
# this harness never imports the simulation (and still works with synthpedes/ deleted).
DEFAULT_RUN = "synthpedes.demo_assets:icl_end2end_default_args"


DEFAULT_TAU_SWEEP = (0.1, 0.3, 0.5, 0.7, 0.9)


def default_args() -> list[str]:
    """Arguments of the run made when the command gets none (:data:`DEFAULT_RUN`)."""
    import importlib

    module, _, name = DEFAULT_RUN.partition(":")
    try:
        return getattr(importlib.import_module(module), name)()
    except ModuleNotFoundError as exc:
        raise SystemExit(f"error: no arguments given and the embedded default ({module}, the SynthPEDES "
                         f"simulation) is not importable ({exc}); pass --dataset-root, --retriever, --mllm and --out"
                         ) from exc


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval.icl_end2end", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = ap.add_argument_group("data")
    d.add_argument("--dataset-root", required=True, help="folder holding the annotation file and imgs/")
    d.add_argument("--dataset", default="cuhk-pedes", help="cuhk-pedes, icfg-pedes, rstpreid, ufine6926, synthpedes")
    d.add_argument("--split", default="test", help="split whose images form the gallery")
    d.add_argument("--query-split", default=None, help="split whose captions are the queries (default: --split)")
    d.add_argument("--source", "--retriever-trained-on", dest="source", default=None,
                   help="dataset the retriever/adapter were trained on (default: from an irra:/rde: run's configs.yaml "
                        "or a saved retriever folder's retriever.json, when they say)")
    d.add_argument("--target", default=None, help="label: dataset evaluated on (default: --dataset)")
    m = ap.add_argument_group("models")
    m.add_argument("--retriever", required=True,
                   help=f"CLIP folder or hub id org/name[@rev], irra:PATH, rde:PATH, module:factory?k=v, or '{SYNTH_BOW}' "
                        "(SynthPEDES stand-in, a simulation)")
    m.add_argument("--feature-cache", default=None, help="retriever feature cache folder (default OUT/features)")
    m.add_argument("--mllm", choices=BACKEND_KINDS, required=True)
    m.add_argument("--model", default=None,
                   help="hf/vllm: model folder or hub id org/name[@revision] (via the HF cache); openai: served model name")
    m.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder or hub id (hf, vllm); its saved "
                   "processor gives the image budget")
    m.add_argument("--adapter-only-loc", action="store_true",
                   help="use the adapter for T_loc only and the base weights for T_vqa/T_aggr (hf, vllm)")
    m.add_argument("--max-new-tokens", type=parse_max_new_tokens, default=None,
                   help="answer cap: N for every task, or per task like loc=64,vqa=2048 (default "
                        + ",".join(f"{k}={v}" for k, v in DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    m.add_argument("--min-pixels", type=int, default=None,
                   help=f"image budget, smallest area (default: the adapter's saved budget, else {DEFAULT_MIN_PIXELS} "
                        "= training's 224x224); openai: the budget the server was started with "
                        "(--mm-processor-kwargs)")
    m.add_argument("--max-pixels", type=int, default=None,
                   help=f"image budget, largest area (default: the adapter's, else {DEFAULT_MAX_PIXELS})")
    m.add_argument("--loc-answer", choices=("generate", "forward"), default="generate",
                   help="hf: T_loc by greedy generation (default; the text the released rule reads, p_yes from the "
                        "first step) or by one forward pass (faster; the answer constrained to Yes/No by p_yes)")
    m.add_argument("--dtype", default="auto", help="hf/vllm weights dtype (auto, float32, bfloat16)")
    add_vllm_engine_flags(m)
    m.add_argument("--base-url", action="append", default=None,
                   help="openai: server URL (default http://127.0.0.1:8000/v1); give it several times for several "
                        "servers serving the same model name (failover, docs/multinode.md). Start vLLM with the "
                        "training image budget: --mm-processor-kwargs "
                        + "'{\"min_pixels\":50176,\"max_pixels\":50176}'")
    m.add_argument("--base-url-file", default=None, help="openai: file of server URLs, one a line (# comments), "
                   "added to --base-url")
    m.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: environment variable holding the key")
    m.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight per server")
    m.add_argument("--oracle-error-rate", type=float, default=0.0)
    m.add_argument("--oracle-loc-rule", choices=("consistent", "identity"), default="consistent",
                   help="oracle T_loc: Yes when the caption's facts fit the image (consistent) or when it is the "
                        "caption's own identity (identity)")
    m.add_argument("--oracle-latency", type=float, default=0.0, help="oracle: simulated seconds per request")
    m.add_argument("--prompts", default=None, help="YAML/JSON file replacing prompt templates")
    t = ap.add_argument_group("THI")
    t.add_argument("--rounds", type=int, default=5, help="K")
    t.add_argument("--xi", type=float, default=None, help="ξ (default 0.55 on ICFG-PEDES, else 0.50)")
    t.add_argument("--lambda", dest="lam", type=float, default=0.8, help="λ")
    t.add_argument("--gate", choices=GATES, default="released")
    t.add_argument("--exhaustive", action="store_true", help="ask every T_loc call the released code asks")
    t.add_argument("--batch-size", type=int, default=128, help="MLLM requests per batch")
    t.add_argument("--tau", type=float, default=None,
                   help="accept a T_loc Yes when p_yes > τ (default: the released text rule; 0.5 = greedy Yes/No)")
    t.add_argument("--anchor", choices=ANCHOR_RULES, default="first",
                   help="beyond the paper: 'max-p' takes the candidate with the highest p_yes among those asked "
                        "as the anchor, instead of the first Yes")
    t.add_argument("--fuse", type=float, default=0.0,
                   help="beyond the paper: add FUSE x (p_yes - 0.5) to the re-ranked score of every candidate asked")
    o = ap.add_argument_group("output")
    o.add_argument("--out", required=True)
    o.add_argument("--cache-dir", default=None, help="answer cache folder (default OUT/cache)")
    o.add_argument("--lambda-sweep", type=float, nargs="*", default=[0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    o.add_argument("--xi-sweep", type=float, nargs="*", default=None,
                   help="ξ values re-run through the answer cache (default ξ±0.05, ξ±0.1; empty to skip)")
    o.add_argument("--tau-sweep", type=float, nargs="*", default=None,
                   help="τ values of a ξ x τ grid of R1/mAP replayed from the answer cache (no T_loc call; "
                        f"no values: {' '.join(map(str, DEFAULT_TAU_SWEEP))}); the run asks what the grid needs")
    o.add_argument("--strips", type=int, default=4, help="queries in the top-10 strip figure (0: none)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    return ap


# -- wiring ------------------------------------------------------------------------------------

class _Retrieval:
    """Base similarity, gallery features and the text encoder, whichever retriever is used."""

    def __init__(self, spec: str, root: Path, gallery_paths: list[str], query_texts: list[str], cache_dir: Path):
        from mllm_tune.core.retrievers import RetrieverLoadError, encode_gallery, load_retriever

        t0 = time.perf_counter()
        try:
            ret = load_retriever(spec)
        except RetrieverLoadError as exc:
            raise SystemExit(f"error: {exc}") from exc
        self.identity = str(ret.identity)
        # a simulation's features come from ground truth: never cached, always labelled
        self.simulated = bool(getattr(ret, "simulated", False))
        try:
            self.gallery = (ret.encode_images(gallery_paths) if self.simulated
                            else encode_gallery(ret, gallery_paths, cache_dir))
        except ValueError as exc:
            if self.simulated:
                raise SystemExit(f"error: {exc}") from exc
            raise
        self.model = ret
        self.encode_text = lambda texts: ret.encode_texts(texts, progress=False)
        with torch.no_grad():
            self.queries = ret.encode_texts(list(query_texts)).float()
        self.gallery = self.gallery.float()
        self.base = self.queries @ self.gallery.T
        self.seconds = time.perf_counter() - t0

    def release_gpu(self) -> bool:
        """Move the retriever's weights to the CPU and free the CUDA cache, so an engine that
        sizes itself by free GPU memory (vLLM) gets it. The text encoder stays usable (THI
        encodes rewritten queries on the CPU: a few hundred short texts). False: nothing to do."""
        import gc

        if not torch.cuda.is_available():
            return False
        moved = False
        for value in vars(self.model).values():
            if isinstance(value, torch.nn.Module):
                value.to("cpu")
                moved = True
        if hasattr(self.model, "device"):
            self.model.device = torch.device("cpu")
        gc.collect()
        torch.cuda.empty_cache()
        return moved


def build_backend(args: argparse.Namespace, prompts) -> MLLMBackend:
    kw: dict[str, Any] = {}
    if args.mllm == "oracle":
        kw = dict(dataset_root=args.dataset_root, error_rate=args.oracle_error_rate, loc_rule=args.oracle_loc_rule,
                  prompts=prompts, latency=args.oracle_latency)
    elif args.mllm in ("hf", "vllm"):
        if not args.model:
            raise CLIError(f"--mllm {args.mllm} needs --model (a local model folder or a hub id org/name)")
        kw.update(model=args.model, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                  min_pixels=args.min_pixels, max_pixels=args.max_pixels, dtype=args.dtype,
                  batch_size=args.batch_size, adapter_tasks=("loc",) if args.adapter_only_loc else None)
        if args.mllm == "vllm":
            kw.update(vllm_engine_options(args))  # --vllm-dtype, when given, wins over --dtype
        else:
            kw.update(loc_answer=args.loc_answer)
    elif args.mllm == "openai":
        if not args.model:
            raise CLIError("--mllm openai needs --model (the served model name)")
        # min/max pixels state the server's budget (see the openai backend); the adapter folder, when
        # given, supplies the budget it was trained with
        urls = base_urls(args)
        kw = dict(base_url=urls[0] if len(urls) == 1 else urls, model=args.model, api_key=os.environ.get(args.api_key_env),
                  concurrency=args.concurrency, max_new_tokens=args.max_new_tokens, min_pixels=args.min_pixels,
                  max_pixels=args.max_pixels, adapter=args.adapter if args.adapter and Path(args.adapter).is_dir() else None)
    return make_backend(args.mllm, **kw)


def base_urls(args: argparse.Namespace) -> list[str]:
    """The openai servers of the run: every --base-url, then the lines of --base-url-file."""
    from mllm_tune.core.backends.openai_compat import read_url_file

    urls = list(getattr(args, "base_url", None) or [])
    if getattr(args, "base_url_file", None):
        urls += read_url_file(args.base_url_file)
    return urls or ["http://127.0.0.1:8000/v1"]


def check_positives(qpids: Sequence[int], gpids: Sequence[int], where: str) -> None:
    have = set(gpids)
    bad = [i for i, p in enumerate(qpids) if p not in have]
    if bad:
        raise SystemExit(
            f"error: {len(bad)} of {len(qpids)} queries of {where} have no image of their identity in the gallery "
            f"(first query {bad[0]}, person id {qpids[bad[0]]}); every query needs at least one gallery "
            "positive: use the same split for queries and gallery, or a gallery split that holds their identities"
        )


def _dist_state():
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    from accelerate import PartialState

    # the processes meet at a barrier after their shares of THI, which can finish hours apart on
    # a large split; the collective's default 10-minute timeout would abort the early ones
    hours = float(os.environ.get("MLLM_TUNE_BARRIER_HOURS", "48"))
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=hours))


def _rounded(m: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in m.items()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a reader never sees a half-written results file


def format_table(res: dict) -> str:
    head = f"| {'setting':<22} | " + " | ".join(f"{k:>6}" for k in METRIC_KEYS) + " | refined |"
    sep = "|" + "-" * 24 + "|" + "|".join("-" * 8 for _ in METRIC_KEYS) + "|---------|"
    rows = [head, sep, f"| {'base (' + res['config']['retriever_short'] + ')':<22} | "
            + " | ".join(f"{res['base'][k]:>6.2f}" for k in METRIC_KEYS) + f" | {0:>7} |"]
    for r in res["rounds"]:
        rows.append(f"| {'+ THI round ' + str(r['round']):<22} | " + " | ".join(f"{r[k]:>6.2f}" for k in METRIC_KEYS)
                    + f" | {r['refined']:>7} |")
    c = res["config"]
    data = (f"{c['source']} -> {c['target']}" if c.get("source") and c["source"] != c["target"]
            else c["target"])  # a cross-domain run (Tables 3-4) says so in its title
    title = (f"{data} ({c['split']}): {res['num_queries']} queries x {res['num_gallery']} images, "
             f"retriever {c['retriever_short']}, MLLM {c['mllm']}, K={c['rounds']} ξ={c['xi']} λ={c['lambda']} "
             f"gate={c['gate']}{' exhaustive' if c['exhaustive'] else ''}"
             f"{'' if c.get('tau') is None else ' τ=' + str(c['tau'])}"
             f"{'' if c.get('anchor', 'first') == 'first' else ' anchor=' + c['anchor']}"
             f"{' fuse=' + str(c['fuse']) if c.get('fuse') else ''}")
    lines = [title]
    if res["simulated"]:
        lines.insert(0, " | ".join(res["simulation_notes"]))
    calls = res["calls"]
    lines += rows + [f"MLLM calls asked: loc {calls['loc']}, vqa {calls['vqa']}, aggr {calls['aggr']}; "
                     f"sent to the backend {sum(res['backend_calls'].values())}, cache hits {sum(res['cache_hits'].values())}"]
    if res.get("peer_metrics"):
        lines += ["", peer_table(res)]
    if res.get("tau_grid"):
        lines += ["", grid_table(res["tau_grid"])]
    if res.get("paper_comparison"):
        lines += ["", res["paper_comparison"].rstrip()]
    return "\n".join(lines)


def grid_table(grid: list[dict]) -> str:
    """R1 / mAP over the ξ x τ grid: one row per ξ, one column per τ."""
    taus = sorted({e["tau"] for e in grid})
    cell = {(e["xi"], e["tau"]): e for e in grid}
    lines = ["R1 / mAP over ξ (rows) x τ (columns), replayed from the answer cache:",
             "| ξ \\ τ | " + " | ".join(f"{t:>11g}" for t in taus) + " |",
             "|------|" + "|".join("-" * 13 for _ in taus) + "|"]
    for x in sorted({e["xi"] for e in grid}):
        lines.append(f"| {x:<4g} | " + " | ".join(f"{cell[(x, t)]['R1']:>5.2f}/{cell[(x, t)]['mAP']:<5.2f}"
                                                 for t in taus) + " |")
    return "\n".join(lines)


def peer_table(res: dict) -> str:
    """What interactive-retrieval papers report, per round, plus MLLM calls and time per query."""
    keys = ("Hits@1", "Hits@5", "Hits@10", "mFR", "BRI")
    head = "| round | " + " | ".join(keys) + " | MLLM calls / query (cumulative) |"
    lines = ["Interactive-retrieval metrics (Hits@K cumulative over rounds; mFR = mean 1-based rank of the first "
             "match; BRI = PlugIR's best log-rank integral, lower is better):", head, "|" + "---|" * (len(keys) + 2)]
    cum = {c["round"]: c["cumulative_per_query"] for c in res.get("calls_by_round", [])}
    for row in res["peer_metrics"]:
        lines.append(f"| {row['round']} | " + " | ".join(f"{row[k]:.2f}" if k.startswith("Hits") else f"{row[k]:.3f}"
                                                         for k in keys) + f" | {cum.get(row['round'], 0.0):.3f} |")
    t = res.get("seconds_per_query", {})
    if t:
        lines.append(f"THI seconds per query: {t['mean']:.4f} (mean over the run; {t['per_query']})")
    return "\n".join(lines)


def peer_rounds(res: THIResult, qp: Sequence[int], gp: Sequence[int]) -> list[dict[str, float]]:
    """Per-round peer metrics (round 0 = base) from first-match ranks; only refined rows are re-ranked."""
    from eval import peer_metrics

    base = peer_metrics.first_match_ranks(res.base, qp, gp)
    qpt = torch.as_tensor(list(qp))
    hist = [base]
    for r in range(res.config.rounds):
        ranks = base.clone()
        if res.gallery_feats is not None:
            for idx, rows in res.refined_rows(r):
                ranks[idx] = peer_metrics.first_match_ranks(rows, qpt[idx].tolist(), gp)
        hist.append(ranks)
    return peer_metrics.per_round(hist)


def calls_by_round(res: THIResult, rounds: list[dict]) -> list[dict[str, Any]]:
    """MLLM calls asked in each round (T_loc asks, T_vqa per new anchor image in minimal mode, one
    T_aggr per refined query) and their running total per query, beside R1: the R1-vs-calls curve."""
    out, seen, cum = [], set(), 0
    q = max(len(res.decisions), 1)
    for r in range(res.config.rounds):
        loc = sum(1 for d in res.decisions if r in d.loc)
        acc = [d for d in res.decisions if d.refined_round == r]
        anchors = [d.anchor for d in acc] if res.config.exhaustive else [a for a in dict.fromkeys(d.anchor for d in acc) if a not in seen]
        seen.update(d.anchor for d in acc)
        cum += loc + len(anchors) + len(acc)
        out.append({"round": r + 1, "loc": loc, "vqa": len(anchors), "aggr": len(acc), "cumulative": cum,
                    "cumulative_per_query": round(cum / q, 4), "R1": rounds[r]["R1"]})
    return out


# -- main ----------------------------------------------------------------------------------------

def run(args: argparse.Namespace, backend: MLLMBackend | None = None) -> dict:
    """Run the harness for parsed ``args``. ``backend`` overrides --mllm (tests)."""
    from mllm_tune.core.pedes import dataset_format, load_pedes

    t_start = time.perf_counter()
    state = _dist_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    is_main = rank == 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    if is_main:
        # a stale results.json must never pass for the result of this (possibly failing) run
        for stale in ("results.json", "table.md"):
            (out / stale).unlink(missing_ok=True)
        _write_json(out / "run_state.json", {"status": "running", "argv": sys.argv, "started": time.time()})
        # the shard files a killed sharded run left (any number of processes) join the merged cache
        # before any process reads it, so a resumed run never asks them again
        merged_at_start = merge_shards(cache_dir) if (world > 1 or shard_files(cache_dir)) else None
        if merged_at_start and merged_at_start["shards"]:
            logger.info("answer cache: merged %d shard file(s) of an earlier run into %s (%d answers)",
                        merged_at_start["shards"], merged_at_start["merged_into"], merged_at_start["rows"])

    try:
        fmt = dataset_format(args.dataset)
    except ValueError as exc:
        raise CLIError(f"--dataset: {exc}") from None
    xi = args.xi if args.xi is not None else (0.55 if fmt.name == "icfg-pedes" else 0.50)
    prompts = load_prompts(args.prompts)
    check_dataset_root(args.dataset_root)
    ds = load_pedes(args.dataset_root, args.dataset)  # a malformed annotation file is named here
    # the backend is built (model/adapter arguments checked, hub ids resolved) before the retriever
    # encodes anything, so a wrong --model fails in a second; hf/vllm load weights on first use
    inner = backend if backend is not None else build_backend(args, prompts)
    gal_view = ds.split(args.split)
    q_view = ds.split(args.query_split) if args.query_split else gal_view
    check_positives(q_view.query_pids, gal_view.gallery_pids, f"{args.dataset_root} split '{q_view.split}'")
    Q, G = len(q_view.query_texts), len(gal_view.gallery_paths)
    logger.info("%d queries x %d gallery images (%s)", Q, G, args.dataset)

    if state is not None and not is_main:
        state.wait_for_everyone()  # the main process fills the feature cache first; the others read it
    retrieval = _Retrieval(args.retriever, Path(args.dataset_root), gal_view.gallery_paths, q_view.query_texts,
                           Path(args.feature_cache) if args.feature_cache else out / "features")
    if state is not None and is_main:
        state.wait_for_everyone()
    # one cache file per process when sharded (safe on a network file system), else answers.sqlite
    cached = CachedBackend(inner, cache_dir, shard=rank if world > 1 else None)
    offloaded = bool(args.mllm == "vllm" and backend is None and retrieval.release_gpu())
    xis = args.xi_sweep if args.xi_sweep is not None else [round(xi + d, 4) for d in (-0.1, -0.05, 0.05, 0.1)]
    taus = None if args.tau_sweep is None else (list(args.tau_sweep) or list(DEFAULT_TAU_SWEEP))
    grid_xis = sorted({*xis, xi})
    # a τ grid is replayed from the cache: this run asks every T_loc answer the grid (and the ξ sweep) needs
    cover = tuple((x, t) for x in grid_xis for t in [*(taus or []), args.tau]) if taus else ()
    try:
        cfg = THIConfig(rounds=args.rounds, xi=xi, lam=args.lam, gate=args.gate, exhaustive=args.exhaustive,
                        batch_size=args.batch_size, tau=args.tau, anchor=args.anchor, fuse=args.fuse, cover=cover)
    except ValueError as exc:
        raise CLIError(f"THI settings: {exc}") from None
    progress = not args.no_progress
    S = retrieval.base

    shard_stats: list[dict] = []
    if world > 1:
        # every process answers its share of the queries into its own cache file ...
        idx = list(range(rank, Q, world))
        part = run_thi(S[idx], [q_view.query_texts[i] for i in idx], gal_view.gallery_paths, cached, None, None,
                       cfg, prompts, progress=progress and is_main)
        _write_json(out / f"shard_{rank}.json", {"rank": rank, "queries": len(idx), **cached.stats(),
                                                 "stage_seconds": part.stage_seconds,
                                                 **_server_report(inner)})
        cached.close_cache()  # written and closed before the main process merges it
        state.wait_for_everyone()
        if not is_main:
            inner.close()
            _destroy_group()
            return {}
        shard_stats = [json.loads((out / f"shard_{r}.json").read_text()) for r in range(world)]
        # ... the main process merges every shard into answers.sqlite (atomically) ...
        merged = merge_shards(cache_dir)
        logger.info("answer cache: merged %d shard file(s) into %s (%d answers)", merged["shards"],
                    merged["merged_into"], merged["rows"])
        cached = CachedBackend(inner, cache_dir)
    # ... and the main process runs Algorithm 1 over all queries (from the cache when sharded)
    res = run_thi(S, q_view.query_texts, gal_view.gallery_paths, cached, retrieval.encode_text, retrieval.gallery,
                  cfg, prompts, progress=progress)
    stats = cached.stats()
    if shard_stats:
        if sum(stats["backend_calls"].values()):
            logger.warning("the main process needed %d calls the shards did not make", sum(stats["backend_calls"].values()))
        stats["main_replay_hits"] = stats["cache_hits"]
        for key in ("backend_calls", "cache_hits"):
            merged: dict[str, int] = {}
            for s in shard_stats + [stats if key == "backend_calls" else {key: {}}]:
                for t, v in s[key].items():
                    merged[t] = merged.get(t, 0) + v
            stats[key] = merged

    t0 = time.perf_counter()
    qp, gp = q_view.query_pids, gal_view.gallery_pids
    # the base's per-query values once; each round / λ / ξ re-ranks only its refined rows (no Q x G copy)
    from mllm_tune.core.metrics import mean_metrics, per_query_metrics

    base_pq = per_query_metrics(S, qp, gp)
    base_m = _rounded(mean_metrics(base_pq))
    rounds = []
    for r in range(cfg.rounds):
        rounds.append({"round": r + 1, **_rounded(res.metrics(qp, gp, r, base_per_query=base_pq)),
                       "refined": res.refined_count(r)})
    peer = peer_rounds(res, qp, gp)
    by_round = calls_by_round(res, rounds)
    t_metrics = time.perf_counter() - t0
    lam_sweep = [{"lambda": lam, **_rounded(res.metrics(qp, gp, lam=lam, base_per_query=base_pq))}
                 for lam in args.lambda_sweep]

    def replay(**change: Any) -> dict[str, Any]:
        """Metrics and refined count of THI with ``cfg`` changed, answered from the cache where it can."""
        r_c = run_thi(S, q_view.query_texts, gal_view.gallery_paths, cached, retrieval.encode_text, retrieval.gallery,
                      dataclasses.replace(cfg, cover=(), **change), prompts, progress=False)
        return {**_rounded(r_c.metrics(qp, gp, base_per_query=base_pq)), "refined": r_c.refined_count()}

    xi_sweep = []
    sweep_calls_before = sum(cached.calls.values())
    for x in xis:
        xi_sweep.append({"xi": x, **replay(xi=x)})
    if any(abs(x["xi"] - xi) < 1e-12 for x in xi_sweep) is False:
        xi_sweep.append({"xi": xi, **rounds[-1]})
        xi_sweep[-1].pop("round", None)
    xi_sweep.sort(key=lambda e: e["xi"])
    sweep_calls = sum(cached.calls.values()) - sweep_calls_before
    tau_grid, grid_calls = [], {}
    if taus:
        before = dict(cached.calls)
        tau_grid = [{"xi": x, "tau": t, **replay(xi=x, tau=t)} for x in grid_xis for t in taus]
        grid_calls = {k: v - before.get(k, 0) for k, v in cached.calls.items() if v - before.get(k, 0)}
        if grid_calls.get("loc"):
            logger.warning("the ξ x τ grid asked %d T_loc calls the run had not asked", grid_calls["loc"])

    identity = inner.identity()
    simulated = bool(inner.simulated or retrieval.simulated)
    notes = []
    if inner.simulated:
        notes.append(identity.get("label", "simulated MLLM backend"))
    if retrieval.simulated:
        notes.append(retrieval.identity)
    config = {
        "dataset": fmt.name, "dataset_root": str(args.dataset_root), "split": gal_view.split,
        "query_split": q_view.split, "source": args.source or retriever_trained_on(args.retriever),
        "target": args.target or args.dataset,
        "retriever": args.retriever, "retriever_identity": retrieval.identity,
        "retriever_short": Path(args.retriever).name or args.retriever,
        "mllm": args.mllm, "model": args.model, "adapter": args.adapter, "adapter_only_loc": args.adapter_only_loc,
        "backend_identity": identity,
        "backend_config": backend_config(args),
        # the vllm engine's effective settings (derived max_model_len etc.), as it ran
        **({"engine_settings": inner.engine_settings()} if hasattr(inner, "engine_settings") else {}),
        "retriever_moved_to_cpu": offloaded,
        "pixel_budget": (inner.pixel_budget.as_dict() if getattr(inner, "pixel_budget", None) is not None
                         else "not applicable"),
        "decoding": identity.get("decoding"), "rounds": cfg.rounds, "xi": xi, "lambda": cfg.lam, "gate": cfg.gate,
        "exhaustive": cfg.exhaustive, "batch_size": cfg.batch_size, "processes": world,
        "tau": cfg.tau, "anchor": cfg.anchor, "fuse": cfg.fuse,
        "loc_decision": ("released text rule (an answer containing 'yes')" if cfg.tau is None
                         else f"p_yes > {cfg.tau}") + ("" if cfg.anchor == "first" else "; anchor: highest p_yes (option a)")
                        + (f"; p_yes fused into the re-ranking with weight {cfg.fuse} (option b)" if cfg.fuse else ""),
        "prompts": args.prompts or "default", "cache_dir": str(cache_dir),
    }
    results = {
        "complete": True,
        "simulated": simulated,
        "simulation_notes": notes,
        "config": config,
        "num_queries": Q,
        "num_gallery": G,
        "base": base_m,
        "rounds": rounds,
        "refined": res.refined_count(),
        "calls": res.calls,
        "backend_calls": stats["backend_calls"],
        "cache_hits": stats["cache_hits"],
        **({"main_replay_hits": stats["main_replay_hits"]} if shard_stats else {}),
        **_server_report(inner),
        **({"servers_by_process": {s["rank"]: s["servers"] for s in shard_stats if "servers" in s}}
           if shard_stats else {}),
        "xi_sweep_backend_calls": sweep_calls,
        "peer_metrics": peer,
        "calls_by_round": by_round,
        "calls_per_query": {k: round(v / max(Q, 1), 4) for k, v in res.calls.items()},
        "seconds_per_query": {
            "mean": round(sum(res.stage_seconds.values()) / max(Q, 1), 6),
            "per_query": "p50/p95 not measurable: requests are answered in batches across queries"},
        "visual_tokens": visual_token_report(inner),
        "wall_seconds": {
            "retriever_encode": round(retrieval.seconds, 3),
            **{f"thi_{k}": v for k, v in res.stage_seconds.items()},
            **({"shard_thi_max": {k: max(s["stage_seconds"][k] for s in shard_stats) for k in res.stage_seconds}}
               if shard_stats else {}),
            "metrics": round(t_metrics, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
        "lambda_sweep": lam_sweep,
        "xi_sweep": xi_sweep,
        "loc_scores": loc_score_report(res, inner),
        **({"tau_grid": tau_grid, "tau_grid_backend_calls": grid_calls} if taus else {}),
    }
    results["paper_comparison"] = paper_section(results)
    write_decisions(out / "decisions.jsonl", res, q_view, gal_view)
    table = format_table(results)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    if not args.no_plots:
        try:
            results["figures"] = make_plots(out, results, res, q_view, gal_view, args.strips)
        except Exception as e:  # a figure must not cost a finished run its results.json
            logger.warning("no plots (%s: %s); the results are in %s%s", type(e).__name__, e, out / "results.json",
                           " (pip install matplotlib)" if isinstance(e, ImportError) else "")
            results["figures_error"] = f"{type(e).__name__}: {e}"
    results["wall_seconds"]["total"] = round(time.perf_counter() - t_start, 3)
    _write_json(out / "results.json", results)
    _write_json(out / "run_state.json", {"status": "complete", "finished": time.time()})
    print(table)
    cached.close()
    _destroy_group()
    return results


def retriever_trained_on(spec: str) -> str | None:
    """The training dataset a retriever says it was trained on: ``dataset_name`` of an IRRA/RDE run's
    configs.yaml, or ``trained_on`` in a saved retriever folder's retriever.json."""
    head = spec.split("?", 1)[0]
    kind, _, rest = head.partition(":")
    try:
        if kind.lower() in ("irra", "rde"):
            from mllm_tune.core.retrievers.irra import read_run_config

            path = Path(rest)
            name = read_run_config(path / "best.pth" if path.is_dir() else path).get("dataset_name")
        else:
            f = Path(head) / "retriever.json"
            name = json.loads(f.read_text(encoding="utf-8")).get("trained_on") if f.is_file() else None
    except (OSError, ValueError):
        return None
    return str(name).lower() if name else None


def paper_section(results: dict) -> str | None:
    """Our rows beside the paper's for a run on one of its datasets with a family it reports."""
    from eval.compare_paper import compare, to_markdown

    try:
        return to_markdown(compare(results))
    except (ValueError, KeyError):
        return None  # another dataset (SynthPEDES) or retriever family: `eval.compare_paper --paper-dataset`


def backend_config(args: argparse.Namespace) -> dict[str, Any]:
    """The backend settings given on the command line (None: the backend's default)."""
    cfg: dict[str, Any] = {"kind": args.mllm, "max_new_tokens": args.max_new_tokens, "min_pixels": args.min_pixels,
                           "max_pixels": args.max_pixels, "dtype": args.dtype}
    if args.mllm == "hf":
        cfg["loc_answer"] = args.loc_answer
    if args.mllm == "vllm":
        cfg["vllm_engine"] = vllm_engine_options(args)
    if args.mllm == "openai":
        cfg["base_urls"] = base_urls(args)
    return cfg


def loc_score_report(res: THIResult, backend: MLLMBackend) -> dict[str, Any]:
    """How many T_loc answers of the run carry p_yes, their mean, and (hf, vllm) how many had a
    greedy first token that was neither Yes nor No."""
    ps = [p for d in res.decisions for p in d.p_yes.values()]
    scored = [p for p in ps if p is not None]
    out: dict[str, Any] = {"answers": len(ps), "scored": len(scored),
                           "mean_p_yes": round(sum(scored) / len(scored), 4) if scored else None}
    if hasattr(backend, "loc_first_not_yes_no"):  # hf and vllm count them
        out["first_token_not_yes_no"] = int(backend.loc_first_not_yes_no)
    if hasattr(backend, "loc_answer"):  # hf only: generate or forward
        out["hf_loc_answer"] = backend.loc_answer
    return out


def _server_report(backend: MLLMBackend) -> dict[str, Any]:
    """Requests, errors, retries and seconds lost per server (openai backend), else nothing."""
    stats = getattr(backend, "server_stats", None)
    return {"servers": stats()} if callable(stats) else {}


def visual_token_report(backend: MLLMBackend) -> dict[str, Any]:
    """Mean visual tokens per image the backend encoded in this run (hf: counted in the model
    inputs; openai: expected from the stated server budget). Cache hits encode nothing."""
    stats = getattr(backend, "visual_token_stats", None)
    if stats is None:
        return {"images": 0, "mean_visual_tokens": None, "measured": f"not measured by the {backend.kind} backend"}
    out = dict(stats())
    if not out.get("images"):
        out["measured"] = "not measured: no image was sent to the backend in this run (all answers from the cache?)"
    return out


def _destroy_group() -> None:
    # an explicit teardown avoids rare aborts at interpreter exit after a multi-process run
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def write_decisions(path: Path, res: THIResult, q_view, gal_view) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in res.decisions:
            row = {"query": d.query, "caption": q_view.query_texts[d.query], "pid": q_view.query_pids[d.query],
                   **{k: v for k, v in d.to_dict().items() if k != "query"},
                   "anchor_path": gal_view.gallery_paths[d.anchor] if d.anchor is not None else None,
                   "anchor_correct": (gal_view.gallery_pids[d.anchor] == q_view.query_pids[d.query])
                   if d.anchor is not None else None}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def make_plots(out: Path, results: dict, res: THIResult, q_view, gal_view, n_strips: int) -> dict[str, str]:
    from eval import plots

    label = "SIMULATION" if results["simulated"] else None
    figs = {"metrics_vs_round": plots.metrics_vs_round(results["base"], results["rounds"], out / "metrics_vs_round.png", label)}
    if results["lambda_sweep"]:
        figs["lambda_sweep"] = plots.sweep([e["lambda"] for e in results["lambda_sweep"]], results["lambda_sweep"],
                                           out / "lambda_sweep.png", "λ", results["base"], label)
    if len(results["xi_sweep"]) > 1:
        figs["xi_sweep"] = plots.sweep([e["xi"] for e in results["xi_sweep"]], results["xi_sweep"],
                                       out / "xi_sweep.png", "ξ", results["base"], label)
    if results.get("tau_grid"):
        figs["xi_tau_grid"] = plots.grid_heatmap(results["tau_grid"], out / "xi_tau_grid.png", label)
    if results.get("peer_metrics"):
        figs["peer_vs_round"] = plots.peer_vs_round(results["peer_metrics"], out / "peer_vs_round.png", label)
    if results.get("calls_by_round"):
        figs["r1_vs_calls"] = plots.r1_vs_calls(results["base"]["R1"], results["calls_by_round"],
                                                out / "r1_vs_calls.png", label)
    if n_strips > 0 and res.refined:
        # prefer queries whose top-1 changed; only the drawn rows of Ŝ are built
        top1 = res.top1()
        changed = [q for q in res.refined if int(res.base[q].argmax()) != int(top1[q])]
        pick = (changed + [q for q in res.refined if q not in changed])[:n_strips]
        after = dict(zip(pick, res.score_rows(pick)))
        figs["top10_strips"] = plots.topk_strips(res.base, after, pick, q_view.query_texts, q_view.query_pids,
                                                 gal_view.gallery_paths, gal_view.gallery_pids,
                                                 out / "top10_strips.png", label=label)
    return {k: str(v) for k, v in figs.items()}


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not argv:
        argv = default_args()
        print("No arguments: running the embedded default, the shipped demo models (clip-synthpedes "
              "retriever, SynthPEDES-VL with the hf backend) on a generated SynthPEDES test split.\n  "
              + " ".join(argv))
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except user_errors(BackendError) as exc:  # a clear one-line error (file + fix), and no results.json (see run)
        if os.environ.get("MLLM_TUNE_TRACEBACK"):
            raise
        raise SystemExit(f"error: {one_line(exc)}") from exc


if __name__ == "__main__":
    main()
