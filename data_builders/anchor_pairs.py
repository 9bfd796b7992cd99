"""Mine Z+/Z- anchor-localization pairs from a training split (SPEC §4).

    python -m data_builders.anchor_pairs --dataset-root DIR --dataset cuhk-pedes \\
        --retriever path/to/clip-folder --out pairs/ [--negatives-per-caption 1 ...]

Only the *training* split is read. Output (docs/architecture.md, "Anchor pairs"):
- ``OUT/`` itself: a ``datasets.DatasetDict`` (``train``, ``eval``) saved with ``save_to_disk``,
  rows in TRL's vision conversational format with absolute image paths;
- ``OUT/pairs.jsonl``: the same rows (plus ``split``), one per line;
- ``OUT/stats.json``: counts, Yes:No ratio, rank histogram of negatives, settings, retriever
  identity, ``splits_used: ["train"]``;
- with ``--export llamafactory``: ``OUT/llamafactory/{anchor_pairs_train,anchor_pairs_eval}.json``
  in LLaMA-Factory's ShareGPT format and its ``dataset_info.json``.
The eval part holds every pair of a seeded set of held-out *identities* (``--eval-fraction``),
so its captions and positives are never trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_builders.mining import MiningOptions, Pairs, mine, split_identities

logger = logging.getLogger(__name__)

SPLIT = "train"  # the only split this builder ever reads
LF_DIR = "llamafactory"


def build_rows(pairs: Pairs, captions: Sequence[str], caption_pids: Sequence[int], image_paths: Sequence[str],
               image_pids: Sequence[int], prompts) -> list[dict[str, Any]]:
    """Rows of the contract: messages + images + metadata."""
    rows = []
    for c, i, lab, r in zip(pairs.caption_index.tolist(), pairs.image_index.tolist(), pairs.label.tolist(),
                            pairs.rank.tolist()):
        cap = captions[c]
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts.render_loc(cap)}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes" if lab else "No"}]},
            ],
            "images": [str(Path(image_paths[i]).resolve())],
            "caption": cap,
            "caption_pid": int(caption_pids[c]),
            "image_pid": int(image_pids[i]),
            "label": int(lab),  # 1 = Yes (Z+), 0 = No (Z-)
            "rank": int(r),  # 0-based rank of the image in the caption's ranking over the split
            "caption_index": int(c),  # index into the split's captions (SplitView.query_texts)
            "image_index": int(i),  # index into the split's images (SplitView.gallery_paths)
        })
    return rows


def export_llamafactory(splits: dict[str, list[dict]], out: Path, name: str = "icl_anchor_pairs") -> Path:
    """LLaMA-Factory ShareGPT files (``<image>`` placeholder in the user turn) + dataset_info.json."""
    lf = out / LF_DIR
    lf.mkdir(parents=True, exist_ok=True)
    info = {}
    for split, rows in splits.items():
        fname = f"anchor_pairs_{split}.json"
        items = [
            {
                "messages": [
                    {"role": "user", "content": "<image>" + r["messages"][0]["content"][1]["text"]},
                    {"role": "assistant", "content": r["messages"][1]["content"][0]["text"]},
                ],
                "images": r["images"],
            }
            for r in rows
        ]
        (lf / fname).write_text(json.dumps(items, ensure_ascii=False, indent=1), encoding="utf-8")
        info[f"{name}_{split}"] = {
            "file_name": fname,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    (lf / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return lf


def _encode(retriever, view, cache_dir: str | None, batch_size: int, progress: bool):
    from mllm_tune.core.retrievers import encode_gallery

    img = encode_gallery(retriever, view.gallery_paths, cache_dir=cache_dir, batch_size=batch_size, progress=progress)
    txt = retriever.encode_texts(view.query_texts, progress=progress)
    return txt, img


def _write_table(stats: dict[str, Any]) -> str:
    lines = [
        f"anchor pairs from {stats['dataset']} [{', '.join(stats['splits_used'])}] with {stats['retriever']['identity']}",
        f"  captions {stats['captions']:,} (kept {stats['captions_kept']:,}), images {stats['images']:,}",
        f"  pairs {stats['pairs']:,}: Yes {stats['yes']:,} / No {stats['no']:,}"
        + (f" (Yes:No = {stats['yes_no_ratio']:.3f})" if stats["yes_no_ratio"] else ""),
        f"  train {stats['train_pairs']:,}  eval {stats['eval_pairs']:,} ({stats['eval_identities']} held-out ids)",
        "  negative ranks: " + " ".join(f"{k}:{v}" for k, v in stats["negative_rank_histogram"].items()),
    ]
    return "\n".join(lines)


def run(
    dataset_root: str | Path,
    dataset: str,
    retriever: str,
    out: str | Path,
    opts: MiningOptions = MiningOptions(),
    eval_fraction: float = 0.05,
    prompts_file: str | Path | None = None,
    cache_dir: str | None = None,
    batch_size: int = 64,
    export: str | None = None,
    progress: bool = True,
    clean_set: str | Path | None = None,
) -> dict[str, Any]:
    """Mine and write everything; returns stats.json's content (plus ``out``). ``clean_set``: an
    RDE consensus ``clean.json`` (or the folder holding it): captions outside it give no pair."""
    import datasets

    from mllm_tune.core.pedes import load_pedes
    from mllm_tune.core.prompts import load_prompts
    from mllm_tune.core.retrievers import RetrieverLoadError, load_retriever

    t0 = time.time()
    prompts = load_prompts(prompts_file)
    view = load_pedes(dataset_root, dataset).split(SPLIT)  # raises on an unknown name / missing split
    try:
        model = load_retriever(retriever)
    except RetrieverLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure gets the spec in the message
        raise RetrieverLoadError(f"retriever '{retriever}' could not be loaded: {type(exc).__name__}: {exc}") from exc
    logger.info("encoding %d images and %d captions of %s/%s", len(view.gallery_paths), len(view.query_texts),
                dataset, SPLIT)
    txt, img = _encode(model, view, cache_dir, batch_size, progress)
    clean_info = None
    keep = None
    if clean_set is not None:
        from mllm_tune.core.clean_set import read_clean_set_file

        clean_info = read_clean_set_file(clean_set)
        keep = clean_info["caption_indices"]
        logger.info("RDE consensus clean set %s: %d of %d training captions kept", clean_info["path"], len(keep),
                    len(view.query_texts))
    pairs, mstats = mine(txt, img, view.query_pids, view.gallery_pids, view.query_image_index, opts, progress, keep)
    if clean_info is not None:
        mstats["clean_set"] = {"kind": "rde-consensus", "file": clean_info["path"], "captions": len(keep),
                               "epoch": clean_info.get("epoch"), "fractions": clean_info.get("fractions")}
    if len(pairs) == 0:
        raise ValueError("no pairs were mined: loosen --clean-top-r or raise --top-k")

    held_out = split_identities(view.query_pids, eval_fraction, opts.seed)
    cap_pids = np.asarray(view.query_pids)
    is_eval = np.isin(cap_pids[pairs.caption_index], list(held_out)) if held_out else np.zeros(len(pairs), bool)
    splits = {
        "train": build_rows(pairs.take(~is_eval), view.query_texts, view.query_pids, view.gallery_paths,
                            view.gallery_pids, prompts),
        "eval": build_rows(pairs.take(is_eval), view.query_texts, view.query_pids, view.gallery_paths,
                           view.gallery_pids, prompts),
    }
    if not splits["train"]:
        raise ValueError("every pair fell into the eval part: lower --eval-fraction")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items() if v})
    dd.save_to_disk(str(out))
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as fh:
        for split, rows in splits.items():
            for r in rows:
                fh.write(json.dumps({**r, "split": split}, ensure_ascii=False) + "\n")
    stats = {
        "dataset": dataset,
        "dataset_root": str(Path(dataset_root).resolve()),
        "splits_used": [SPLIT],
        "images": len(view.gallery_paths),
        **mstats,
        "train_pairs": len(splits["train"]),
        "eval_pairs": len(splits["eval"]),
        "eval_identities": len(held_out),
        "eval_fraction": eval_fraction,
        "retriever": {"spec": retriever, "identity": model.identity},
        "prompt_loc": prompts.loc,
        "seconds": round(time.time() - t0, 1),
    }
    if export == "llamafactory":
        stats["llamafactory_dir"] = str(export_llamafactory(splits, out))
    elif export is not None:
        raise ValueError(f"unknown export format '{export}': the only one is 'llamafactory'")
    (out / "stats.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    print(_write_table(stats))
    return {**stats, "out": str(out)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    d = MiningOptions()
    ap = argparse.ArgumentParser(prog="python -m data_builders.anchor_pairs",
                                 description="Mine Z+/Z- anchor-localization pairs from a training split.")
    ap.add_argument("--dataset-root", required=True, help="folder holding the annotation file and images")
    ap.add_argument("--dataset", required=True, help="cuhk-pedes, icfg-pedes, rstpreid or ufine6926")
    ap.add_argument("--retriever", required=True,
                    help="CLIP folder, CLIP hub id org/name[@revision] (via the HF cache), irra:PATH or rde:PATH")
    ap.add_argument("--out", required=True, help="output folder (the save_to_disk dataset goes in it directly)")
    ap.add_argument("--top-k", type=int, default=d.top_k, help="negatives come from the caption's top-k")
    ap.add_argument("--negatives-per-caption", type=int, default=d.negatives_per_caption)
    ap.add_argument("--positives-per-caption", type=int, default=d.positives_per_caption)
    ap.add_argument("--yes-no-ratio", type=float, default=None, help="overall Yes:No, e.g. 1.0 (default: keep all)")
    ap.add_argument("--clean-top-r", type=int, default=None,
                    help="keep captions whose own identity ranks within the top-R (a rank proxy of a clean set)")
    ap.add_argument("--clean", choices=["none", "rde-consensus"], default="none",
                    help="rde-consensus: captions only from RDE's consensus clean set (the authors' choice), read "
                         "from --clean-set or clean.json beside the rde: checkpoint / in the retriever folder")
    ap.add_argument("--clean-set", default=None, help="clean.json written by mllm_tune.retriever_train (RDE)")
    ap.add_argument("--max-pairs", type=int, default=None, help="cap on pairs (keeps the Yes:No ratio)")
    ap.add_argument("--negative-pick", choices=["random", "hardest"], default=d.negative_pick)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--chunk-size", type=int, default=d.chunk_size, help="captions scored at once")
    ap.add_argument("--eval-fraction", type=float, default=0.05, help="identities held out for the eval part")
    ap.add_argument("--prompts", default=None, help="YAML/JSON file overriding prompt templates")
    ap.add_argument("--cache-dir", default=None, help="feature cache folder (image features)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per encoder batch")
    ap.add_argument("--export", choices=["llamafactory"], default=None)
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from mllm_tune.core.cli_exit import check_dataset_root

    a = parse_args(argv)
    check_dataset_root(a.dataset_root)
    opts = MiningOptions(
        top_k=a.top_k, negatives_per_caption=a.negatives_per_caption, positives_per_caption=a.positives_per_caption,
        yes_no_ratio=a.yes_no_ratio, clean_top_r=a.clean_top_r, max_pairs=a.max_pairs,
        negative_pick=a.negative_pick, seed=a.seed, chunk_size=a.chunk_size,
    )
    clean_set = a.clean_set
    if a.clean == "rde-consensus" and clean_set is None:
        head = Path(a.retriever.split("?", 1)[0].split(":", 1)[-1])  # rde:PATH/best.pth or a retriever folder
        clean_set = head if head.is_dir() else head.parent
    elif a.clean == "none" and clean_set is not None:
        a.clean = "rde-consensus"
    # a missing clean.json is a FileNotFoundError naming the file and how to make it (one error line)
    return run(a.dataset_root, a.dataset, a.retriever, a.out, opts, a.eval_fraction, a.prompts, a.cache_dir,
               a.batch_size, a.export, not a.no_progress, clean_set if a.clean == "rde-consensus" else None)


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m data_builders.anchor_pairs``: bad input -> one ``error: ...`` line, exit status 2."""
    from mllm_tune.core.cli_exit import run_cli
    from mllm_tune.core.retrievers import RetrieverLoadError

    # ValueError too: the mining options and the dataset name are checked with it
    return run_cli(main, argv, extra=(RetrieverLoadError, ValueError))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(cli())
