"""LoRA SFT of a Qwen-VL class MLLM on anchor-localization pairs (SPEC §4).

    accelerate launch mllm_tune/sft.py recipes/qwen_lora.yaml [--key value ...]
    python -m mllm_tune.sft --config recipes/tiny_lora.yaml --output_dir /tmp/run

Built on TRL's SFTTrainer (vision collator, assistant-only loss), PEFT and accelerate. The run:
parse the recipe -> load processor (pixel budget) and model -> LoRA on the language model only ->
load and check the pairs -> train (resuming from the last checkpoint of `output_dir` when there is
one) -> evaluate (loss + Yes/No accuracy) -> save adapter, processor, model card and metrics ->
optionally push to a model hub. In-process use: `main(argv) -> dict` of final metrics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # `accelerate launch mllm_tune/sft.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mllm_tune.sft_config import DataArguments, RecipeError, RunConfig, parse_args  # noqa: E402

logger = logging.getLogger("mllm_tune.sft")

REQUIRED_COLUMNS = ("messages", "images")
METRICS_FILE = "sft_metrics.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing or truncated files)."""


# -- data --------------------------------------------------------------------------------------


def _image_feature():
    import datasets

    return datasets.List(datasets.Image()) if hasattr(datasets, "List") else datasets.Sequence(datasets.Image())


def _read_any(name: str, config: str | None):
    """Dataset or DatasetDict from a save_to_disk folder, a jsonl/json/parquet file or a hub id."""
    import datasets

    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return datasets.load_from_disk(str(path)), path
        except (FileNotFoundError, ValueError) as exc:
            raise RecipeError(
                f"dataset_name {path} is a folder but not one written by datasets' save_to_disk ({exc}). "
                "Point dataset_name at the miner's output folder or at its pairs.jsonl"
            ) from exc
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower())
        if kind is None:
            raise RecipeError(f"dataset_name {path}: unsupported file type '{path.suffix}'; use .jsonl, .json or .parquet")
        return datasets.load_dataset(kind, data_files=str(path), split="train"), path.parent
    if name.startswith((".", "/", "~")) or name.endswith((".jsonl", ".json", ".parquet")) or (
            path.parent != Path(".") and path.parent.is_dir()):
        raise RecipeError(f"dataset_name {name} does not exist; point it at the miner's output folder "
                          "(python -m data_builders.anchor_pairs ... --out DIR) or at its pairs.jsonl")
    try:
        return datasets.load_dataset(name, config), None
    except Exception as exc:  # noqa: BLE001 - hub/network/format errors all mean the same to the user
        raise RecipeError(f"dataset_name {name} is no local file or folder, and loading it as a hub dataset "
                          f"failed ({type(exc).__name__}: {exc}). Fix the path, or name a reachable hub "
                          "dataset") from None


