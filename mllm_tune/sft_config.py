"""Configuration of the LoRA SFT trainer: dataclasses beside TRL's `SFTConfig`, and the parser.

A recipe is one flat YAML mapping. Each key belongs to exactly one of the dataclasses below or to
TRL's `SFTConfig` (which holds every `transformers.TrainingArguments` field), so recipe keys use
TRL's names (`model_name_or_path`, `dataset_name`, `output_dir`, `learning_rate`, ...). The recipe
is given as a positional path or with `--config`; `--key value` after it overrides any field.
Unknown keys fail, naming the key and the closest known one.
"""

from __future__ import annotations

import difflib
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe or command line that cannot be turned into a training run."""


@dataclass
class ModelArguments:
    """Which base model to load and how."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a Qwen-VL class model (required)."}
    )
    model_revision: str = field(default="main", metadata={"help": "Hub revision of the base model."})
    dtype: str = field(
        default="auto",
        metadata={"help": "'auto' = bfloat16 on GPU, float32 on CPU; or float32/bfloat16/float16."},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: load the base in 4 bit (GPU + bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type for QLoRA: nf4 or fp4."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "QLoRA double quantisation."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Replace the processor's chat template before training: stock-qwen2-vl, stock-qwen2.5-vl, "
                  "stock-qwen3-vl (the family's stock template as shipped in TRL, which TRL can make "
                  "training-compatible) or the path of a .jinja file. For checkpoints whose own template TRL "
                  "refuses (fine-tuned, 'Thinking' variants, edited templates). Saved with the adapter's processor."},
    )


