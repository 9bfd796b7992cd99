"""Retrievers from outside the project: ``module:factory?key=value&...`` and ``features:DIR``.

A plugin spec ``mypkg.mymodel:build?ckpt=PATH`` imports ``mypkg.mymodel``, calls
``build(ckpt="PATH")`` (option values arrive as strings) and expects an object following
:class:`RetrieverLike`. What THI and the miner use of it is checked on every call (2-D float
rows, one per input, L2-normalised (all-zero rows allowed), image and text features of one width), so a bad plugin fails
with its spec named instead of giving silently wrong rankings. Short names in :data:`ALIASES`
stand for plugin specs; the SynthPEDES bag-of-words stand-in (``synth-bow``) is one, so the real
pipeline reaches the simulation by name only.

``features:DIR`` serves precomputed features (:mod:`.features`): no image model runs at all.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from .base import RetrieverLoadError

ALIASES: dict[str, str] = {
    "synth-bow": "synthpedes.bow_retriever:build",  # SIMULATION: bag of SynthPEDES attribute words
}
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
REQUIRED = ("encode_images", "encode_texts", "identity")
NORM_TOL = 1e-3


@runtime_checkable
class RetrieverLike(Protocol):
    """What a retriever plugin provides. Both encoders return float tensors, one L2-normalised
    row per input, in one embedding space (THI ranks by their dot products); keyword arguments
    such as ``batch_size`` / ``progress`` may be passed and can be ignored."""

    identity: str  # stable, content-based name: the feature-cache key

    def encode_images(self, paths: Sequence[str], **kw: Any) -> torch.Tensor: ...

    def encode_texts(self, texts: Sequence[str], **kw: Any) -> torch.Tensor: ...


def is_plugin_spec(spec: str) -> bool:
    head = spec.strip().split("?", 1)[0]
    if head.lower().startswith("features:"):
        return True
    if head.lower().startswith(("irra:", "rde:", "clip:")):  # checkpoint kinds, not modules
        return False
    return head in ALIASES or bool(_SPEC.match(head))


def _options(spec: str, query: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq:
            raise RetrieverLoadError(f"retriever spec option '{part}' in '{spec}' is not key=value")
        opts[key.strip()] = value
    return opts


def load_plugin(spec: str) -> "CheckedRetriever":
    head, _, query = spec.strip().partition("?")
    opts = _options(spec, query)
    if head.lower().startswith("features:"):
        from .features import FeaturesRetriever

        return CheckedRetriever(spec, FeaturesRetriever(head[len("features:"):], **opts))
    target = ALIASES.get(head, head)
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
                                 f"{', '.join(missing)} (a retriever needs {', '.join(REQUIRED)}; see "
                                 "mllm_tune.core.retrievers.plugin.RetrieverLike)")
    return CheckedRetriever(spec, obj)


class CheckedRetriever:
    """A plugin behind checks of what it returns (see the module docstring)."""

    def __init__(self, spec: str, inner: Any):
        self.spec, self.inner = spec, inner
        self.identity = str(inner.identity)
        self.simulated = bool(getattr(inner, "simulated", False))
        self._dim: int | None = None

    def _check(self, what: str, feats: Any, n: int) -> torch.Tensor:
        where = f"retriever '{self.spec}': {what}"
        if not isinstance(feats, torch.Tensor):
            try:
                feats = torch.as_tensor(feats)
            except Exception as exc:  # numpy arrays and lists convert; anything else is a plugin bug
                raise RetrieverLoadError(f"{where} returned {type(feats).__name__}, not a tensor") from exc
        if feats.ndim != 2 or feats.shape[0] != n:
            raise RetrieverLoadError(f"{where} returned shape {tuple(feats.shape)} for {n} inputs; expected ({n}, dim)")
        feats = feats.float()
        norms = feats.norm(dim=1)
        # an all-zero row (a text with nothing the model knows) has no direction to normalise: allowed
        off = (norms - 1).abs().masked_fill(norms == 0, 0)
        if n and bool((off > NORM_TOL).any()):
            worst = float(off.max())
            raise RetrieverLoadError(f"{where} returned rows that are not L2-normalised (norm off by up to {worst:.3g}); "
                                     "normalise them (torch.nn.functional.normalize(x, dim=-1))")
        if self._dim is None:
            self._dim = feats.shape[1]
        elif feats.shape[1] != self._dim:
            raise RetrieverLoadError(f"{where} returned width {feats.shape[1]}, but earlier features had {self._dim}: "
                                     "image and text features must share one space")
        return feats

    def _call(self, name: str, items: list[str], kw: dict[str, Any]) -> Any:
        import inspect

        fn = getattr(self.inner, name)
        params = inspect.signature(fn).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):  # pass only what it accepts
            kw = {k: v for k, v in kw.items() if k in params}
        return fn(items, **kw)

    def encode_images(self, paths: Sequence[str], **kw: Any) -> torch.Tensor:
        return self._check("encode_images", self._call("encode_images", list(paths), kw), len(paths))

    def encode_texts(self, texts: Sequence[str], **kw: Any) -> torch.Tensor:
        return self._check("encode_texts", self._call("encode_texts", list(texts), kw), len(texts))
