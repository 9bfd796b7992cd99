"""``--retriever features:DIR``: rank with features computed elsewhere.

DIR holds (names fixed, features as safetensors or .npy, one row per item, L2-normalised):

    gallery.safetensors | gallery.npy     image features
    gallery_paths.json                    the image paths they belong to, in row order
    queries.safetensors | queries.npy     caption features
    queries.json                          the captions they belong to, in row order
    features.json                         {"text_encoder": SPEC, "name": "..."}

``text_encoder`` is any retriever spec (a CLIP folder, ``rde:...``, a plugin) whose text features
live in the same space; THI needs it for the rewritten queries, and nothing else ever calls it.
Images are matched to the evaluated split by path relative to the dataset root (the last path
parts, so the folder may move); a gallery or caption list that differs from the stored one in
count or order is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import RetrieverLoadError

META = "features.json"


def _load_matrix(folder: Path, stem: str) -> torch.Tensor:
    st, npy = folder / f"{stem}.safetensors", folder / f"{stem}.npy"
    if st.is_file():
        from safetensors.torch import load_file

        tensors = load_file(st)
        if len(tensors) != 1:
            raise RetrieverLoadError(f"{st} must hold one tensor, found {sorted(tensors)}")
        return next(iter(tensors.values())).float()
    if npy.is_file():
        import numpy as np

        return torch.from_numpy(np.load(npy)).float()
    raise RetrieverLoadError(f"features folder {folder}: neither {st.name} nor {npy.name} exists")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise RetrieverLoadError(f"features folder {path.parent}: {path.name} is missing (see "
                                 "mllm_tune/core/retrievers/features.py for the layout)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RetrieverLoadError(f"{path} is not valid JSON ({exc.msg}); the file may be truncated") from exc


def _tail(path: str, n: int = 2) -> str:
    return "/".join(Path(path).parts[-n:])


class FeaturesRetriever:
    def __init__(self, folder: str, text_encoder: str | None = None):
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise RetrieverLoadError(f"retriever 'features:{folder}': {self.folder} is not a folder")
        meta = _read_json(self.folder / META)
        self.gallery = _load_matrix(self.folder, "gallery")
        self.gallery_paths = [str(p) for p in _read_json(self.folder / "gallery_paths.json")]
        self.queries = _load_matrix(self.folder, "queries")
        self.captions = [str(c) for c in _read_json(self.folder / "queries.json")]
        for name, mat, items in (("gallery", self.gallery, self.gallery_paths), ("queries", self.queries, self.captions)):
            if mat.ndim != 2 or mat.shape[0] != len(items):
                raise RetrieverLoadError(f"features folder {self.folder}: {name} features are {tuple(mat.shape)} "
                                         f"for {len(items)} listed items")
        self.text_encoder_spec = text_encoder or meta.get("text_encoder")
        if not self.text_encoder_spec:
            raise RetrieverLoadError(f"features folder {self.folder}: {META} names no text_encoder (a retriever spec "
                                     "for the rewritten queries); add it, or pass features:DIR?text_encoder=SPEC")
        self._encoder = None
        h = hashlib.sha256()
        for f in sorted(self.folder.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(hashlib.sha256(f.read_bytes()).digest())
        self.identity = f"features-{meta.get('name', self.folder.name)}-{h.hexdigest()[:16]}"

    def encode_images(self, paths: Sequence[str], **_: Any) -> torch.Tensor:
        want = [_tail(p) for p in paths]
        have = [_tail(p) for p in self.gallery_paths]
        if want != have:
            first = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            raise RetrieverLoadError(
                f"features folder {self.folder}: the evaluated gallery ({len(want)} images) does not match "
                f"gallery_paths.json ({len(have)}); first difference at row {first}: "
                f"{want[first] if first < len(want) else '-'} vs {have[first] if first < len(have) else '-'}. "
                "Recompute the features for this split, in its order")
        return self.gallery

    def encode_texts(self, texts: Sequence[str], **kw: Any) -> torch.Tensor:
        texts = list(texts)
        if texts == self.captions:
            return self.queries
        if len(texts) == len(self.captions):
            first = next(i for i, (a, b) in enumerate(zip(texts, self.captions)) if a != b)
            raise RetrieverLoadError(f"features folder {self.folder}: the evaluated captions do not match queries.json "
                                     f"(first difference at row {first}); recompute the features for this split")
        if self._encoder is None:  # only rewritten queries get here
            # the text encoder is itself any spec: looked up at call time through the package's
            # entry point (a spec inside a spec), so this module need not import the package
            import importlib

            load_retriever = importlib.import_module(__package__).load_retriever
            self._encoder = load_retriever(self.text_encoder_spec)
        return self._encoder.encode_texts(texts, **kw)
