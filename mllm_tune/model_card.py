"""README.md model card of a trained adapter: base model, data, LoRA setting, metrics, how to load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm_tune.core.modeling import VISION_MODULE_NAMES

CARD_NAME = "README.md"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _bullets(title: str, items: dict) -> list[str]:
    return [f"## {title}", *[f"- {k}: {_fmt(v)}" for k, v in items.items()]]


def _metric_table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| metric | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows]]


def _load_snippet(imports: list[str], body: list[str]) -> list[str]:
    return ["## How to load", "", "```python", *imports, "", *body, "```", ""]


def render_card(base_model: str, data: dict, lora: dict | None, training: dict, metrics: dict,
                adapter_ref: str = "ADAPTER_DIR_OR_REPO") -> str:
    """The card text. Everything it states comes from the arguments (nothing is made up).
    ``lora=None`` describes a full fine-tune (a whole model, no adapter)."""
    if lora is None:
        return _render_full_card(base_model, data, training, metrics, adapter_ref)
    eval_rows = [(k, v) for k, v in sorted(metrics.items()) if k.startswith("eval_") and isinstance(v, (int, float))]
    train_rows = [(k, metrics[k]) for k in ("train_loss", "global_step", "train_runtime", "train_samples_per_second")
                  if k in metrics]
    targets = lora.get("target_modules")
    front = [
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: peft",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- lora",
        "- sft",
        "- trl",
        "- person-reid",
        "- anchor-localization",
        "---",
    ]
    lines = [
        *front,
        "",
        f"# LoRA adapter for {base_model}: anchor localization (Yes/No)",
        "",
        "Answers whether a text description matches the pedestrian in an image (\"Yes\"/\"No\"). It is the",
        "interaction model of human-centred interactive text-to-image person re-identification (ICL).",
        "Trained with `mllm_tune/sft.py` (TRL SFTTrainer, loss on the answer tokens only).",
        "",
        "## Base model",
        f"`{base_model}`",
        "",
        *_bullets("Data", data),
        "",
        "## LoRA setting",
        f"- r: {lora.get('r')}, alpha: {lora.get('alpha')}, dropout: {lora.get('dropout')}",
        f"- target modules: {targets if targets is not None else 'every linear layer of the language model'}"
        " (vision tower and projector frozen, no LoRA there)" if lora.get("freeze_vision_tower", True) else
        f"- target modules: {targets}; vision tower trained fully (saved with the adapter)",
        *([f"- trained fully and saved with the adapter: {lora['modules_to_save']}"] if lora.get("modules_to_save") else []),
        "",
        *_bullets("Training", training),
        "",
        "## Evaluation (held-out pairs)",
        "",
        "`eval_yesno_accuracy` is the accuracy of the greedy answer's first token (Yes/No) on the held-out pairs; "
        "`eval_yesno_auc` (ROC-AUC), `eval_yesno_ece` (expected calibration error, 10 bins) and `eval_yesno_brier` "
        "score p_yes, P(Yes) over the Yes/No tokens at the first answer position, the score THI's τ gate reads.",
        "",
        *_metric_table(eval_rows + train_rows),
        "",
        *_load_snippet(
            ["from peft import PeftModel", "from transformers import AutoModelForImageTextToText, AutoProcessor"],
            [f"base = AutoModelForImageTextToText.from_pretrained({base_model!r})",
             f"model = PeftModel.from_pretrained(base, {adapter_ref!r})",
             f"processor = AutoProcessor.from_pretrained({adapter_ref!r})"]),
        "Merged weights: `python -m mllm_tune.merge --adapter ADAPTER_DIR --out MERGED_DIR`.",
        "vLLM: serve the base model with `--enable-lora` and pass this folder as a LoRA module.",
        "",
    ]
    return "\n".join(lines)


def _render_full_card(base_model: str, data: dict, training: dict, metrics: dict, model_ref: str) -> str:
    rows = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, (int, float))]
    return "\n".join([
        "---",
        f"base_model: {json.dumps(base_model)}",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags:",
        "- sft",
        "- trl",
        "- person-reid",
        "---",
        "",
        f"# Full fine-tune of {base_model}",
        "",
        "Every language-model weight trained with `mllm_tune/sft.py` (`use_peft: false`; TRL SFTTrainer,",
        "loss on the answer tokens only).",
        "",
        *_bullets("Data", data),
        "",
        *_bullets("Training", training),
        "",
        *_metric_table(rows),
        "",
        *_load_snippet(
            ["from transformers import AutoModelForImageTextToText, AutoProcessor"],
            [f"model = AutoModelForImageTextToText.from_pretrained({model_ref!r})",
             f"processor = AutoProcessor.from_pretrained({model_ref!r})"]),
    ])


def write_model_card(out_dir: str | Path, cfg: Any, metrics: dict, data_info: dict) -> Path:
    """Write README.md for a finished run (`cfg` is a `sft_config.RunConfig`)."""
    t = cfg.training
    lora = {
        "r": cfg.lora.lora_r,
        "alpha": cfg.lora.lora_alpha,
        "dropout": cfg.lora.lora_dropout,
        "target_modules": cfg.lora.lora_target_modules,
        "freeze_vision_tower": cfg.vision.freeze_vision_tower,
    }
    cfg_file = Path(out_dir) / "adapter_config.json"
    if cfg_file.is_file():  # the targets PEFT actually used
        saved = json.loads(cfg_file.read_text())
        used = saved.get("target_modules")
        if used:
            lora["target_modules"] = sorted(used) if isinstance(used, list) else used
        lora["modules_to_save"] = saved.get("modules_to_save")
    training = {
        "epochs": t.num_train_epochs if t.max_steps in (None, -1) else f"max_steps {t.max_steps}",
        "per-device batch": t.per_device_train_batch_size,
        "gradient accumulation": t.gradient_accumulation_steps,
        "learning rate": t.learning_rate,
        "image pixels (min/max)": f"{cfg.vision.image_min_pixels}/{cfg.vision.image_max_pixels}",
        "precision": "bf16" if t.bf16 else ("fp16" if t.fp16 else "fp32"),
        "seed": t.seed,
    }
    if not cfg.lora.use_peft:
        training["vision tower"] = "frozen" if cfg.vision.freeze_vision_tower else "trained"
    text = render_card(cfg.model.model_name_or_path, data_info, lora if cfg.lora.use_peft else None, training, metrics,
                       adapter_ref=t.hub_model_id or str(out_dir))
    path = Path(out_dir) / CARD_NAME
    path.write_text(text, encoding="utf-8")
    return path


def card_from_adapter(adapter_dir: str | Path, repo_id: str | None = None) -> str:
    """A card for an adapter folder without one (e.g. trained elsewhere): from its config + metrics."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    metrics: dict = {}
    data: dict = {}
    mfile = adapter_dir / "sft_metrics.json"
    if mfile.is_file():
        rec = json.loads(mfile.read_text())
        metrics, data = rec.get("metrics", {}), rec.get("data", {})
    lora = {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": cfg.get("target_modules"),
            "modules_to_save": cfg.get("modules_to_save"),
            "freeze_vision_tower": not any(m in VISION_MODULE_NAMES for m in cfg.get("modules_to_save") or [])}
    return render_card(cfg.get("base_model_name_or_path", "unknown"), data or {"dataset": "unknown"}, lora, {},
                       metrics, adapter_ref=repo_id or str(adapter_dir))
