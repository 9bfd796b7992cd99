"""RDA caption groups (SPEC §6): enrich, decompose, paraphrase every training caption with an MLLM.

    python -m data_builders.rda --dataset-root DIR --dataset cuhk-pedes --mllm hf --model QWEN_DIR \\
        --out rda/ [--m 3] [--cache-dir rda/answer_cache]

``--model`` is a local folder or a hub id ``org/name[@revision]``. Images are resized to the
training budget (min = max = 50,176 pixels unless ``--min-pixels/--max-pixels`` or the adapter's
saved processor say otherwise); answer caps are per task (``--max-new-tokens loc=..,vqa=..``).
The budget and the mean visual tokens per image go into ``rda_stats.json``.

Per caption: (1) enrich: T_vqa on its image (asked once per image: the question does not depend
on the caption), the numbered answer split into short sentences, then T_aggr merges caption +
sentences; (2) T_dec splits the enriched text into attribute sub-sentences; (3) T_rwt rewrites
each sub-sentence into ``m`` paraphrases, one group per sub-sentence.

Output ``OUT/rda.jsonl``, one line per caption of the split in annotation order (the format
``mllm_tune/rda_text.py`` reads): ``{"record_index", "caption_index", "caption", "enriched",
"groups": [[paraphrase, ...], ...]}``, plus ``OUT/rda_stats.json``.

Every MLLM call goes through :class:`~mllm_tune.core.backends.CachedBackend`, stage by stage in
batches; each batch of answers is committed to the on-disk cache before the next is asked, so a
killed run, rerun with the same settings, asks nothing twice. The output file is written
atomically at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionRef:
    """One caption of the split and where it sits in the annotation file."""

    record_index: int
    caption_index: int
    caption: str
    image: str


def split_captions(view) -> list[CaptionRef]:
    """The split's captions in annotation order (the order of ``SplitView.query_texts``)."""
    return [
        CaptionRef(r.index, j, c, str(r.image_path))
        for r in view.records
        for j, c in enumerate(r.captions)
    ]


def _ask(backend, requests: list, batch_size: int, desc: str, progress: bool) -> list[str]:
    """Answer requests in batches; each batch is persisted by the cache before the next."""
    out: list[str] = []
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, unit="req")
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        out.extend(backend.generate(batch))
        bar.update(len(batch))
    bar.close()
    return out


