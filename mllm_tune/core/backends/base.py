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


class MLLMBackend(ABC):
    """Answers batches of requests. Subclasses set ``kind`` and, for fake models, ``simulated``."""

    kind: str = "base"
    simulated: bool = False  # True when answers do not come from a real model (the oracle)

    @abstractmethod
    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        """Answer every request (greedy decoding); same length and order as ``requests``."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """JSON-serialisable description of everything that determines the answers."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, engines). Safe to call twice."""

    def __enter__(self) -> "MLLMBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
