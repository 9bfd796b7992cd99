"""The MLLM backend interface shared by THI (eval/thi.py) and RDA (data_builders/rda.py).

A backend answers a batch of :class:`MLLMRequest` (task, prompt, optional image path) with
greedy decoding and returns one string per request, in order. Backends are interchangeable:
``make_backend(kind, **kw)`` (the registry in this package's ``__init__``) builds ``hf``, ``vllm``,
``openai`` or ``oracle``; wrapping one in
:class:`~mllm_tune.core.backends.cache.CachedBackend` adds the on-disk answer cache.

``identity()`` returns everything that can change an answer (model, adapter content hash,
decoding settings); the cache key is built from it, so changing any of them never reuses a
stale answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

# loc: anchor localization (T_loc), vqa: human-centred VQA (T_vqa), aggr: aggregation (T_aggr),
# dec / rwt: RDA decomposition and rewrite.
TASKS: tuple[str, ...] = ("loc", "vqa", "aggr", "dec", "rwt")


class BackendError(RuntimeError):
    """A backend cannot answer (missing package, mismatching adapter, unreachable server...)."""


@dataclass(frozen=True)
class MLLMRequest:
    """One question to the MLLM. ``image`` is a path to an image file (or None: text only)."""

    task: str
    prompt: str
    image: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"MLLMRequest.task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("MLLMRequest.prompt must be a non-empty string")
        if self.image is not None:
            object.__setattr__(self, "image", str(self.image))


@dataclass(frozen=True)
class LocAnswer:
    """A T_loc answer: the text (what greedy decoding gives, or "Yes"/"No" when the first token
    decides it) and ``p_yes``, P(Yes) renormalised over the Yes/No tokens at the first answer
    position (:mod:`mllm_tune.core.yes_no`); None when the backend gave no probability."""

    text: str
    p_yes: float | None = None

    def __post_init__(self) -> None:
        if self.p_yes is not None and not 0.0 <= float(self.p_yes) <= 1.0:
            raise ValueError(f"p_yes must be in [0, 1], got {self.p_yes}")


class MLLMBackend(ABC):
    """Answers batches of requests. Subclasses set ``kind`` and, for fake models, ``simulated``.

    ``scores_loc``: whether :meth:`localize` returns ``p_yes`` (hf, vllm, oracle; openai when the
    server sends logprobs). Backends that cannot score inherit the text-only :meth:`localize`."""

    kind: str = "base"
    simulated: bool = False  # True when answers do not come from a real model (the oracle)
    scores_loc: bool = False

    @abstractmethod
    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        """Answer every request (greedy decoding); same length and order as ``requests``."""

    def localize(self, requests: Sequence[MLLMRequest]) -> list[LocAnswer]:
        """Answer T_loc requests with their P(Yes). This default has no probability: the text of
        :meth:`generate` with ``p_yes=None``."""
        check_loc_requests(requests)
        return [LocAnswer(a, None) for a in self.generate(requests)]

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of everything that determines the answers."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, engines). Safe to call twice."""

    def __enter__(self) -> "MLLMBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def localize_any(backend: Any, requests: Sequence[MLLMRequest]) -> list[LocAnswer]:
    """``backend.localize(requests)``, or the text of ``generate`` for an object that only has
    that (a duck-typed backend or test double)."""
    loc = getattr(backend, "localize", None)
    if loc is None:
        return [LocAnswer(a, None) for a in backend.generate(list(requests))]
    return list(loc(requests))


def check_loc_requests(requests: Sequence[MLLMRequest]) -> None:
    bad = [r.task for r in requests if r.task != "loc"]
    if bad:
        raise ValueError(f"localize() answers T_loc requests only, got task(s) {sorted(set(bad))}")


# -- content hashes --------------------------------------------------------------------------