def _prepare_split(ds, where: str, base_dir: Path | None):
    """Keep `messages` + `images`, make image paths absolute, check the first row, cast images."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise RecipeError(
            f"{where}: column(s) {missing} missing (have {ds.column_names}); rows need 'messages' in TRL's vision "
            "conversational format and 'images' (a list of image paths), see docs/architecture.md 'Data contracts'"
        )
    if len(ds) == 0:
        raise RecipeError(f"{where}: no rows")
    ds = ds.remove_columns([c for c in ds.column_names if c not in REQUIRED_COLUMNS])
    first = ds[0]
    roles = [m.get("role") for m in first["messages"]]
    if "assistant" not in roles or "user" not in roles:
        raise RecipeError(f"{where}: row 0 'messages' needs a user and an assistant turn, has roles {roles}")
    imgs = first["images"]
    if not isinstance(imgs, list) or not imgs:
        raise RecipeError(f"{where}: row 0 'images' must be a non-empty list of image paths, got {imgs!r}")
    if isinstance(imgs[0], str):
        if base_dir is not None and any(not os.path.isabs(p) for p in imgs):
            # in memory: under DDP every rank runs this, and cache files next to the data would collide
            ds = ds.map(lambda r: {"images": [p if os.path.isabs(p) else str(base_dir / p) for p in r["images"]]},
                        keep_in_memory=True)
            imgs = ds[0]["images"]
        if not Path(imgs[0]).is_file():
            raise RecipeError(f"{where}: row 0 image {imgs[0]} does not exist")
    return ds.cast_column("images", _image_feature())


def load_pairs(data: DataArguments, seed: int = 42):
    """(train, eval or None, info) from the anchor-pair dataset named by `data.dataset_name`."""
    import datasets

    loaded, base = _read_any(data.dataset_name, data.dataset_config)
    where = str(data.dataset_name)
    if isinstance(loaded, (datasets.DatasetDict, dict)):
        if data.dataset_train_split not in loaded:
            raise RecipeError(
                f"{where}: split '{data.dataset_train_split}' not found (splits: {list(loaded)}); "
                "set dataset_train_split"
            )
        train = loaded[data.dataset_train_split]
        ev = loaded[data.dataset_test_split] if data.dataset_test_split in loaded else None
    elif "split" in loaded.column_names and data.dataset_train_split in set(loaded.unique("split")):
        # the miner's pairs.jsonl holds every row with a `split` column (eval = held-out identities)
        def pick(name):
            return loaded.filter(lambda s: s == name, input_columns="split", keep_in_memory=True)

        train = pick(data.dataset_train_split)
        ev = pick(data.dataset_test_split) if data.dataset_test_split in set(loaded.unique("split")) else None
    else:
        train, ev = loaded, None
    if ev is None and data.eval_fraction > 0 and len(train) >= 2:
        n_eval = max(1, round(len(train) * data.eval_fraction))
        parts = train.train_test_split(test_size=n_eval, seed=seed)
        train, ev = parts["train"], parts["test"]
    if data.max_train_samples:
        train = train.select(range(min(data.max_train_samples, len(train))))
    if ev is not None and data.max_eval_samples:
        ev = ev.select(range(min(data.max_eval_samples, len(ev))))
    info = {"dataset": where, "train_rows": len(train), "eval_rows": len(ev) if ev is not None else 0}
    if "label" in train.column_names:
        labels = train["label"]
        info["train_yes_fraction"] = round(sum(bool(x) for x in labels) / max(len(labels), 1), 4)
    train = _prepare_split(train, f"{where} [{data.dataset_train_split}]", base)
    if ev is not None:
        ev = _prepare_split(ev, f"{where} [eval]", base)
    return train, ev, info


# -- checkpoints -------------------------------------------------------------------------------


def _check_safetensors(path: Path) -> None:
    from mllm_tune.core.modeling import safetensors_problem

    problem = safetensors_problem(path)
    if problem:
        raise CheckpointError(problem)


def _check_torch_zip(path: Path) -> None:
    # torch.save writes a zip whose directory sits at the end: a cut file has none. Reading the
    # directory (not the data) keeps this cheap for large optimizer states.
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            end = max((i.header_offset + i.compress_size for i in zf.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from None
    if end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its members need {end}")


def check_checkpoint(ckpt: str | Path) -> Path:
    """Raise CheckpointError with the file and the fix unless `ckpt` is a complete Trainer checkpoint."""
    ckpt = Path(ckpt)
    fix = (f"Delete {ckpt} to resume from the previous checkpoint, or pass --resume_from_checkpoint "
           "with an earlier one")
    try:
        if not ckpt.is_dir():
            raise CheckpointError(f"checkpoint {ckpt} does not exist")
        state = ckpt / "trainer_state.json"
        if not state.is_file():
            raise CheckpointError(f"{state} is missing")
        try:
            json.loads(state.read_text())
        except ValueError:
            raise CheckpointError(f"{state} is truncated or not JSON") from None
        weights = sorted(ckpt.glob("*.safetensors"))
        if not weights and not any(ckpt.glob("global_step*")):
            raise CheckpointError(f"{ckpt} holds no adapter weights (adapter_model.safetensors)")
        for w in weights:
            _check_safetensors(w)
        for p in [*ckpt.glob("*.pt"), *ckpt.glob("*.pth"), *ckpt.glob("*.bin"), *ckpt.glob("global_step*/*.pt")]:
            _check_torch_zip(p)
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume: {exc}. {fix}") from None
    return ckpt


def find_resume_checkpoint(output_dir: str, resume: str | None) -> str | None:
    """The checkpoint to resume from: the one asked for, else the last one in `output_dir`."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is not None and str(resume).lower() not in ("true", "last", "false", "none", ""):
        return str(check_checkpoint(resume))
    if resume is not None and str(resume).lower() in ("false", "none"):
        return None
    if not os.path.isdir(output_dir):
        if resume is not None:
            raise CheckpointError(f"resume_from_checkpoint={resume} but {output_dir} does not exist")
        return None
    last = get_last_checkpoint(output_dir)
    if last is None:
        if resume is not None:
            raise CheckpointError(f"resume_from_checkpoint={resume} but {output_dir} holds no checkpoint-* folder")
        return None
    return str(check_checkpoint(last))


