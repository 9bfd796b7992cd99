"""MLLM backends (hf, vllm, openai, oracle) behind one interface, plus the answer cache.

The concrete backends are registered by import path and loaded on first use, so a missing
optional package (vllm, openai) only matters to the backend that needs it, no module imports the
factory back, and the SynthPEDES oracle (``synthpedes/``, a simulation) is reached by name only.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    TASKS,
    BackendError,
    LocAnswer,
    MLLMBackend,
    MLLMRequest,
    PixelBudget,
    dir_sha256,
    file_sha256,
    greedy_decoding_settings,
    max_new_tokens_for,
    parse_max_new_tokens,
    resolve_pixel_budget,
    warn_truncated,
)
from .cache import CachedBackend, CacheMiss

# kind -> "module:class"
BACKENDS: dict[str, str] = {
    "hf": "mllm_tune.core.backends.hf:HFBackend",
    "vllm": "mllm_tune.core.backends.vllm:VLLMBackend",
    "openai": "mllm_tune.core.backends.openai_compat:OpenAIBackend",
    "oracle": "synthpedes.oracle:OracleBackend",  # SIMULATION: answers from SynthPEDES ground truth
}
BACKEND_KINDS: tuple[str, ...] = tuple(BACKENDS)


def make_backend(kind: str, **kw: Any) -> MLLMBackend:
    """Build a backend by name. Keyword arguments go to the backend's constructor:

    - ``hf``: model, adapter=None, adapter_tasks=None, max_new_tokens, batch_size, max_pixels, ...
    - ``vllm``: model, adapter=None, ...
    - ``openai``: base_url, model, api_key=None, concurrency, ...
    - ``oracle``: dataset_root, error_rate=0.0, seed=0, loc_rule="consistent"
    """
    target = BACKENDS.get(kind.lower())
    if target is None:
        raise ValueError(f"unknown MLLM backend '{kind}': choose one of {', '.join(BACKEND_KINDS)}")
    module, _, name = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            where = " (the SynthPEDES simulation: synthpedes/ in the repository)" if module.startswith("synthpedes") else ""
            raise BackendError(f"the '{kind}' backend lives in {module}{where}, which cannot be imported here: {exc}") from exc
        raise
    return getattr(mod, name)(**kw)


__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_PIXELS",
    "PixelBudget",
    "greedy_decoding_settings",
    "max_new_tokens_for",
    "parse_max_new_tokens",
    "resolve_pixel_budget",
    "warn_truncated",
    "BACKENDS",
    "BACKEND_KINDS",
    "TASKS",
    "BackendError",
    "CacheMiss",
    "CachedBackend",
    "LocAnswer",
    "MLLMBackend",
    "MLLMRequest",
    "dir_sha256",
    "file_sha256",
    "make_backend",
]
