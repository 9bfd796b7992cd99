"""LoRA SFT throughput: `mllm_tune.sft` vs a plain TRL `SFTTrainer` script, and where time goes.

Both train the same tiny Qwen2-VL (from `synthpedes.tiny`) on the same SynthPEDES anchor pairs with
the same LoRA setting (r 8, alpha 16, language model only, lm_head trained as in tiny_lora.yaml), batch, steps, seed, fp32 on the CPU,
in this process, alternating, medians reported. Reported: samples/s of each (Trainer's
`train_samples_per_second`) and their ratio; then, on the trainer sft.py builds, the time per
batch of the vision collator (chat template + image processing + label masking) against the
forward+backward pass.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from bench import md_table

logger = logging.getLogger(__name__)

FULL = {"steps": 16, "batch": 4, "pairs": 48, "ids": 24, "timed_batches": 8, "reps": 3}
SMOKE = {"steps": 2, "batch": 1, "pairs": 4, "ids": 6, "timed_batches": 1, "reps": 1}


def _setup(work: Path, o: dict) -> tuple[Path, Path]:
    import sys

    from synthpedes.dataset import generate
    from synthpedes.tiny import build_tiny

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sft_fixtures import write_pairs  # the same pair format the tests and the miner use

    synth = work / "synth"
    generate(synth, num_ids=o["ids"], seed=0, progress=False)
    model = build_tiny("qwen2_vl", work / "tiny_qwen2_vl")
    data = write_pairs(synth, work / "pairs", n_train=o["pairs"], n_eval=2)
    return model, data


def _step_timer():
    """Time between consecutive optimizer steps (on_step_end -> on_step_end: data loading,
    collation, forward, backward, optimizer), for a median that ignores the occasional stall of a
    shared CPU."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def median(self) -> float:
            gaps = sorted(b - a for a, b in zip(self.ends, self.ends[1:])) or [float("nan")]
            return gaps[len(gaps) // 2]

    return StepTimer()


def _with_median(metrics: dict, timer, batch: int) -> dict:
    metrics = dict(metrics)
    metrics["median_step_s"] = timer.median()
    metrics["median_samples_per_second"] = batch / timer.median()
    return metrics


def _plain_trl(model: Path, data: Path, out: Path, o: dict) -> dict:
    """What a user would write with TRL alone (no mllm_tune code)."""
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    ds = datasets.load_from_disk(str(data))["train"].select_columns(["messages", "images"])
    ds = ds.cast_column("images", datasets.List(datasets.Image()))
    args = SFTConfig(output_dir=str(out), max_steps=o["steps"], per_device_train_batch_size=o["batch"],
                     learning_rate=1e-3, use_cpu=True, bf16=False, assistant_only_loss=True, max_length=None,
                     gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=o["steps"],
                     seed=0, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0)
    peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                      exclude_modules=r".*visual.*", modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    timer = _step_timer()  # measurement only; not part of the "plain" recipe
    trainer = SFTTrainer(model=str(model), args=args, train_dataset=ds, peft_config=peft, callbacks=[timer])
    return _with_median(trainer.train().metrics, timer, o["batch"])


def _sft_argv(model: Path, data: Path, out: Path, o: dict) -> list[str]:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_lora.yaml"
    over = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "max_steps": o["steps"],
            "per_device_train_batch_size": o["batch"], "learning_rate": 1e-3, "save_strategy": "no",
            "eval_strategy": "no", "eval_fraction": 0, "dataset_test_split": "none", "logging_steps": o["steps"], "lora_dropout": 0.0,
            "image_min_pixels": 6272, "image_max_pixels": 6272}
    argv = [str(recipe)]
    for k, v in over.items():
        argv += [f"--{k}", str(v)]
    return argv


