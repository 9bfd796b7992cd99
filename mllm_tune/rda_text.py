"""The trainer side of RDA (SPEC §6): read stored caption groups, recombine them, add token noise.

An RDA file is JSON lines, one line per training caption, written by ``data_builders/rda.py``:

    {"record_index": 12, "caption_index": 0, "caption": "...", "enriched": "...",
     "groups": [["paraphrase a1", "paraphrase a2"], ["paraphrase b1", ...], ...]}

``record_index`` is the record's position in the dataset's annotation file and
``caption_index`` the caption's position in that record, so a line finds its caption however
the split is ordered. Each group holds paraphrases of one attribute-wise sub-sentence.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

logger = logging.getLogger(__name__)

# token noise: of the selected tokens, 60% are masked, 20% replaced by a random token, 20% deleted
MASK_SHARE, REPLACE_SHARE = 0.6, 0.2


class RDAFormatError(ValueError):
    """An RDA file line does not follow the format; the message names the file, line and field."""


@dataclass(frozen=True)
class RDAEntry:
    record_index: int
    caption_index: int
    caption: str
    enriched: str
    groups: tuple[tuple[str, ...], ...]

    @property
    def key(self) -> tuple[int, int]:
        return (self.record_index, self.caption_index)


def _check_line(obj: object, path: Path, lineno: int) -> RDAEntry:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise RDAFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key, typ in (("record_index", int), ("caption_index", int), ("caption", str), ("groups", list)):
        if key not in obj:
            raise RDAFormatError(f"{where}: field '{key}' is missing (fields present: {sorted(obj)})")
        if not isinstance(obj[key], typ) or (typ is int and isinstance(obj[key], bool)):
            raise RDAFormatError(f"{where}: field '{key}' must be {typ.__name__}, got {type(obj[key]).__name__}")
    if obj["record_index"] < 0 or obj["caption_index"] < 0:
        raise RDAFormatError(f"{where}: record_index and caption_index must be >= 0")
    groups = []
    for gi, g in enumerate(obj["groups"]):
        if not isinstance(g, list) or not all(isinstance(p, str) for p in g):
            raise RDAFormatError(f"{where}: groups[{gi}] must be a list of strings")
        kept = tuple(" ".join(p.split()) for p in g if p.strip())
        if kept:
            groups.append(kept)
    enriched = obj.get("enriched", "")
    if not isinstance(enriched, str):
        raise RDAFormatError(f"{where}: field 'enriched' must be a string")
    return RDAEntry(obj["record_index"], obj["caption_index"], obj["caption"], enriched, tuple(groups))


def read_rda_file(path: str | Path) -> dict[tuple[int, int], RDAEntry]:
    """All entries of an RDA JSON-lines file, keyed by (record_index, caption_index)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RDA file {path} does not exist; write it with `python -m data_builders.rda`")
    out: dict[tuple[int, int], RDAEntry] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RDAFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg}); the file may be truncated: "
                                     "write it again") from exc
            entry = _check_line(obj, path, lineno)
            if entry.key in out:
                raise RDAFormatError(f"{path}:{lineno}: a second line for record {entry.record_index} caption "
                                     f"{entry.caption_index}")
            out[entry.key] = entry
    if not out:
        raise RDAFormatError(f"{path}: the file holds no entries")
    logger.info("read %d RDA entries from %s", len(out), path)
    return out


def _sentence(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def recombine(groups: Sequence[Sequence[str]], rng: random.Random) -> str:
    """Shuffle the groups, take one paraphrase of each, join them into one text ("" if none)."""
    usable = [list(g) for g in groups if g]
    rng.shuffle(usable)
    return " ".join(_sentence(rng.choice(g)) for g in usable)


def token_noise(
    token_ids: Sequence[int],
    rng: random.Random,
    p: float = 0.2,
    mask_id: int | None = None,
    vocab_size: int | None = None,
    keep_ids: Iterable[int] = (),
) -> list[int]:
    """Each token, with probability ``p``: masked (60%), replaced by a random token (20%) or
    deleted (20%). ``keep_ids`` (start/end tokens) are never touched, nor used as replacements."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"token noise probability must be in [0, 1], got {p}")
    if p > 0 and (mask_id is None or vocab_size is None or vocab_size < 2):
        raise ValueError("token_noise needs mask_id and vocab_size when p > 0")
    keep = set(keep_ids)
    out: list[int] = []
    for t in token_ids:
        if t in keep or rng.random() >= p:
            out.append(t)
            continue
        r = rng.random()
        if r < MASK_SHARE:
            out.append(mask_id)
        elif r < MASK_SHARE + REPLACE_SHARE:
            while True:
                new = rng.randrange(vocab_size)
                if new not in keep and new != mask_id:
                    break
            out.append(new)
        # else: deleted
    return out


def rda_gamma(epoch: int, fixed: float | None = None) -> float:
    """Weight of the RDA term in epoch ``epoch`` (1-based): fixed, or max(0.1, 1 - 0.03 * epoch)."""
    if fixed is not None:
        return float(fixed)
    return max(0.1, 1.0 - 0.03 * epoch)