@lru_cache(maxsize=200_000)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # size/mtime make the memo safe
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, memoised on (path, size, mtime)."""
    p = str(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file {p} does not exist (an MLLM request refers to it)") from None
    return _file_sha256(p, st.st_size, st.st_mtime_ns)


def dir_sha256(path: str | os.PathLike, patterns: Sequence[str] = ("*.safetensors", "*.bin", "*.json")) -> str:
    """Content hash of a model/adapter folder (weights and configs), so a retrained adapter
    saved at the same path never reuses cached answers."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"{root} holds no weight or config files ({', '.join(patterns)})")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        h.update(file_sha256(p).encode())
    return h.hexdigest()


# -- what inference must share with training ---------------------------------------------------

logger = logging.getLogger(__name__)

# The paper trains at 224x224 = 50,176 pixels with min = max (the released THI script sets the
# same), so every crop becomes ~64 visual tokens whatever its size. Inference must use the same
# budget: a processor loaded from the base model (min 3,136 px) would give a 64x128 crop ~10.
DEFAULT_MIN_PIXELS = DEFAULT_MAX_PIXELS = 50_176

# Per-task answer caps. T_loc answers Yes/No; T_vqa answers 15 aspects in one reply (the released
# run allows 2048 tokens, and cutting it drops the last aspects silently); T_aggr rewrites a query
# with the merged facts; RDA's decomposition/rewrite are a few sentences each.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {"loc": 64, "vqa": 2048, "aggr": 1024, "dec": 512, "rwt": 512}


def max_new_tokens_for(task: str, setting: int | dict[str, int] | None) -> int:
    """The answer cap of ``task``: ``setting`` may be one int for every task, a per-task dict
    (tasks it omits keep their default) or None (the defaults)."""
    if task not in DEFAULT_MAX_NEW_TOKENS:
        raise ValueError(f"unknown task {task!r}: choose one of {TASKS}")
    if setting is None:
        return DEFAULT_MAX_NEW_TOKENS[task]
    if isinstance(setting, dict):
        unknown = set(setting) - set(TASKS)
        if unknown:
            raise ValueError(f"max_new_tokens names unknown task(s) {sorted(unknown)}; known: {TASKS}")
        setting = setting.get(task, DEFAULT_MAX_NEW_TOKENS[task])
    if int(setting) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {setting}")
    return int(setting)


def parse_max_new_tokens(text: str) -> int | dict[str, int]:
    """Command-line form of the caps: ``256`` (every task) or ``loc=64,vqa=2048`` (the tasks it
    omits keep their defaults). Raises argparse's type error, so argparse prints the reason."""
    import argparse

    text = text.strip()
    try:
        if "=" not in text:
            n = int(text)
            max_new_tokens_for("loc", n)  # validates the value
            return n
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            task, _, n = part.partition("=")
            out[task.strip()] = int(n)
        for t in TASKS:
            max_new_tokens_for(t, out)  # validates names and values
        return out
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"'{text}' is not N or task=N,... ({exc})") from None


def max_new_tokens_table(setting: int | dict[str, int] | None) -> dict[str, int]:
    """Every task's cap under ``setting`` (what a backend records in its identity)."""
    return {t: max_new_tokens_for(t, setting) for t in TASKS}


def greedy_decoding_settings() -> dict[str, Any]:
    """Exactly-greedy decoding, the same in every backend: argmax at each step, no sampling and
    no logit processors. Checkpoints' generation_config files carry ``repetition_penalty`` 1.05
    (real Qwen2-VL), which transformers applies even with ``do_sample=False`` while vLLM does
    not; each backend overrides such settings and records this dict in its identity."""
    return {"do_sample": False, "temperature": 0.0, "top_p": 1.0, "top_k": None, "num_beams": 1,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "no_repeat_ngram_size": 0}


def warn_truncated(kind: str, n_capped: int, n_total: int, by_task: dict[str, int] | None = None) -> None:
    """Log one warning when answers stopped at the token cap (they are cut, not finished)."""
    if n_capped <= 0:
        return
    detail = ", ".join(f"{t}: {n}" for t, n in sorted((by_task or {}).items()) if n)
    logger.warning("%s backend: %d of %d answers hit the max_new_tokens cap and are cut%s; raise --max-new-tokens",
                   kind, n_capped, n_total, f" ({detail})" if detail else "")


