"""transformers backend: AutoModelForImageTextToText + AutoProcessor, optional PEFT LoRA adapter.

Greedy decoding, batched with left padding (decoder-only models must be padded on the left so
that every row's new tokens start right after its prompt). Requests are grouped by whether they
carry an image and whether they use the adapter, so a batch is one forward shape.

``adapter_tasks``: the tasks that use the adapter; others run on the base weights through
``disable_adapter()``. ``("loc",)`` matches how the adapter is trained (T_loc only) and keeps the
base model's VQA and aggregation. ``None`` uses the adapter for every task (as a merged model).

The model is loaded on the first ``generate`` call, so a process that only replays the answer
cache never loads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .base import BackendError, MLLMBackend, MLLMRequest, dir_sha256

logger = logging.getLogger(__name__)


def model_fingerprint(path: str | Path) -> str:
    """Cheap identity of a (possibly multi-GB) model folder: config bytes + weight file names and
    sizes. Hashing every weight byte of a 7B model on each start would take minutes."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.glob("*.json")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for p in sorted(list(root.glob("*.safetensors")) + list(root.glob("*.bin"))):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    return h.hexdigest()[:16]


def local_model_folders(kind: str, model: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """Check a local model folder (and optional PEFT adapter folder) before anything loads."""
    model_path = Path(model)
    if not (model_path / "config.json").is_file():
        raise BackendError(f"{kind} backend: {model_path} is not a model folder (no config.json); pass --model "
                           "a local folder saved with save_pretrained")
    adapter_path = Path(adapter) if adapter else None
    if adapter_path is not None and not (adapter_path / "adapter_config.json").is_file():
        raise BackendError(f"{kind} backend: {adapter_path} is not a PEFT adapter folder (no adapter_config.json)")
    return model_path, adapter_path


def local_model_identity(backend: Any, decoding: dict[str, Any]) -> dict[str, Any]:
    """Cache identity of a backend serving a local model folder (+ optional adapter): the model's
    fingerprint, the adapter's content hash, which tasks use it, decoding, pixels and dtype."""
    adapter = backend.adapter_path
    return {
        "kind": backend.kind,
        "model": str(backend.model_path.resolve()),
        "model_fingerprint": model_fingerprint(backend.model_path),
        "adapter": str(adapter.resolve()) if adapter else None,
        "adapter_sha256": dir_sha256(adapter) if adapter else None,
        "adapter_tasks": list(backend.adapter_tasks) if backend.adapter_tasks else "all",
        "decoding": decoding,
        "pixels": {"min": backend.min_pixels, "max": backend.max_pixels},
        "dtype": backend.dtype,
    }


class HFBackend(MLLMBackend):
    kind = "hf"

    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        adapter_tasks: Sequence[str] | None = None,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        progress: bool = False,
        **_: Any,
    ) -> None:
        self.model_path, self.adapter_path = local_model_folders(self.kind, model, adapter)
        self.adapter_tasks = tuple(adapter_tasks) if adapter_tasks else None
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = max(1, int(batch_size))
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.dtype = dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self._model = None
        self._processor = None

    def identity(self) -> dict[str, Any]:
        return local_model_identity(self, {"greedy": True, "max_new_tokens": self.max_new_tokens})

    # -- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        if dtype == "auto" and self.device == "cpu":
            dtype = torch.float32  # bf16 matmuls are slow or missing on many CPUs
        logger.info("loading %s (%s) on %s", self.model_path, dtype, self.device)
        proc = AutoProcessor.from_pretrained(self.model_path)
        ip = getattr(proc, "image_processor", None)
        if ip is not None and (self.max_pixels or self.min_pixels):
            size = dict(ip.size) if hasattr(ip, "size") else {}
            lo = self.min_pixels or min(size.get("shortest_edge") or 0, self.max_pixels or 1 << 62) or 56 * 56
            hi = self.max_pixels or max(size.get("longest_edge") or 0, lo)
            ip.size = {"shortest_edge": int(min(lo, hi)), "longest_edge": int(hi)}
        proc.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=dtype)
        if self.adapter_path is not None:
            model = self._attach_adapter(model)
        self._model = model.to(self.device).eval()
        self._processor = proc

    def _attach_adapter(self, model):
        from peft import PeftModel

        cfg = json.loads((self.adapter_path / "adapter_config.json").read_text())  # type: ignore[operator]
        hint = (f"adapter {self.adapter_path} (trained on base '{cfg.get('base_model_name_or_path')}') does not "
                f"match the base model {self.model_path}: pass the --model it was trained on")
        recorded = cfg.get("base_model_name_or_path")
        if recorded and Path(str(recorded)).name != self.model_path.name:
            logger.warning("adapter %s was trained on '%s', loading it on %s", self.adapter_path, recorded, self.model_path)
        try:
            peft_model = PeftModel.from_pretrained(model, str(self.adapter_path), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = " ".join(line.strip() for line in str(exc).splitlines()[:2])
            raise BackendError(f"{hint} ({first[:400]})") from exc
        # PEFT only warns on adapter weights it cannot place; an adapter that silently does nothing
        # would make every "tuned" number a base-model number, so insist every saved tensor loaded.
        from peft.utils import load_peft_weights

        saved = load_peft_weights(str(self.adapter_path), device="cpu")
        have = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
        have_norm = {k.replace(".default", ""): v for k, v in have.items()}
        missing = [k for k in saved if k not in have_norm]
        wrong = [k for k, v in saved.items() if k in have_norm and have_norm[k].shape != v.shape]
        if missing or wrong:
            raise BackendError(f"{hint} ({len(missing)} adapter tensors have no place in the model, e.g. "
                               f"{(missing or wrong)[0]})")
        if not have:
            raise BackendError(f"{hint} (no LoRA layer was created)")
        return peft_model

    # -- generation ------------------------------------------------------------------------
    def _uses_adapter(self, task: str) -> bool:
        return self.adapter_path is not None and (self.adapter_tasks is None or task in self.adapter_tasks)

    def generate(self, requests: Sequence[MLLMRequest]) -> list[str]:
        requests = list(requests)
        if not requests:
            return []
        self._load()
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((self._uses_adapter(r.task), r.image is not None), []).append(i)
        todo = [(key, idx[s : s + self.batch_size]) for key, idx in groups.items()
                for s in range(0, len(idx), self.batch_size)]
        for (use_adapter, _), idx in tqdm(todo, desc="hf generate", unit="batch", disable=not self.progress):
            for i, a in zip(idx, self._generate_batch([requests[i] for i in idx], use_adapter)):
                out[i] = a
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, reqs: list[MLLMRequest], use_adapter: bool) -> list[str]:
        from PIL import Image

        proc, model = self._processor, self._model
        texts, images = [], []
        for r in reqs:
            content: list[dict] = [{"type": "image"}] if r.image is not None else []
            content.append({"type": "text", "text": r.prompt})
            texts.append(proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False))
            if r.image is not None:
                with Image.open(r.image) as im:
                    images.append(im.convert("RGB"))
        inputs = proc(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device)
        ctx = model.disable_adapter() if (self.adapter_path is not None and not use_adapter) else nullcontext()
        with ctx:
            gen = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=proc.tokenizer.pad_token_id)
        new = gen[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in proc.batch_decode(new, skip_special_tokens=True)]

    def close(self) -> None:
        self._model = None
        self._processor = None
