"""A small anchor-pair dataset in the miner's format (docs/architecture.md, 'Data contracts'),
built from SynthPEDES: Z+ = caption + own image ("Yes"), Z- = caption + another id's image ("No")."""

from __future__ import annotations

import json
import random
from pathlib import Path


def pair_rows(synth_root: Path, n_train: int = 8, n_eval: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    from mllm_tune.core.pedes import load_split
    from mllm_tune.core.prompts import DEFAULT_PROMPTS

    view = load_split(synth_root, "cuhk-pedes", "train")
    rng = random.Random(seed)
    order = list(range(len(view.query_texts)))
    rng.shuffle(order)
    rows = []
    for k, qi in enumerate(order[: (n_train + n_eval + 1) // 2 * 2]):
        cap, pid, own = view.query_texts[qi], view.query_pids[qi], view.query_image_index[qi]
        positive = k % 2 == 0
        if positive:
            gi = own
        else:
            gi = rng.choice([j for j, p in enumerate(view.gallery_pids) if p != pid])
        rows.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": DEFAULT_PROMPTS.render_loc(cap)}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes" if positive else "No"}]},
            ],
            "images": [str(Path(view.gallery_paths[gi]).resolve())],
            "caption": cap, "caption_pid": pid, "image_pid": view.gallery_pids[gi],
            "label": int(positive), "rank": 0 if positive else 1,
        })
    for i, r in enumerate(rows):
        r["split"] = "train" if i < n_train else "eval"
    return {"train": rows[:n_train], "eval": rows[n_train : n_train + n_eval]}


def write_pairs(synth_root: Path, out: Path, n_train: int = 8, n_eval: int = 4, seed: int = 0) -> Path:
    """save_to_disk DatasetDict (train/eval) in `out`, plus out/pairs.jsonl (all rows)."""
    import datasets

    splits = pair_rows(synth_root, n_train, n_eval, seed)
    out.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(out))
    with (out / "pairs.jsonl").open("w") as fh:
        for split, rows in splits.items():
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    return out
