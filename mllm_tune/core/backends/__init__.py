"""MLLM backends (hf, vllm, openai, oracle) behind one interface, plus the answer cache."""

from .base import (
    BACKEND_KINDS,
    TASKS,
    BackendError,
    MLLMBackend,
    MLLMRequest,
    dir_sha256,
    file_sha256,
    make_backend,
)
from .cache import CachedBackend, CacheMiss

__all__ = [
    "BACKEND_KINDS",
    "TASKS",
    "BackendError",
    "CacheMiss",
    "CachedBackend",
    "MLLMBackend",
    "MLLMRequest",
    "dir_sha256",
    "file_sha256",
    "make_backend",
]