def _dedupe(items: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for s in items:
        s = " ".join(s.split())
        key = s.lower().rstrip(".!? ")
        if s and key not in seen:
            seen.add(key)
            out.append(s)
    return out


def build_groups(
    captions: Sequence[CaptionRef],
    backend,
    m: int = 3,
    prompts=None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the three RDA stages over ``captions`` with ``backend`` (wrap it in CachedBackend).

    Returns the output lines (aligned with ``captions``) and counts. Parsing fallbacks keep every
    caption usable: an empty decomposition falls back to the enriched text as one sub-sentence,
    an empty rewrite to the sub-sentence itself; both are counted.
    """
    from mllm_tune.core.backends import MLLMRequest
    from mllm_tune.core.prompts import DEFAULT_PROMPTS, split_lines

    if m < 1:
        raise ValueError(f"m (paraphrases per sub-sentence) must be >= 1, got {m}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = prompts or DEFAULT_PROMPTS
    counts = {"captions": len(captions), "empty_vqa": 0, "dec_fallback": 0, "rwt_fallback": 0}

    # 1a. T_vqa once per distinct image
    images = list(dict.fromkeys(c.image for c in captions))
    vqa_prompt = prompts.render_vqa()
    vqa = _ask(backend, [MLLMRequest("vqa", vqa_prompt, img) for img in images], batch_size, "RDA 1/4 vqa", progress)
    facts_of = {img: prompts.parse_vqa(a) for img, a in zip(images, vqa)}  # ours or the released handling
    counts["images"] = len(images)
    counts["empty_vqa"] = sum(1 for f in facts_of.values() if not f)

    # 1b. T_aggr: caption + facts -> enriched text (text only)
    aggr = _ask(backend, [MLLMRequest("aggr", prompts.render_aggr(c.caption, facts_of[c.image])) for c in captions],
                batch_size, "RDA 2/4 aggr", progress)
    enriched = [" ".join(a.split()) or c.caption for a, c in zip(aggr, captions)]

    # 2. T_dec: enriched -> attribute sub-sentences
    dec = _ask(backend, [MLLMRequest("dec", prompts.render_dec(t)) for t in enriched], batch_size, "RDA 3/4 dec",
               progress)
    subs: list[list[str]] = []
    for text, answer in zip(enriched, dec):
        parts = _dedupe(split_lines(answer))
        if not parts:
            counts["dec_fallback"] += 1
            parts = [text]
        subs.append(parts)

    # 3. T_rwt: each distinct sub-sentence -> m paraphrases
    distinct = list(dict.fromkeys(s for parts in subs for s in parts))
    rwt = _ask(backend, [MLLMRequest("rwt", prompts.render_rwt(s, m)) for s in distinct], batch_size, "RDA 4/4 rwt",
               progress)
    para: dict[str, list[str]] = {}
    for s, answer in zip(distinct, rwt):
        got = _dedupe(split_lines(answer))[:m]
        if not got:
            counts["rwt_fallback"] += 1
            got = [s]
        para[s] = got
    counts["sub_sentences"] = len(distinct)

    lines = [
        {
            "record_index": c.record_index,
            "caption_index": c.caption_index,
            "caption": c.caption,
            "enriched": text,
            "groups": [para[s] for s in parts],
        }
        for c, text, parts in zip(captions, enriched, subs)
    ]
    n = max(len(lines), 1)
    counts["groups_per_caption"] = round(sum(len(x["groups"]) for x in lines) / n, 3)
    counts["paraphrases_per_group"] = round(
        sum(len(g) for x in lines for g in x["groups"]) / max(sum(len(x["groups"]) for x in lines), 1), 3)
    return lines, counts


def write_jsonl_atomic(lines: Sequence[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for x in lines:
            fh.write(json.dumps(x, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run(
    dataset_root: str | Path,
    dataset: str,
    out: str | Path,
    backend,
    split: str = "train",
    m: int = 3,
    cache_dir: str | Path | None = None,
    prompts_file: str | Path | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    backend_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build ``OUT/rda.jsonl`` for ``split``; ``backend`` is an MLLMBackend (wrapped in the cache here).
    ``backend_config``: the command-line backend settings, recorded in ``rda_stats.json``."""
    from mllm_tune.core.pedes import load_pedes
    from mllm_tune.core.backends import CachedBackend
    from mllm_tune.core.prompts import load_prompts

    t0 = time.time()
    prompts = load_prompts(prompts_file)
    view = load_pedes(dataset_root, dataset).split(split)
    caps = split_captions(view)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        caps = caps[:limit]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out / "answer_cache"
    cached = backend if isinstance(backend, CachedBackend) else CachedBackend(backend, cache_dir)
    try:
        lines, counts = build_groups(caps, cached, m, prompts, batch_size, progress)
        calls = cached.stats()
        identity = cached.identity()
        inner = cached.backend if cached.backend is not None else backend
        budget = getattr(inner, "pixel_budget", None)
        visual = visual_token_report(inner)
    finally:
        if cached is not backend:
            cached.close()
    path = out / "rda.jsonl"
    write_jsonl_atomic(lines, path)
    stats = {
        "dataset": dataset,
        "split": view.split,
        "rda_file": str(path),
        "m": m,
        **counts,
        "limit": limit,
        "backend": identity,
        "backend_config": backend_config,
        **({"engine_settings": inner.engine_settings()} if hasattr(inner, "engine_settings") else {}),
        "pixel_budget": budget.as_dict() if budget is not None else "not applicable",
        "visual_tokens": visual,
        "simulated": bool(identity.get("simulated", False)),
        "cache_dir": str(cache_dir) if cached is not backend else str(getattr(backend, "cache_dir", "")),
        **calls,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "rda_stats.json").write_text(json.dumps(stats, indent=2, default=str), encoding="utf-8")
    sent = sum(calls["backend_calls"].values())
    hits = sum(calls["cache_hits"].values())
    print(f"RDA: {len(lines):,} captions of {dataset}/{view.split} -> {path}\n"
          f"  {counts['groups_per_caption']} groups per caption, {counts['paraphrases_per_group']} paraphrases per group"
          f"\n  MLLM requests sent {sent:,}, answered from the cache {hits:,}"
          + ("\n  (SIMULATED backend: answers come from ground truth)" if stats["simulated"] else ""))
    return stats


def visual_token_report(backend: Any) -> dict[str, Any]:
    """Mean visual tokens per image the backend encoded in this run (see the backends)."""
    stats = getattr(backend, "visual_token_stats", None)
    if stats is None:
        return {"images": 0, "mean_visual_tokens": None,
                "measured": f"not measured by the {getattr(backend, 'kind', '?')} backend"}
    out = dict(stats())
    if not out.get("images"):
        out["measured"] = "not measured: no image was sent to the backend in this run (all answers from the cache?)"
    return out


def build_backend(a: argparse.Namespace, prompts) -> Any:
    from mllm_tune.core.backends import make_backend
    from mllm_tune.core.cli_exit import CLIError

    if a.mllm == "oracle":
        return make_backend("oracle", dataset_root=a.dataset_root, error_rate=a.oracle_error_rate, prompts=prompts)
    if not a.model:
        raise CLIError(f"--mllm {a.mllm} needs --model (a local model folder or hub id org/name, or the served model "
                       "name for openai)")
    common = dict(max_new_tokens=a.max_new_tokens, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    if a.mllm in ("hf", "vllm"):
        kw: dict[str, Any] = dict(model=a.model, adapter=a.adapter, dtype=a.dtype, batch_size=a.mllm_batch_size, **common)
        if a.mllm == "vllm":
            from mllm_tune.core.backends.cli_flags import vllm_engine_options

            kw.update(vllm_engine_options(a))  # --vllm-dtype, when given, wins over --dtype
        return make_backend(a.mllm, **kw)
    # openai: min/max pixels state the server's budget (--mm-processor-kwargs when it was started)
    return make_backend("openai", base_url=a.base_url, model=a.model, api_key=os.environ.get(a.api_key_env),
                        concurrency=a.concurrency, adapter=a.adapter if a.adapter and Path(a.adapter).is_dir() else None,
                        **common)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from mllm_tune.core.backends import (
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_MAX_PIXELS,
        DEFAULT_MIN_PIXELS,
        parse_max_new_tokens,
    )
    from mllm_tune.core.backends.cli_flags import add_vllm_engine_flags

    ap = argparse.ArgumentParser(prog="python -m data_builders.rda",
                                 description="Build RDA caption groups (enrich, decompose, paraphrase) with an MLLM.")
    ap.add_argument("--dataset-root", required=True)
    ap.add_argument("--dataset", required=True, help="cuhk-pedes, icfg-pedes, rstpreid or ufine6926")
    ap.add_argument("--out", required=True, help="output folder: rda.jsonl, rda_stats.json (and the answer cache)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--m", type=int, default=3, help="paraphrases per sub-sentence")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captions (trial runs)")
    ap.add_argument("--batch-size", type=int, default=64, help="requests per cached batch (a kill loses at most one)")
    ap.add_argument("--cache-dir", default=None, help="answer cache folder (default OUT/answer_cache)")
    ap.add_argument("--prompts", default=None, help="YAML/JSON file overriding prompt templates")
    b = ap.add_argument_group("MLLM backend")
    b.add_argument("--mllm", choices=["hf", "vllm", "openai", "oracle"], default="hf")
    b.add_argument("--model", default=None,
                   help="hf/vllm: local model folder or hub id org/name[@revision]; openai: served model name")
    b.add_argument("--adapter", default=None, help="LoRA adapter folder or hub id (hf/vllm); its saved processor "
                   "gives the image budget")
    b.add_argument("--max-new-tokens", type=parse_max_new_tokens, default=None,
                   help="answer cap: N for every task or per task, e.g. vqa=2048,dec=512 (default "
                        + ",".join(f"{k}={v}" for k, v in DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    b.add_argument("--min-pixels", type=int, default=None,
                   help=f"image budget, smallest area (default: the adapter's, else {DEFAULT_MIN_PIXELS}, training's "
                        "224x224); openai: the budget the server was started with")
    b.add_argument("--max-pixels", type=int, default=None,
                   help=f"image budget, largest area (default: the adapter's, else {DEFAULT_MAX_PIXELS})")
    b.add_argument("--dtype", default="auto")
    add_vllm_engine_flags(b)
    b.add_argument("--mllm-batch-size", type=int, default=8, help="prompts per forward pass (hf)")
    b.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai-compatible server")
    b.add_argument("--api-key-env", default="OPENAI_API_KEY")
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--oracle-error-rate", type=float, default=0.0)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None, backend_factory: Callable | None = None) -> dict[str, Any]:
    """CLI entry; ``backend_factory(args, prompts)`` replaces the backend construction (tests)."""
    from mllm_tune.core.prompts import load_prompts

    from mllm_tune.core.cli_exit import check_dataset_root

    a = parse_args(argv)
    from mllm_tune.core.pedes import load_pedes

    check_dataset_root(a.dataset_root)  # before any model argument is resolved or loaded
    # the annotation file is checked before the backend is built (the oracle reads it too, with
    # less helpful errors); run() parses it again, under a second even for CUHK-PEDES
    load_pedes(a.dataset_root, a.dataset).split(a.split)
    prompts = load_prompts(a.prompts)
    backend = (backend_factory or build_backend)(a, prompts)
    config: dict[str, Any] = {"kind": a.mllm, "max_new_tokens": a.max_new_tokens, "min_pixels": a.min_pixels,
                              "max_pixels": a.max_pixels, "dtype": a.dtype}
    if a.mllm == "vllm":
        from mllm_tune.core.backends.cli_flags import vllm_engine_options

        config["vllm_engine"] = vllm_engine_options(a)
    return run(a.dataset_root, a.dataset, a.out, backend, a.split, a.m, a.cache_dir, a.prompts, a.batch_size,
               a.limit, not a.no_progress, backend_config=config)


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m data_builders.rda``: bad input -> one ``error: ...`` line and exit status 2."""
    from mllm_tune.core.backends import BackendError
    from mllm_tune.core.cli_exit import run_cli

    # ValueError too: the checks in this module (--m, --limit, --batch-size, dataset name) raise it
    return run_cli(main, argv, extra=(BackendError, ValueError))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(cli())
