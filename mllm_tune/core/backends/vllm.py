"""Offline vLLM engine backend (GPU), with the LoRA adapter served through ``LoRARequest``.

vLLM is optional (``pip install 'mllm-tune[vllm]'``); without it, building this backend raises a
clear error. The engine starts on the first ``generate`` call. Images are passed as base64 data
URLs in chat messages, like the openai backend, so both send the same conversation. As in the
hf backend, ``adapter_tasks`` selects the tasks answered with the adapter; the others run on the
base weights (no LoRARequest).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .base import BackendError, MLLMBackend, MLLMRequest
from .hf import local_model_folders, local_model_identity
from .openai_compat import image_data_url

logger = logging.getLogger(__name__)

_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm.lora.request import LoRARequest
    except ImportError as exc:
        raise BackendError(
            "the vllm backend needs vLLM, which is not installed here: `pip install 'mllm-tune[vllm]'` on a machine "
            "with a CUDA GPU, or use --mllm hf (transformers) or --mllm openai (a running `vllm serve`)"
        ) from exc
    return vllm, LoRARequest


class VLLMBackend(MLLMBackend):
    kind = "vllm"

    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        adapter_tasks: Sequence[str] | None = None,
        max_new_tokens: int = 256,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        dtype: str = "auto",
        temperature: float = 0.0,
        engine_kwargs: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        self._vllm, self._LoRARequest = _import_vllm()
        self.model_path, self.adapter_path = local_model_folders(self.kind, model, adapter)
        self.adapter_rank = 0
        if self.adapter_path is not None:
            self.adapter_rank = int(json.loads((self.adapter_path / "adapter_config.json").read_text()).get("r", 8))
        self.adapter_tasks = tuple(adapter_tasks) if adapter_tasks else None
        self.max_new_tokens = int(max_new_tokens)
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.dtype = dtype
        self.temperature = float(temperature)
        self.engine_kwargs = dict(engine_kwargs or {})
        self._llm = None

    def identity(self) -> dict[str, Any]:
        return local_model_identity(self, {"temperature": self.temperature, "max_tokens": self.max_new_tokens})

    def _engine(self):
        if self._llm is None:
            kw: dict[str, Any] = {"model": str(self.model_path), "dtype": self.dtype, "limit_mm_per_prompt": {"image": 1}}
            mm = {k: v for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v}
            if mm:
                kw["mm_processor_kwargs"] = mm
            if self.adapter_path is not None:
                kw["enable_lora"] = True
                kw["max_lora_rank"] = next((r for r in _LORA_RANKS if r >= self.adapter_rank), self.adapter_rank)
            kw.update(self.engine_kwargs)
            logger.info("starting vLLM engine: %s", kw)
            try:
                self._llm = self._vllm.LLM(**kw)
            except (ValueError, RuntimeError) as exc:
                raise BackendError(f"vllm backend: the engine did not start for {self.model_path}: {exc}") from exc
        return self._llm

    def _uses_adapter(self, task: str) -> bool:
        return self.adapter_path is not None and (self.adapter_tasks is None or task in self.adapter_tasks)

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        requests = list(requests)
        if not requests:
            return []
        llm = self._engine()
        params = self._vllm.SamplingParams(temperature=self.temperature, max_tokens=self.max_new_tokens)
        out: list[str | None] = [None] * len(requests)
        for use_adapter in (True, False):
            idx = [i for i, r in enumerate(requests) if self._uses_adapter(r.task) == use_adapter]
            if not idx:
                continue
            convs = []
            for i in idx:
                r = requests[i]
                content: list[dict] = []
                if r.image is not None:
                    content.append({"type": "image_url", "image_url": {"url": image_data_url(r.image)}})
                content.append({"type": "text", "text": r.prompt})
                convs.append([{"role": "user", "content": content}])
            lora = self._LoRARequest("thi_adapter", 1, str(self.adapter_path)) if use_adapter else None
            try:
                results = llm.chat(convs, params, lora_request=lora, use_tqdm=False)
            except (ValueError, RuntimeError) as exc:
                if lora is not None:
                    raise BackendError(f"vllm backend: adapter {self.adapter_path} could not be applied to "
                                       f"{self.model_path} (does it match the base model?): {exc}") from exc
                raise
            for i, res in zip(idx, results):
                out[i] = res.outputs[0].text.strip()
        return out  # type: ignore[return-value]
