"""The RDE consensus clean set on disk (``clean.json``), shared by its writer (the RDE trainer,
``mllm_tune/rde_objectives.py``) and its reader (the Z+/Z- miner's ``--clean rde-consensus``).

    {"format": "rde-consensus-clean-set/1", "num_pairs", "num_clean", "epoch", "disagreement",
     "fractions", "quality", "split", "dataset", "pair_indices": [...], "caption_indices": [...]}

``caption_indices`` index the training split's ``SplitView.query_texts`` (the miner's
``caption_index``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CLEAN_FILE = "clean.json"
CLEAN_FORMAT = "rde-consensus-clean-set/1"


def read_clean_set_file(path: str | Path) -> dict[str, Any]:
    """The whole record; ``path`` is the file or the training output folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / CLEAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no RDE clean set; train with `python -m mllm_tune.retriever_train "
                                "recipes/retriever_rde.yaml ...`, which writes clean.json beside the checkpoint")
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        blob["caption_indices"] = [int(i) for i in blob["caption_indices"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not an RDE clean-set file ({exc}); expected JSON with 'caption_indices'") from exc
    blob["path"] = str(path)
    return blob


def read_clean_set(path: str | Path) -> set[int]:
    """The caption indices of a saved clean set."""
    return set(read_clean_set_file(path)["caption_indices"])
