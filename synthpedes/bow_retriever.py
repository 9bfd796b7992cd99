"""A bag-of-attribute-words encoder for SynthPEDES: a transparent stand-in retriever.

Texts are encoded as normalised counts of SynthPEDES attribute words (a word right after "no" is
dropped, so "there is no hat" does not claim a hat); an image is encoded as the text of its
person's full ground-truth description, plus a little per-image noise so no two images tie.
Captions mention only some attributes, so the base ranking is ambiguous exactly where THI is
meant to help, and an enriched query that names every attribute matches its person closely.
Used by tests and benchmarks of THI; it is a simulation, never a trained model.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import torch

from synthpedes import dataset as syn

_WORDS = sorted(
    {w for group in (syn.COLORS, syn.HAIR_COLORS, syn.UPPER_TYPES, syn.LOWER_TYPES, syn.BAG_TYPES,
                     ("man", "woman", "short", "long", "hat", "glasses", "sleeves", "hair", "bag"))
     for item in group for w in re.findall(r"[a-z]+", item) if w != "none"}
)
VOCAB = {w: i for i, w in enumerate(_WORDS)}
_TOKEN = re.compile(r"[a-z]+")


def encode_texts(texts: Sequence[str]) -> torch.Tensor:
    out = torch.zeros(len(texts), len(VOCAB))
    for i, t in enumerate(texts):
        for sentence in re.split(r"[.!?]", t.lower()):
            toks = _TOKEN.findall(sentence)
            for j, w in enumerate(toks):
                if w in VOCAB and not (j > 0 and toks[j - 1] in ("no", "not")):
                    out[i, VOCAB[w]] += 1.0
    return torch.nn.functional.normalize(out, dim=-1)


def encode_images(root: str | Path, paths: Sequence[str], noise: float = 0.05) -> torch.Tensor:
    """Features of gallery images from the ground truth of the SynthPEDES folder ``root``."""
    import json

    root = Path(root)
    gt = syn.load_ground_truth(root)
    id_of = {r["file_path"]: int(r["id"]) for r in json.loads((root / "reid_raw.json").read_text())}
    img_dir = (root / "imgs").resolve()
    texts, gens = [], []
    for p in paths:
        rel = Path(p).resolve().relative_to(img_dir).as_posix()
        texts.append(" ".join(syn.vqa_answers(gt["ids"][id_of[rel]])))
        g = torch.Generator().manual_seed(int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16))
        gens.append(torch.randn(len(VOCAB), generator=g))
    feats = encode_texts(texts) + noise * torch.nn.functional.normalize(torch.stack(gens), dim=-1)
    return torch.nn.functional.normalize(feats, dim=-1)


class BowRetriever:
    """The bag-of-words stand-in behind the retriever interface (``--retriever synth-bow``).

    The SynthPEDES folder is found from the image paths themselves (the first ancestor holding
    ``attributes.json``), so the spec needs no options."""

    identity = "synth-bow (SIMULATION: bag of SynthPEDES attribute words from ground truth)"
    simulated = True

    def encode_images(self, paths: Sequence[str], **_: object) -> torch.Tensor:
        if not paths:
            return torch.zeros(0, len(VOCAB))
        first = Path(paths[0]).resolve()
        root = next((p for p in first.parents if (p / "attributes.json").is_file()), None)
        if root is None:
            raise ValueError(f"--retriever synth-bow works on SynthPEDES only: no attributes.json above {first}; "
                             "pass a CLIP folder, irra:PATH or rde:PATH")
        return encode_images(root, paths)

    def encode_texts(self, texts: Sequence[str], **_: object) -> torch.Tensor:
        return encode_texts(texts)


def build() -> BowRetriever:
    """Factory named by the ``synth-bow`` retriever alias."""
    return BowRetriever()