def _breakdown(model: Path, data: Path, out: Path, o: dict) -> dict:
    """ms per batch: collation vs forward+backward, on the trainer sft.py builds."""
    import torch

    from mllm_tune.sft import build_trainer
    from mllm_tune.sft_config import parse_args

    cfg = parse_args(_sft_argv(model, data, out, o))
    trainer, _ = build_trainer(cfg)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    b, n = o["batch"], o["timed_batches"]
    groups = [rows[(i * b) % len(rows):(i * b) % len(rows) + b] or rows[:b] for i in range(n + 1)]
    collate, fb = [], []
    model_ = trainer.model
    model_.train()
    for i, g in enumerate(groups):
        t0 = time.perf_counter()
        batch = trainer.data_collator([dict(r) for r in g])
        t1 = time.perf_counter()
        loss = trainer.compute_loss(model_, batch)
        loss.backward()
        model_.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:  # first batch warms up
            collate.append(t1 - t0)
            fb.append(t2 - t1)
    if not collate:
        collate, fb = [t1 - t0], [t2 - t1]
    c, f = 1000 * sum(collate) / len(collate), 1000 * sum(fb) / len(fb)
    tokens = int(batch["input_ids"].numel())
    return {"collate_ms": c, "fwd_bwd_ms": f, "collate_share": c / (c + f), "tokens_per_batch": tokens}


def run(smoke: bool = False) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    from mllm_tune import sft

    o = SMOKE if smoke else FULL
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = _setup(work, o)
        # alternating runs, medians: the CPU is shared and its load drifts over minutes
        plains, ourss = [], []
        order = ["plain", "ours"] * o["reps"]
        for i, which in enumerate(order):
            if which == "plain":
                plains.append(_plain_trl(model, data, work / f"plain{i}", o))
            else:
                timer = _step_timer()
                m = sft.main(_sft_argv(model, data, work / f"ours{i}", o), callbacks=[timer])
                ourss.append(_with_median(m, timer, o["batch"]))
        plain = sorted(plains, key=lambda m: m["train_samples_per_second"])[len(plains) // 2]
        ours = sorted(ourss, key=lambda m: m["train_samples_per_second"])[len(ourss) // 2]
        split = _breakdown(model, data, work / "bd", o)

    p, s = plain["train_samples_per_second"], ours["train_samples_per_second"]
    pm = sorted(m["median_samples_per_second"] for m in plains)[len(plains) // 2]
    sm = sorted(m["median_samples_per_second"] for m in ourss)[len(ourss) // 2]
    figures = {
        "plain_trl_samples_per_s": p,
        "sft_py_samples_per_s": s,
        "ratio_sft_over_plain": s / p if p else float("nan"),
        "plain_trl_median_step_samples_per_s": pm,
        "sft_py_median_step_samples_per_s": sm,
        "ratio_median_step": sm / pm if pm else float("nan"),
        "plain_train_loss": plain.get("train_loss"),
        "sft_train_loss": ours.get("train_loss"),
        **split,
        "steps": o["steps"],
        "batch": o["batch"],
        "runs_each": len(plains),
        "all_plain_samples_per_s": [m["train_samples_per_second"] for m in plains],
        "all_sft_samples_per_s": [m["train_samples_per_second"] for m in ourss],
    }
    table1 = md_table(["trainer", "samples/s (train_runtime, median run)", "samples/s (median step-to-step)", "train loss"], [
        ["plain TRL SFTTrainer", p, pm, plain.get("train_loss")],
        ["mllm_tune.sft", s, sm, ours.get("train_loss")],
        ["ratio sft / plain", s / p if p else float("nan"), sm / pm if pm else float("nan"), ""],
    ])
    table2 = md_table(["per batch", "ms", "share"], [
        ["vision collator (template, images, labels)", split["collate_ms"], split["collate_share"]],
        ["forward + backward", split["fwd_bwd_ms"], 1 - split["collate_share"]],
    ])
    md = (
        f"Tiny Qwen2-VL, {o['pairs']} SynthPEDES pairs, {o['steps']} steps x batch {o['batch']}, fp32 CPU, "
        "LoRA r 8 on the language model, same seed, "
        f"in one process, alternating plain/sft {len(plains)} times (medians).\n\n"
        f"{table1}\n\n{table2}\n\n"
        f"Tokens per batch: {split['tokens_per_batch']}. Per run samples/s (train_runtime): plain "
        f"{[round(m['train_samples_per_second'], 2) for m in plains]}, sft.py "
        f"{[round(m['train_samples_per_second'], 2) for m in ourss]}; on a shared CPU single runs vary a lot, "
        "the median step time is the steadier figure. Equal train losses show both runs did the same work."
    )
    return {"title": "LoRA SFT throughput: sft.py vs plain TRL", "markdown": md, "figures": figures}


if __name__ == "__main__":
    import json
    import sys

    res = run(smoke="--smoke" in sys.argv)
    print(res["markdown"])
    print(json.dumps(res["figures"], indent=2))
