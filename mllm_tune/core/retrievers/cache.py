"""On-disk cache of gallery features: a gallery is encoded once per retriever.

Key = retriever identity + sha256 of the ordered image path list (docs/architecture.md). One
safetensors file per key, ``CACHE/<identity>/<paths-hash>.safetensors``, with the identity and
the number of paths in its metadata; a file that is unreadable, truncated or does not match is
reported, ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from .base import Retriever

logger = logging.getLogger(__name__)


def paths_digest(paths: Sequence[str | Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:32]


def _safe_name(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", identity)[:120] or "retriever"


class FeatureCache:
    """Feature tensors keyed by (retriever identity, ordered path list)."""

    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir)
        self.hits = 0
        self.misses = 0

    def path_for(self, identity: str, paths: Sequence[str | Path]) -> Path:
        return self.root / _safe_name(identity) / f"{paths_digest(paths)}.safetensors"

    def get(self, identity: str, paths: Sequence[str | Path]) -> torch.Tensor | None:
        from safetensors import safe_open

        f = self.path_for(identity, paths)
        if not f.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(f), framework="pt") as sf:
                meta = sf.metadata() or {}
                feats = sf.get_tensor("features")
        except Exception as exc:  # truncated or foreign file: recompute rather than fail
            logger.warning("feature cache file %s is unreadable (%s); it will be recomputed", f, exc)
            self.misses += 1
            return None
        if meta.get("identity") != identity or int(meta.get("num_paths", -1)) != len(paths) or feats.shape[0] != len(paths):
            logger.warning("feature cache file %s does not match this retriever/gallery; it will be recomputed", f)
            self.misses += 1
            return None
        self.hits += 1
        return feats

    def put(self, identity: str, paths: Sequence[str | Path], feats: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        if feats.shape[0] != len(paths):
            raise ValueError(f"{feats.shape[0]} feature rows for {len(paths)} paths")
        f = self.path_for(identity, paths)
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(f".tmp{os.getpid()}")
        save_file({"features": feats.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={"identity": identity, "num_paths": str(len(paths)), "first_path": str(paths[0]) if paths else ""})
        os.replace(tmp, f)  # atomic: a reader never sees half a file
        return f


def encode_gallery(
    retriever: Retriever,
    paths: Sequence[str | Path],
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = True,
    cache: FeatureCache | None = None,
) -> torch.Tensor:
    """Image features of ``paths``, read from the cache when this retriever encoded them before."""
    paths = [str(p) for p in paths]
    if cache is None and cache_dir is not None:
        cache = FeatureCache(cache_dir)
    if cache is not None:
        hit = cache.get(retriever.identity, paths)
        if hit is not None:
            logger.info("gallery features (%d images) read from the cache %s", len(paths), cache.root)
            return hit
    feats = retriever.encode_images(paths, batch_size=batch_size, progress=progress)
    if cache is not None:
        where = cache.put(retriever.identity, paths, feats)
        logger.info("gallery features cached in %s", where)
    return feats