@dataclass
class DataArguments:
    """Where the anchor-localization pairs come from (docs/architecture.md, 'Data contracts')."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "save_to_disk folder, .jsonl/.json/.parquet file of rows, or a hub dataset id (required)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split used for training."})
    dataset_test_split: str = field(default="eval", metadata={"help": "Split used for evaluation, if present."})
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "Held-out fraction of the train rows when the data has no eval split (0 = no eval)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N eval rows."})
    yesno_eval: bool = field(
        default=True, metadata={"help": "Log Yes/No accuracy of the greedy answer with the eval metrics."}
    )


@dataclass
class VisionArguments:
    """Image budget and which vision parts train."""

    image_min_pixels: int | None = field(
        default=None, metadata={"help": "Smallest image area after resizing (pixels); None keeps the processor's."}
    )
    image_max_pixels: int | None = field(
        default=None, metadata={"help": "Largest image area after resizing (pixels); None keeps the processor's."}
    )
    freeze_vision_tower: bool = field(
        default=True,
        metadata={
            "help": "Keep the vision tower and projector frozen and free of LoRA (default; vLLM serves such "
            "adapters). False trains them fully and saves them with the adapter."
        },
    )


@dataclass
class LoraArguments:
    """LoRA settings (SPEC §4: r 8, alpha 16)."""

    use_peft: bool = field(
        default=True,
        metadata={"help": "Train a LoRA adapter (default). False trains every language-model weight in full "
                  "(and the vision tower too when freeze_vision_tower is false) and saves a whole model."},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Default: every linear layer of the language model. A list of module names (one element is "
            "fine), or one regex matched against full module names, or 'all-linear'. The vision tower is "
            "always excluded while freeze_vision_tower is true."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained fully and saved with the adapter."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling."})
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})


# The dataclasses that make up a run, in parser order. SFTConfig is added lazily (heavy import).
OWN_ARGUMENT_CLASSES = (ModelArguments, DataArguments, VisionArguments, LoraArguments)


@dataclass
class RunConfig:
    model: ModelArguments
    data: DataArguments
    vision: VisionArguments
    lora: LoraArguments
    training: Any  # trl.SFTConfig
    recipe_path: Path | None = None
    recipe: dict = field(default_factory=dict)


# SFTConfig defaults that suit image SFT better than TRL's text defaults; a recipe or the command
# line still overrides them.
SFT_DEFAULTS: dict[str, Any] = {
    "assistant_only_loss": True,  # loss on the answer tokens only (SPEC §4)
    "max_length": None,  # truncation would cut image tokens (STACK.md)
    "remove_unused_columns": False,  # keep `images` for the vision collator
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "steps",
    "eval_strategy": "no",
}


def device_defaults() -> dict[str, Any]:
    """bf16 on a CUDA machine (TRL's default), fp32 on the CPU with `use_cpu` (needed by
    multi-process CPU runs and DeepSpeed on CPU, STACK.md). A recipe value still wins."""
    import torch

    if torch.cuda.is_available():
        return {}
    return {"use_cpu": True, "bf16": False, "fp16": False}


# The most dataloader workers a process gets by default: one worker makes a batch of 4 at the
# 50,176-pixel budget (row read, decode, chat template, image processor, labels) in about 0.12 s of
# one core (bench/RESULTS.md, "SFT input pipeline"), so 4 deliver one every ~30 ms, well under the
# GPU step time expected of a 2B-7B LoRA step (not measured on a GPU yet).
MAX_DEFAULT_WORKERS = 4


def loader_defaults(cuda: bool, cpus: int | None = None, local_world_size: int = 1) -> dict[str, Any]:
    """DataLoader settings for a run on CUDA (`cuda`) or on the CPU.

    On CUDA the collator runs in worker processes (up to MAX_DEFAULT_WORKERS per training process,
    one core per process left to the training loop), kept alive across epochs and evaluations, and
    batches come from pinned memory with non-blocking copies. On the CPU there is no device to feed
    and workers only compete with the step for the same cores: 0 workers, no pinning (fast,
    deterministic tests). Batches are the same either way (tests/test_sft_input_pipeline.py)."""
    if not cuda:
        return {"dataloader_num_workers": 0, "dataloader_pin_memory": False}
    per_process = max(1, (cpus or 1) // max(local_world_size, 1))
    workers = max(1, min(MAX_DEFAULT_WORKERS, per_process - 1))
    return {"dataloader_num_workers": workers, "dataloader_pin_memory": True,
            "dataloader_persistent_workers": True, "non_blocking": True}


def available_cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def apply_loader_defaults(training: Any, explicit: set[str]) -> None:
    """Fill the dataloader fields the recipe and command line left unset (loader_defaults)."""
    import os

    import torch

    cuda = torch.cuda.is_available() and not training.use_cpu
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    chosen = loader_defaults(cuda, available_cpus(), world)
    for key in ("dataloader_num_workers", "dataloader_pin_memory"):
        if key in chosen and key not in explicit:
            setattr(training, key, chosen[key])
    if training.dataloader_num_workers > 0 and "dataloader_persistent_workers" not in explicit:
        # workers (chosen here or by the recipe) outlive an epoch and an evaluation: no re-fork, no
        # re-pickled dataset and processor each time
        training.dataloader_persistent_workers = True
    acc = getattr(training, "accelerator_config", None)
    if (chosen.get("non_blocking") and training.dataloader_pin_memory and "accelerator_config" not in explicit
            and hasattr(acc, "non_blocking")):
        acc.non_blocking = True  # host-to-device copies from pinned memory overlap the step


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in fields(cls) if f.init}


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Turn a YAML value into the field's type (PyYAML reads `5e-5` as a string, for example)."""
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        # Try the members in order; keep the value as-is if none accepts it.
        for a in args:
            try:
                return _coerce(value, a, key, source)
            except RecipeError:
                continue
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise RecipeError(f"{source}: '{key}' must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise RecipeError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            num = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{source}: '{key}' must be a number, got {value!r}") from None
        if annotation is int:
            if num != int(num):
                raise RecipeError(f"{source}: '{key}' must be an integer, got {value!r}")
            return int(num)
        return num
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise RecipeError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _split_argv(argv: list[str]) -> tuple[Path | None, list[str]]:
    """Find the recipe: a positional .yaml/.yml before the first flag, or `--config PATH`."""
    argv = list(argv)
    recipe: Path | None = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise RecipeError("--config needs a path to a recipe YAML")
        recipe = Path(argv[i + 1])
        del argv[i : i + 2]
    positional = [a for a in argv[:1] if not a.startswith("-")]
    if positional:
        if recipe is not None:
            raise RecipeError(f"two recipes given: {positional[0]} and --config {recipe}; pass one")
        recipe = Path(positional[0])
        argv = argv[1:]
    stray = [a for a in argv if not a.startswith("-") and a.endswith((".yaml", ".yml"))]
    if stray and all(not argv[max(argv.index(s) - 1, 0)].startswith("--") for s in stray):
        raise RecipeError(f"the recipe must come first (or with --config): got {stray[0]} after other arguments")
    return recipe, argv


