"""transformers backend: AutoModelForImageTextToText + AutoProcessor, optional PEFT LoRA adapter.

Greedy decoding, batched with left padding (decoder-only models must be padded on the left so
that every row's new tokens start right after its prompt). Requests are grouped by whether they
carry an image, whether they use the adapter and their task's token cap, so a batch is one
forward shape.

``adapter_tasks``: the tasks that use the adapter; others run on the base weights through
``disable_adapter()``. ``("loc",)`` matches how the adapter is trained (T_loc only) and keeps the
base model's VQA and aggregation. ``None`` uses the adapter for every task (as a merged model).

What inference shares with training:

- **Image budget.** The processor's pixel budget is :func:`~.base.resolve_pixel_budget`: the one
  saved with the adapter, else min = max = 50,176 (224x224, the training default), unless the
  caller passes ``min_pixels``/``max_pixels``. The Qwen2-VL resize (``smart_resize``) rounds each
  side to a multiple of 28 (patch 14 x merge 2) keeping the aspect ratio: a crop below the budget
  is scaled up with ``ceil`` and can overshoot max_pixels (64x128 -> 168x336 = 56,448 px, 72
  visual tokens); one above is scaled down with ``floor`` and lands under it (168x336 -> 140x308
  = 43,120 px, 55 tokens). Each visual token covers 28x28 = 784 px. The same function runs in the
  SFT collator, so the same crop gives the same token count in both.
- **Decoding.** Exactly greedy (:func:`~.base.greedy_decoding_settings`): an explicit
  ``GenerationConfig`` replaces the checkpoint's, whose ``repetition_penalty`` (1.05 on real
  Qwen2-VL) ``generate`` would otherwise apply even without sampling. Answer caps per task
  (:data:`~.base.DEFAULT_MAX_NEW_TOKENS`); answers cut at the cap are counted and warned about.

Model and adapter arguments are local folders or hub ids ``org/name[@revision]``
(:func:`mllm_tune.core.hub.resolve_model`). The model is loaded on the first ``generate`` call,
so a process that only replays the answer cache never loads it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..hub import ModelResolveError, ResolvedModel, resolve_model
from ..yes_no import YesNoIds, p_yes_from_logits, yes_no_ids, yes_no_text
from .base import (
    BackendError,
    LocAnswer,
    MLLMBackend,
    MLLMRequest,
    check_loc_requests,
    dir_sha256,
    greedy_decoding_settings,
    max_new_tokens_for,
    max_new_tokens_table,
    resolve_pixel_budget,
    warn_truncated,
)

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


def resolve_model_folders(kind: str, model: str | Path,
                          adapter: str | Path | None) -> tuple[ResolvedModel, ResolvedModel | None]:
    """Resolve the model (and optional PEFT adapter) argument -- a local folder or a hub id
    ``org/name[@rev]`` -- and check both before anything loads."""
    try:
        m = resolve_model(model, what=f"{kind} backend model")
        a = resolve_model(adapter, what=f"{kind} backend adapter") if adapter else None
    except ModelResolveError as exc:
        raise BackendError(str(exc)) from None
    if not (m.path / "config.json").is_file():
        raise BackendError(f"{kind} backend: {model} is not a model folder (no config.json in {m.path}); pass --model "
                           "a folder saved with save_pretrained or a hub id org/name")
    if a is not None and not (a.path / "adapter_config.json").is_file():
        raise BackendError(f"{kind} backend: {adapter} is not a PEFT adapter folder (no adapter_config.json in "
                           f"{a.path}); pass --adapter the folder mllm_tune.sft saved")
    return m, a


def local_model_folders(kind: str, model: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """:func:`resolve_model_folders`, returning just the local paths."""
    m, a = resolve_model_folders(kind, model, adapter)
    return m.path, (a.path if a else None)


def _weights_identity(resolved: ResolvedModel | None, path: Path) -> dict[str, Any]:
    if resolved is not None and resolved.repo_id is not None:
        return resolved.identity()  # repo + commit: stable across HF cache locations
    return {"path": str(path.resolve())}


def local_model_identity(backend: Any, decoding: dict[str, Any]) -> dict[str, Any]:
    """Cache identity of a backend serving a model folder (+ optional adapter): the model's
    fingerprint (and hub commit), the adapter's content hash, which tasks use it, decoding,
    pixels and dtype. Reads ``model_resolved``/``adapter_resolved`` when the backend has them."""
    adapter = backend.adapter_path
    m_res = getattr(backend, "model_resolved", None)
    a_res = getattr(backend, "adapter_resolved", None)
    m_id = _weights_identity(m_res, backend.model_path)
    ident = {
        "kind": backend.kind,
        "model": m_id.get("path") or f"{m_id['repo_id']}@{m_id['commit']}",
        "model_fingerprint": model_fingerprint(backend.model_path),
        "adapter": (_weights_identity(a_res, adapter).get("path") or f"{a_res.repo_id}@{a_res.commit}") if adapter else None,
        "adapter_sha256": dir_sha256(adapter) if adapter else None,
        "adapter_tasks": list(backend.adapter_tasks) if backend.adapter_tasks else "all",
        "decoding": decoding,
        "pixels": {"min": backend.min_pixels, "max": backend.max_pixels},
        "dtype": backend.dtype,
    }
    return ident


# T_loc answers: "generate" = greedy text (the released rule reads it) + p_yes from the first
# step's logits; "forward" = one forward pass, the answer constrained to Yes/No by p_yes.
LOC_ANSWER_MODES = ("generate", "forward")


class HFBackend(MLLMBackend):
    kind = "hf"
    scores_loc = True

    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        adapter_tasks: Sequence[str] | None = None,
        max_new_tokens: int | dict[str, int] | None = None,
        batch_size: int = 8,
        max_pixels: int | None = None,
        min_pixels: int | None = None,
        dtype: str = "auto",
        device: str | None = None,
        progress: bool = False,
        loc_answer: str = "generate",
        **_: Any,
    ) -> None:
        if loc_answer not in LOC_ANSWER_MODES:
            raise BackendError(f"hf backend: loc_answer must be one of {LOC_ANSWER_MODES}, got {loc_answer!r}")
        self.loc_answer = loc_answer
        self.model_resolved, self.adapter_resolved = resolve_model_folders(self.kind, model, adapter)
        self.model_path = self.model_resolved.path
        self.adapter_path = self.adapter_resolved.path if self.adapter_resolved else None
        self.adapter_tasks = tuple(adapter_tasks) if adapter_tasks else None
        self.max_new_tokens = max_new_tokens_table(max_new_tokens)  # validates the setting early
        self.batch_size = max(1, int(batch_size))
        try:
            self.pixel_budget = resolve_pixel_budget(self.adapter_path, min_pixels, max_pixels)
        except ValueError as exc:
            raise BackendError(f"hf backend: {exc}") from None
        self.min_pixels, self.max_pixels = self.pixel_budget.min_pixels, self.pixel_budget.max_pixels
        self.dtype = dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.progress = progress
        self._model = None
        self._processor = None
        self._gen_config = None
        # measured on the inputs actually fed to the model (image pad tokens per image)
        self.visual_tokens: list[int] = []
        self.capped: Counter[str] = Counter()
        self.answered: Counter[str] = Counter()
        self._yes_no: YesNoIds | None = None
        # T_loc answers whose greedy first token was neither Yes nor No
        self.loc_first_not_yes_no = 0

    def decoding(self) -> dict[str, Any]:
        return {**greedy_decoding_settings(), "max_new_tokens": dict(self.max_new_tokens)}

    def identity(self) -> dict[str, Any]:
        ident = local_model_identity(self, self.decoding())
        if self.loc_answer != "generate":  # its T_loc text differs ("No" for "No glasses."): its own answers
            ident["loc_answer"] = self.loc_answer
        return ident

    def visual_token_stats(self) -> dict[str, Any]:
        """Mean visual tokens per image over the images this backend has encoded."""
        n = len(self.visual_tokens)
        return {"images": n, "mean_visual_tokens": round(sum(self.visual_tokens) / n, 2) if n else None,
                "measured": "image pad tokens in the model inputs" if n else "not measured (no image encoded)"}

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
        apply_pixel_budget(proc, self.min_pixels, self.max_pixels)
        proc.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=dtype)
        self._gen_config = greedy_generation_config(model.generation_config, proc.tokenizer)
        model.generation_config = self._gen_config  # nothing of the checkpoint's sampling/penalties is merged back
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
        from mllm_tune.core.adapter_layout import current_layout_dir

        # an adapter saved against the pre-4.52 Qwen-VL layout (model.layers.N) is renamed once
        # (cached copy, one log line); a current one is used as it is
        folder = current_layout_dir(self.adapter_path)
        try:
            peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as exc:
            first = " ".join(line.strip() for line in str(exc).splitlines()[:2])
            raise BackendError(f"{hint} ({first[:400]})") from exc
        # PEFT only warns on adapter weights it cannot place; an adapter that silently does nothing
        # would make every "tuned" number a base-model number, so insist every saved tensor loaded.
        from peft.utils import load_peft_weights

        saved = load_peft_weights(str(folder), device="cpu")
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
        capped_before = Counter(self.capped)
        for (use_adapter, _, cap), idx in tqdm(self._batches(requests), desc="hf generate", unit="batch",
                                               disable=not self.progress):
            for i, a in zip(idx, self._generate_batch([requests[i] for i in idx], use_adapter, cap)):
                out[i] = a
        capped_now = self.capped - capped_before
        warn_truncated(self.kind, sum(capped_now.values()), len(requests), dict(capped_now))
        return out  # type: ignore[return-value]

    def _batches(self, requests: list[MLLMRequest]) -> list[tuple[tuple[bool, bool, int], list[int]]]:
        """Request indices in batches of one forward shape: same adapter use, image or not, and
        answer cap; ``batch_size`` at most."""
        groups: dict[tuple[bool, bool, int], list[int]] = {}
        for i, r in enumerate(requests):
            key = (self._uses_adapter(r.task), r.image is not None, max_new_tokens_for(r.task, self.max_new_tokens))
            groups.setdefault(key, []).append(i)
        return [(key, idx[s : s + self.batch_size]) for key, idx in groups.items()
                for s in range(0, len(idx), self.batch_size)]

    def _inputs(self, reqs: list[MLLMRequest]):
        from PIL import Image

        proc = self._processor
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
        if images:
            self.visual_tokens.extend(count_image_tokens(inputs["input_ids"], self._model.config))
        return inputs

    def _adapter_ctx(self, use_adapter: bool):
        model = self._model
        return model.disable_adapter() if (self.adapter_path is not None and not use_adapter) else nullcontext()

    @torch.no_grad()
    def _generate_batch(self, reqs: list[MLLMRequest], use_adapter: bool, max_new_tokens: int,
                        first_logits: list[torch.Tensor] | None = None) -> list[str]:
        """Greedy answers; with ``first_logits`` (a list) the first step's [B, V] logits are appended
        to it (raw model logits: greedy decoding applies no processor)."""
        proc, model = self._processor, self._model
        inputs = self._inputs(reqs)
        gc = copy.deepcopy(self._gen_config)
        gc.max_new_tokens = int(max_new_tokens)
        if first_logits is not None:
            gc.output_logits = gc.return_dict_in_generate = True
        with self._adapter_ctx(use_adapter):
            gen = model.generate(**inputs, generation_config=gc)
        if first_logits is not None:
            first_logits.append(gen.logits[0].float())
            gen = gen.sequences
        new = gen[:, inputs["input_ids"].shape[1] :]
        eos = _eos_ids(gc)
        for r, row in zip(reqs, new):
            self.answered[r.task] += 1
            # cut = it ran to the cap without emitting an end-of-sequence token
            if row.shape[0] >= max_new_tokens and not any(int(t) in eos for t in row):
                self.capped[r.task] += 1
        return [t.strip() for t in proc.batch_decode(new, skip_special_tokens=True)]

    # -- T_loc scores ------------------------------------------------------------------------
    def yes_no(self) -> YesNoIds:
        """The Yes/No token ids this backend scores (loads the processor)."""
        self._load()
        if self._yes_no is None:
            self._yes_no = yes_no_ids(self._processor)
        return self._yes_no

    def localize(self, requests: Sequence[MLLMRequest]) -> list[LocAnswer]:
        """T_loc answers with p_yes, by ``loc_answer``:

        - ``"generate"`` (default): the greedy text exactly as :meth:`generate` gives it (so the
          released rule, 'yes' anywhere in the answer, decides as before) and p_yes from the
          first generated step's logits: no extra pass.
        - ``"forward"``: one forward pass per batch, never ``generate``: the next-token logits at
          the end of each (left-padded) prompt give p_yes, and the answer is constrained to Yes/No:
          "Yes" when p_yes > 0.5, else "No" (the greedy first token whenever that is a Yes/No
          token; the answers whose first token is not are counted in ``loc_first_not_yes_no``).
          Same decision as the greedy text whenever the answer is a plain Yes or No (a tuned
          model's); an untuned model that rambles ("No glasses. Yes, ...") can differ under the
          released rule, which reads 'yes' anywhere in the text.
        """
        requests = list(requests)
        check_loc_requests(requests)
        if not requests:
            return []
        ids = self.yes_no()
        out: list[LocAnswer | None] = [None] * len(requests)
        yes_set, no_set = set(ids.yes), set(ids.no)
        capped_before = self.capped["loc"]
        for (use_adapter, _, cap), idx in tqdm(self._batches(requests), desc=f"hf T_loc ({self.loc_answer})",
                                               unit="batch", disable=not self.progress):
            reqs = [requests[i] for i in idx]
            texts: dict[int, str] = {}
            if self.loc_answer == "generate":
                first: list[torch.Tensor] = []
                texts = dict(enumerate(self._generate_batch(reqs, use_adapter, cap, first_logits=first)))
                logits = first[0]
            else:
                logits = self._next_token_logits(reqs, use_adapter)
            p = p_yes_from_logits(logits, ids).tolist()
            top = logits.argmax(dim=-1).tolist()
            self.loc_first_not_yes_no += sum(t not in yes_set and t not in no_set for t in top)
            for j, i in enumerate(idx):  # p_yes is a sigmoid: within [0, 1]
                if self.loc_answer == "forward":
                    self.answered["loc"] += 1
                out[i] = LocAnswer(texts.get(j, yes_no_text(p[j])), p[j])
        warn_truncated(self.kind, self.capped["loc"] - capped_before, len(requests), {"loc": self.capped["loc"] - capped_before})
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def _next_token_logits(self, reqs: list[MLLMRequest], use_adapter: bool) -> torch.Tensor:
        """[B, V] float32 logits of the first answer token (the last prompt position; left
        padding puts it at -1 in every row). Only that position goes through the LM head."""
        inputs = self._inputs(reqs)
        with self._adapter_ctx(use_adapter):
            logits = self._model(**inputs, logits_to_keep=1, use_cache=False).logits
        return logits[:, -1, :].float()

    def close(self) -> None:
        self._model = None
        self._processor = None


def apply_pixel_budget(processor: Any, min_pixels: int, max_pixels: int) -> None:
    """Set the Qwen-VL image processor's budget (``size`` edges; min/max_pixels attributes where
    the processor still has them), as mllm_tune.core.modeling.set_pixel_budget does for training."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        return
    size = dict(getattr(ip, "size", None) or {})
    size.update({"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)})
    ip.size = size
    for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, name):
            setattr(ip, name, int(v))


def greedy_generation_config(checkpoint: Any, tokenizer: Any):
    """A fresh GenerationConfig that keeps only the checkpoint's special tokens and decodes
    exactly greedily (no repetition penalty, no sampling, no other logit processor)."""
    from transformers import GenerationConfig

    g = greedy_decoding_settings()
    eos = getattr(checkpoint, "eos_token_id", None) if checkpoint is not None else None
    pad = getattr(checkpoint, "pad_token_id", None) if checkpoint is not None else None
    bos = getattr(checkpoint, "bos_token_id", None) if checkpoint is not None else None
    return GenerationConfig(
        do_sample=False, num_beams=1, repetition_penalty=g["repetition_penalty"],
        no_repeat_ngram_size=g["no_repeat_ngram_size"],
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        pad_token_id=pad if pad is not None else tokenizer.pad_token_id,
        bos_token_id=bos,
    )


def _eos_ids(gc: Any) -> set[int]:
    eos = gc.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def count_image_tokens(input_ids: torch.Tensor, config: Any) -> list[int]:
    """Visual tokens per image in a batch of prompts (one image per prompt): the image pad
    tokens the processor expanded, which is what the model actually attends to."""
    tok = getattr(config, "image_token_id", None)
    if tok is None:
        return []
    counts = (input_ids == int(tok)).sum(dim=1).tolist()
    return [int(c) for c in counts if c > 0]