# -- chat template -----------------------------------------------------------------------------

# The stock templates TRL ships and recognises byte for byte (Qwen2-VL and Qwen2.5-VL share one).
STOCK_TEMPLATES = {"stock-qwen2-vl": "qwen2_5_vl.jinja", "stock-qwen2.5-vl": "qwen2_5_vl.jinja",
                   "stock-qwen3-vl": "qwen3_vl.jinja"}
_FAMILY_STOCK = {"qwen2_vl": "stock-qwen2-vl", "qwen2_5_vl": "stock-qwen2.5-vl", "qwen3_vl": "stock-qwen3-vl",
                 "qwen3_vl_moe": "stock-qwen3-vl"}


def _stock_template_text(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / STOCK_TEMPLATES[name]).read_text(encoding="utf-8")


def read_chat_template(option: str, source: str = "chat_template") -> str:
    """The template text named by the `chat_template` recipe option (a stock-* name or a .jinja path)."""
    if option in STOCK_TEMPLATES:
        return _stock_template_text(option)
    path = Path(option).expanduser()
    if not path.is_file():
        raise RecipeError(f"{source}: '{option}' is neither a stock template ({', '.join(STOCK_TEMPLATES)}) "
                          "nor an existing .jinja file")
    return path.read_text(encoding="utf-8")


def _family_of(model_path: str, revision: str, trust_remote_code: bool) -> str | None:
    from transformers import AutoConfig

    try:  # config.json only: no weights
        return AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None


def check_chat_template(processor: Any, cfg: RunConfig) -> None:
    """Apply the recipe's `chat_template` and make sure TRL can train on the result, before any
    weight is loaded. TRL's assistant-only loss needs `{% generation %}` markers; it adds them by
    swapping in its training copy of a template it knows byte for byte, and raises a bare
    ValueError for anything else (an edited or fine-tuned checkpoint's template, a Thinking variant)."""
    from trl.chat_template_utils import get_training_chat_template

    source = str(cfg.recipe_path) if cfg.recipe_path else "command line"
    if cfg.model.chat_template:
        processor.chat_template = read_chat_template(cfg.model.chat_template, f"{source}: chat_template")
    if not cfg.training.assistant_only_loss or cfg.training.chat_template_path:
        return  # no markers needed / TRL sets the template itself (errors caught in build_trainer)
    try:
        get_training_chat_template(processor)
    except ValueError as exc:
        model = cfg.model.model_name_or_path
        family = _family_of(model, cfg.model.model_revision, cfg.training.trust_remote_code)
        stock = _FAMILY_STOCK.get(family or "")
        why = "it has no {% generation %} markers and is not a stock template TRL knows"
        if stock:
            ours, ref = str(processor.chat_template or ""), _stock_template_text(stock)
            at = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
            why += f" (it differs from the stock {family} template from character {at} of {len(ref)})"
        fix = (f"set `chat_template: {stock}` in the recipe (or --chat_template {stock}) to train and save the adapter "
               "with the family's stock template" if stock else
               f"set `chat_template` to one of {', '.join(STOCK_TEMPLATES)}")
        raise RecipeError(
            f"{source}: model {model}: its chat template cannot be made training-compatible for "
            f"assistant_only_loss: {why}. A fine-tuned or 'Thinking' checkpoint often ships its own template. Fix: "
            f"{fix}, or point chat_template at a .jinja file with {{% generation %}} markers, or set "
            f"assistant_only_loss: false (loss on the whole sequence). TRL said: {exc}"
        ) from None


# -- trainer -----------------------------------------------------------------------------------