@dataclass(frozen=True)
class PixelBudget:
    """Image pixel budget for the Qwen-VL processor. ``source``: where it came from ("adapter
    <path>", "default", "explicit")."""

    min_pixels: int
    max_pixels: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "source": self.source}


def _budget_from_processor_json(cfg: dict[str, Any]) -> tuple[int | None, int | None]:
    # transformers 5 nests the image processor in processor_config.json; hub repos ship a flat
    # preprocessor_config.json with min_pixels/max_pixels and/or size.{shortest,longest}_edge.
    ip = cfg.get("image_processor", cfg) if isinstance(cfg.get("image_processor"), dict) else cfg
    size = ip.get("size") or {}
    lo = size.get("shortest_edge") if isinstance(size, dict) else None
    hi = size.get("longest_edge") if isinstance(size, dict) else None
    lo = lo if lo is not None else ip.get("min_pixels")
    hi = hi if hi is not None else ip.get("max_pixels")
    return (int(lo) if lo is not None else None), (int(hi) if hi is not None else None)


def adapter_pixel_budget(adapter: str | Path) -> tuple[int, int] | None:
    """The (min, max) pixels saved with an adapter (sft.py saves the training processor next to
    it), or None when the folder holds no processor config with a budget."""
    root = Path(adapter)
    for name in ("processor_config.json", "preprocessor_config.json"):
        f = root / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{f} is not valid JSON ({exc}); re-save the adapter's processor or delete the file") from None
        lo, hi = _budget_from_processor_json(cfg)
        if lo is not None or hi is not None:
            lo = lo if lo is not None else min(DEFAULT_MIN_PIXELS, hi)  # type: ignore[type-var]
            hi = hi if hi is not None else max(DEFAULT_MAX_PIXELS, lo)
            return int(lo), int(hi)
    return None


def resolve_pixel_budget(adapter: str | Path | None, min_pixels: int | None = None,
                         max_pixels: int | None = None) -> PixelBudget:
    """The budget inference should use: explicit values win (each one separately), then the
    budget saved with ``adapter``, then min = max = 50,176 (the training default). A warning
    says when an explicit budget differs from the adapter's, since the model then sees crops at
    another token count than in training."""
    saved = adapter_pixel_budget(adapter) if adapter is not None else None
    base_lo, base_hi = saved if saved else (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    lo = int(min_pixels) if min_pixels is not None else base_lo
    hi = int(max_pixels) if max_pixels is not None else base_hi
    if lo < 1 or hi < 1:
        raise ValueError(f"pixel budget must be positive, got min_pixels={lo}, max_pixels={hi}")
    if lo > hi:
        raise ValueError(f"min_pixels ({lo}) is larger than max_pixels ({hi}); pass --min-pixels <= --max-pixels")
    explicit = min_pixels is not None or max_pixels is not None
    if saved and explicit and (lo, hi) != saved:
        logger.warning("pixel budget %d/%d differs from the one adapter %s was trained with (%d/%d): the model "
                       "sees crops at another visual-token count than in training", lo, hi, adapter, *saved)
    if explicit:
        source = "explicit"
    elif saved:
        source = f"adapter {adapter}"
    else:
        source = "default (training: 224x224)"
    return PixelBudget(lo, hi, source)


def expected_visual_tokens(width: int, height: int, min_pixels: int, max_pixels: int,
                           patch_size: int = 14, merge_size: int = 2) -> int:
    """Visual tokens a Qwen-VL processor makes of a ``width`` x ``height`` image under a budget
    (transformers' ``smart_resize``: sides rounded to multiples of patch*merge; see the hf backend's
    docstring for the overshoot of upscaled crops). For backends that cannot count them."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    factor = patch_size * merge_size
    h, w = smart_resize(int(height), int(width), factor, int(min_pixels), int(max_pixels))
    return (h // factor) * (w // factor)
