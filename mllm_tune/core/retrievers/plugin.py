"""Retrievers named by import path: ``module:factory?key=value&...``.

``load_plugin("mypkg.mymodel:build?ckpt=PATH")`` imports ``mypkg.mymodel``, calls
``build(ckpt="PATH")`` and checks that the object has what THI and the miner use:
``encode_images(paths, **kw) -> Tensor``, ``encode_texts(texts, **kw) -> Tensor`` (both
L2-normalised rows in one space) and a string ``identity`` (the feature-cache key). Option values
arrive as strings. Short names in :data:`ALIASES` stand for such specs; the SynthPEDES
bag-of-words stand-in (``synth-bow``) is one, so the real pipeline reaches the simulation by name
only.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from .base import RetrieverLoadError

ALIASES: dict[str, str] = {
    "synth-bow": "synthpedes.bow_retriever:build",  # SIMULATION: bag of SynthPEDES attribute words
}
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
REQUIRED = ("encode_images", "encode_texts", "identity")


def is_plugin_spec(spec: str) -> bool:
    head = spec.strip().split("?", 1)[0]
    if head.lower().startswith(("irra:", "rde:", "clip:")):  # checkpoint kinds, not modules
        return False
    return head in ALIASES or bool(_SPEC.match(head))


def load_plugin(spec: str) -> Any:
    head, _, query = spec.strip().partition("?")
    target = ALIASES.get(head, head)
    opts: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise RetrieverLoadError(f"retriever spec option '{part}' in '{spec}' is not key=value")
        opts[key.strip()] = value
    module, _, factory = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise RetrieverLoadError(f"retriever '{spec}': cannot import {module} ({exc}); install the package that "
                                 "provides it or put it on PYTHONPATH") from exc
    build = getattr(mod, factory, None)
    if not callable(build):
        raise RetrieverLoadError(f"retriever '{spec}': {module} has no callable '{factory}'")
    try:
        obj = build(**opts)
    except TypeError as exc:
        raise RetrieverLoadError(f"retriever '{spec}': {module}.{factory}({', '.join(opts)}) failed: {exc}") from exc
    missing = [name for name in REQUIRED if not hasattr(obj, name)]
    if missing:
        raise RetrieverLoadError(f"retriever '{spec}': the object {module}.{factory} returned has no "
                                 f"{', '.join(missing)} (a retriever needs {', '.join(REQUIRED)})")
    return obj
