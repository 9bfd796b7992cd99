"""Offline retrieval models (f_cross) behind one interface.

    from mllm_tune.core.retrievers import load_retriever, encode_gallery, topk_chunked
    r = load_retriever("path/to/clip-folder")            # Hugging Face CLIP (or a saved retriever)
    r = load_retriever("openai/clip-vit-base-patch16")   # a CLIP hub id (org/name[@rev]), via the HF cache
    r = load_retriever("irra:logs/best.pth?tokenizer=path/to/openai-clip-tokenizer")
    r = load_retriever("rde:logs/best.pth?tokenizer=...&image_size=384x128")
    r = load_retriever("mypkg.mymodel:build?ckpt=PATH")        # a plugin (see plugin.py)
    img = encode_gallery(r, gallery_paths, cache_dir="cache/features")
    txt = r.encode_texts(queries)
    scores = txt @ img.T

Spec options after ``?`` (``&``-separated): ``tokenizer``, ``image_size`` (HxW), ``text_length``,
``stride``, ``heads`` / ``text_heads`` (attention heads, default width // 64), ``ratio`` (RDE
token-selection ratio). Keyword arguments of :func:`load_retriever` override them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import Retriever, RetrieverLoadError, l2_normalize
from .cache import FeatureCache, encode_gallery
from ..hub import ModelResolveError, looks_like_path, resolve_model
from .clip import RETRIEVER_FILE, CLIPRetriever
from .plugin import is_plugin_spec, load_plugin
from .similarity import similarity, topk_chunked

__all__ = [
    "Retriever", "RetrieverLoadError", "CLIPRetriever", "FeatureCache", "encode_gallery", "load_retriever",
    "parse_spec", "similarity", "topk_chunked", "l2_normalize",
]

_INT_OPTS = {"text_length", "stride", "heads", "text_heads"}


def parse_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """'kind:PATH?k=v&k=v' -> (kind, path, options); a bare path is kind 'auto'."""
    if not isinstance(spec, str) or not spec.strip():
        raise RetrieverLoadError("empty retriever spec: pass a CLIP folder, 'irra:PATH' or 'rde:PATH'")
    kind, rest = "auto", spec.strip()
    for k in ("irra", "rde", "clip"):
        if rest.lower().startswith(k + ":"):
            kind, rest = k, rest[len(k) + 1:]
            break
    opts: dict[str, Any] = {}
    if "?" in rest:
        rest, query = rest.split("?", 1)
        for part in filter(None, query.split("&")):
            if "=" not in part:
                raise RetrieverLoadError(f"retriever spec option '{part}' in '{spec}' is not key=value")
            key, value = part.split("=", 1)
            key = key.strip().replace("-", "_")
            if key not in _INT_OPTS | {"tokenizer", "image_size", "ratio", "resample"}:
                raise RetrieverLoadError(f"unknown retriever spec option '{key}' in '{spec}' (known: tokenizer, "
                                         "image_size, text_length, stride, heads, text_heads, ratio, resample)")
            opts[key] = int(value) if key in _INT_OPTS else float(value) if key == "ratio" else value
    return kind, rest, opts


def load_retriever(spec: str, device=None, **overrides: Any) -> Retriever:
    """A retriever from a spec: a local CLIP / saved-retriever folder, ``irra:PATH``, ``rde:PATH`` or a
    plugin named ``module:factory?k=v`` (or an alias of one, see :mod:`.plugin`)."""
    if isinstance(spec, str) and is_plugin_spec(spec) and not Path(spec.split("?", 1)[0]).expanduser().exists():
        return load_plugin(spec)
    kind, path_s, opts = parse_spec(spec)
    opts.update({k: v for k, v in overrides.items() if v is not None})
    path = Path(path_s).expanduser()
    if not path.exists() and kind in ("auto", "clip") and not looks_like_path(path_s):
        # a hub id (org/name[@rev]) of a CLIP repository, fetched through the HF cache
        try:
            path = resolve_model(path_s, what="CLIP retriever",
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]).path
        except ModelResolveError as exc:
            raise RetrieverLoadError(f"retriever '{spec}': {exc}") from None
    if not path.exists():
        raise RetrieverLoadError(
            f"retriever '{spec}': {path} does not exist. Pass a local Hugging Face CLIP folder, a hub id of a "
            "CLIP repository (org/name[@revision], e.g. openai/clip-vit-base-patch16), or 'irra:PATH' / "
            "'rde:PATH' to a released best.pth")
    if kind in ("irra", "rde"):
        if path.is_dir():
            cand = path / "best.pth"
            if not cand.is_file():
                raise RetrieverLoadError(f"retriever '{spec}': {path} is a folder without best.pth; pass the .pth file")
            path = cand
        if kind == "irra":
            from .irra import load_irra

            opts.pop("ratio", None)
            return load_irra(path, device=device, **opts)
        from .rde import load_rde

        return load_rde(path, device=device, **opts)
    if path.is_file():
        raise RetrieverLoadError(f"retriever '{spec}' is a file; prefix it with 'irra:' or 'rde:' to say which "
                                 "checkpoint it is, or pass a Hugging Face CLIP folder")
    saved = {}
    if (path / RETRIEVER_FILE).is_file():
        try:
            saved = json.loads((path / RETRIEVER_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RetrieverLoadError(f"{path / RETRIEVER_FILE} is not valid JSON ({exc.msg}); the file may be truncated") from exc
    for k in ("stride", "heads", "text_heads"):
        if opts.pop(k, None) is not None:
            raise RetrieverLoadError(f"option '{k}' only applies to irra:/rde: checkpoints")
    if saved.get("kind") == "rde":
        from .rde import RDERetriever

        opts.pop("ratio", None)
        return RDERetriever.from_folder(path, device=device, **opts)
    opts.pop("ratio", None)
    return CLIPRetriever.from_folder(path, device=device, **opts)