def load_recipe(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist; pass a recipe YAML such as recipes/qwen_lora.yaml "
                          "(see recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse `[RECIPE.yaml | --config RECIPE.yaml] [--key value ...]` into a RunConfig."""
    import os

    from transformers import HfArgumentParser
    from trl import SFTConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_path, rest = _split_argv(argv)
    recipe = load_recipe(recipe_path) if recipe_path else {}
    source = str(recipe_path) if recipe_path else "command line"

    classes = (*OWN_ARGUMENT_CLASSES, SFTConfig)
    types: dict[str, Any] = {}
    for cls in classes:
        for name, ann in _field_types(cls).items():
            types.setdefault(name, ann)

    # `env:` sets environment variables before anything is loaded (as TRL's parser does).
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise RecipeError(f"{source}: 'env' must be a mapping of variable names to values")
    for k, v in env.items():
        os.environ[str(k)] = str(v)

    unknown = [k for k in recipe if k not in types]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(types), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(f"{source}: unknown key '{key}'{hint}. Keys follow TRL's SFTConfig and mllm_tune.sft_config names")

    defaults = dict(SFT_DEFAULTS)
    defaults.update(device_defaults())
    defaults.update({k: _coerce(v, types[k], k, source) for k, v in recipe.items()})

    parser = HfArgumentParser(classes)
    for action in parser._actions:
        if action.dest in defaults:
            action.default = defaults[action.dest]
            action.required = False
    try:
        parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    except SystemExit as exc:  # argparse exits on bad values: keep the in-process API raising
        if exc.code in (0, None):  # --help
            raise
        raise RecipeError(f"bad command line {rest}: see the message above") from exc
    *objs, remaining = parsed
    if remaining:
        flag = next((r for r in remaining if r.startswith("-")), remaining[0])
        close = difflib.get_close_matches(flag.lstrip("-").split("=")[0], list(types), n=1)
        hint = f" (did you mean '--{close[0]}'?)" if close else ""
        raise RecipeError(f"unknown argument '{flag}'{hint}")
    model, data, vision, lora, training = objs
    given = {r[2:].split("=")[0] for r in rest if r.startswith("--")}
    apply_loader_defaults(training, set(recipe) | given)
    cfg = RunConfig(model, data, vision, lora, training, recipe_path, recipe)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    if not cfg.model.model_name_or_path:
        raise RecipeError("model_name_or_path is required (in the recipe or as --model_name_or_path)")
    if not cfg.data.dataset_name:
        raise RecipeError("dataset_name is required (in the recipe or as --dataset_name)")
    if not cfg.lora.use_peft and cfg.model.load_in_4bit:
        raise RecipeError("use_peft: false with load_in_4bit: a 4-bit model cannot be trained in full; "
                          "use LoRA (QLoRA) or load the model unquantised")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise RecipeError(f"eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.lora.lora_r <= 0:
        raise RecipeError(f"lora_r must be positive, got {cfg.lora.lora_r}")
    for name in ("image_min_pixels", "image_max_pixels"):
        v = getattr(cfg.vision, name)
        if v is not None and v <= 0:
            raise RecipeError(f"{name} must be positive, got {v}")
    lo, hi = cfg.vision.image_min_pixels, cfg.vision.image_max_pixels
    if lo is not None and hi is not None and lo > hi:
        raise RecipeError(f"image_min_pixels ({lo}) is larger than image_max_pixels ({hi})")


def known_keys() -> list[str]:
    from trl import SFTConfig

    out: list[str] = []
    for cls in (*OWN_ARGUMENT_CLASSES, SFTConfig):
        out += [f.name for f in fields(cls) if f.init and f.name not in out]
    return out


__all__ = [
    "DataArguments",
    "LoraArguments",
    "ModelArguments",
    "RecipeError",
    "RunConfig",
    "VisionArguments",
    "apply_loader_defaults",
    "available_cpus",
    "known_keys",
    "load_recipe",
    "loader_defaults",
    "parse_args",
]