class OneThreadCollator:
    """The trainer's collator run with one torch thread (then the caller's count again).

    Its tensor work (uint8 -> float, rescale, normalize, patchify of a few small images) is far too
    small to split across threads: on a loaded 2-core CPU the vision collator at the 50,176-pixel
    budget took 443 ms per batch of 4 with 2 threads and 103 ms with one (bench/RESULTS.md, "SFT input
    pipeline"). Dataloader workers already run with one thread (torch sets it); this makes the
    in-process collator of 0-worker (CPU) runs do the same. Element-wise work does not depend on
    the thread count: the batches are identical (tests/test_sft_input_pipeline.py)."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, examples):
        import torch

        threads = torch.get_num_threads()
        if threads == 1:
            return self.collator(examples)
        torch.set_num_threads(1)
        try:
            return self.collator(examples)
        finally:
            torch.set_num_threads(threads)

    def __getattr__(self, name: str):  # processor, assistant_only_loss, ... of the wrapped collator
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def make_trainer_class():
    from trl import SFTTrainer

    from mllm_tune.yesno_eval import YesNoEvalMixin

    class PairSFTTrainer(YesNoEvalMixin, SFTTrainer):
        """SFTTrainer + Yes/No accuracy in the eval metrics."""

    return PairSFTTrainer


# vLLM loads LoRA adapters whose modules_to_save is None or only these (STACK.md); anything else
# (e.g. lm_head) kills its engine at load time.
VLLM_MODULES_TO_SAVE = ("classifier", "score")


def vllm_servable_warning(cfg: RunConfig) -> str | None:
    """The start-of-run warning for a recipe whose adapter vLLM will refuse, or None."""
    if not cfg.lora.use_peft:
        return None
    extra = [m for m in (cfg.lora.lora_modules_to_save or []) if m not in VLLM_MODULES_TO_SAVE]
    if not cfg.vision.freeze_vision_tower:
        extra.append("the vision tower (freeze_vision_tower: false)")
    if not extra:
        return None
    where = str(cfg.recipe_path) if cfg.recipe_path else "command line"
    return (f"{where}: lora_modules_to_save / freeze_vision_tower save {extra} with the adapter: vLLM will refuse "
            "to load it (it accepts modules_to_save None, classifier or score only). Serve it with --mllm hf, or "
            "merge it first (python -m mllm_tune.merge), or drop lora_modules_to_save for a vLLM-servable adapter")


def build_trainer(cfg: RunConfig, callbacks: Sequence[Any] | None = None):
    """Processor, model, LoRA config, data and the trainer, ready to train."""
    from mllm_tune.core import modeling

    t = cfg.training
    warning = vllm_servable_warning(cfg)
    if warning:
        logger.warning("%s", warning)
    processor = modeling.load_processor(
        cfg.model.model_name_or_path, cfg.model.model_revision, cfg.vision.image_min_pixels,
        cfg.vision.image_max_pixels, trust_remote_code=t.trust_remote_code,
    )
    check_chat_template(processor, cfg)
    train_ds, eval_ds, info = load_pairs(cfg.data, seed=t.seed)
    if eval_ds is None and t.eval_strategy != "no":
        logger.info("no eval split: evaluation is off")
        t.eval_strategy = "no"
    dtype = modeling.resolve_dtype(cfg.model.dtype, t.use_cpu, t.bf16)
    quant = modeling.quantization_config(cfg.model.load_in_4bit, cfg.model.bnb_4bit_quant_type,
                                         cfg.model.use_bnb_nested_quant)
    model = modeling.load_model(cfg.model.model_name_or_path, dtype, cfg.model.model_revision,
                                cfg.model.attn_implementation, quant, t.trust_remote_code)
    if cfg.vision.freeze_vision_tower:
        # transformers hooks the vision tower's patch embedding too: the frozen tower would be
        # back-propagated under gradient checkpointing for nothing (issue 11, item 5)
        modeling.keep_frozen_vision_out_of_backward(model)
    if cfg.lora.use_peft:
        peft_config = modeling.build_lora_config(
            model, r=cfg.lora.lora_r, alpha=cfg.lora.lora_alpha, dropout=cfg.lora.lora_dropout,
            target_modules=cfg.lora.lora_target_modules, freeze_vision_tower=cfg.vision.freeze_vision_tower,
            modules_to_save=cfg.lora.lora_modules_to_save, use_rslora=cfg.lora.use_rslora, use_dora=cfg.lora.use_dora,
        )
    else:  # full training (e.g. pre-training SynthPEDES-VL); the vision tower only if asked
        peft_config = None
        if cfg.vision.freeze_vision_tower:
            for name, param in model.named_parameters():
                if modeling.is_vision_module(name):
                    param.requires_grad_(False)
    if t.dataloader_num_workers > 0:
        # the collator's tokenizer runs in forked workers: without this each fork warns, and
        # its thread pool would compete with the other workers (sft_config.loader_defaults)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logger.info("data loading: %d worker(s), pinned memory %s, persistent workers %s", t.dataloader_num_workers,
                t.dataloader_pin_memory, t.dataloader_persistent_workers)
    cls = make_trainer_class()
    try:
        trainer = cls(
            model=model, args=t, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=processor,
            peft_config=peft_config, callbacks=list(callbacks or []),
        )
    except ValueError as exc:
        if "training-compatible" not in str(exc):
            raise
        raise RecipeError(  # e.g. a chat_template_path TRL cannot patch
            f"model {cfg.model.model_name_or_path}: TRL refuses the chat template for assistant_only_loss ({exc}). "
            f"Fix: set `chat_template` to one of {', '.join(STOCK_TEMPLATES)} or to a .jinja file with "
            "{% generation %} markers, or set assistant_only_loss: false"
        ) from None
    trainer.yesno_enabled = cfg.data.yesno_eval
    trainer.data_collator = OneThreadCollator(trainer.data_collator)
    return trainer, info


def _print_table(metrics: dict) -> None:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in sorted(metrics.items())]
    w = max((len(k) for k, _ in rows), default=10)
    print("\n".join([f"{'metric':<{w}} | value", f"{'-' * w}-|------"] + [f"{k:<{w}} | {v}" for k, v in rows]))


def main(argv: Sequence[str] | None = None, callbacks: Sequence[Any] | None = None) -> dict:
    """Run one SFT job; returns the final metrics (train + eval), also written to sft_metrics.json."""
    cfg = parse_args(list(argv) if argv is not None else None)
    t = cfg.training
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    want_push, t.push_to_hub = t.push_to_hub, False  # pushed once at the end, with our model card

    resume = find_resume_checkpoint(t.output_dir, t.resume_from_checkpoint)
    if resume:
        logger.info("resuming from %s", resume)
    trainer, info = build_trainer(cfg, callbacks)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics: dict[str, Any] = dict(result.metrics)
    metrics["global_step"] = trainer.state.global_step
    if trainer.eval_dataset is not None:
        # reuse an evaluation made at the final step (same on every rank, so no rank waits alone)
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        if last is not None and last.get("step") == trainer.state.global_step:
            metrics.update({k: v for k, v in last.items() if k.startswith("eval_")})
        else:
            metrics.update(trainer.evaluate())

    trainer.save_model(t.output_dir)  # adapter (gathered from all ranks under ZeRO-3)
    if trainer.accelerator.is_main_process:
        from mllm_tune.model_card import write_model_card

        out = Path(t.output_dir)
        trainer.processing_class.save_pretrained(out)
        record = {"metrics": metrics, "data": info, "resumed_from": resume,
                  "world_size": trainer.accelerator.num_processes,
                  "log_history": trainer.state.log_history}
        (out / METRICS_FILE).write_text(json.dumps(record, indent=2, default=str))
        write_model_card(out, cfg, metrics, info)
        _print_table({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        if want_push:
            from mllm_tune.push import push_adapter

            repo = t.hub_model_id or out.name
            url = push_adapter(out, repo, token=t.hub_token, private=bool(t.hub_private_repo))
            metrics["hub_url"] = url
    trainer.accelerator.wait_for_everyone()
    _finish_distributed()
    return metrics


def _finish_distributed() -> None:
    # Two-process DeepSpeed runs on CPU sometimes abort at exit otherwise (STACK.md).
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: bad input is one `error: ...` line on stderr and exit code 2, no traceback."""
    from mllm_tune.core.modeling import ModelSetupError

    try:
        main(argv)
    except (RecipeError, CheckpointError, ModelSetupError) as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, even for multi-line causes
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
