"""LoRA SFT throughput: `mllm_tune.sft` vs a plain TRL `SFTTrainer` script, and where time goes.

Both train the same tiny Qwen2-VL (from `synthpedes.tiny`) on the same SynthPEDES anchor pairs with
the same LoRA setting (r 8, alpha 16, language model only, no modules_to_save, as in tiny_lora.yaml), batch, steps, seed, fp32 on the CPU,
in this process, alternating, medians reported. Reported: samples/s of each (Trainer's
`train_samples_per_second`) and their ratio; then, on the trainer sft.py builds, the time per
batch of the vision collator (chat template + image processing + label masking) against the
forward+backward pass. Last, the cost of back-propagating the frozen vision tower (issue 11, item 5):
the forward+backward time of one batch on a Qwen2-VL-2B-shaped model (real widths and vocabulary,
2 text layers, random weights, 224x224 images) with transformers' stock input-gradient hooks
against `modeling.keep_frozen_vision_out_of_backward`, alternating on the same model and batch.
Then the SFT input pipeline (issue 16, item 3): row read + image decode, the vision collator and its
image processor per batch at the 50,176-pixel budget against forward+backward of that 2B-shaped
model, and how long the training loop waits for a batch with 0 dataloader workers vs sft.py's CUDA
default while an accelerator step (simulated by a sleep) runs. `--pipeline-only` runs just that.
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

# Qwen2-VL-2B-Instruct's config (text: hidden 1536, 12 heads, 2 kv heads, intermediate 8960, vocab
# 151936, mrope [16, 24, 24]; vision: embed_dim 1280, 16 heads, mlp_ratio 4, 32 blocks, 14-px
# patches), with 2 text layers so the vision tower's share is as in a real step of a bigger
# language model at most; `vision_depth` below 32 keeps a CPU run within minutes.
QWEN2_VL_2B = {"hidden_size": 1536, "intermediate_size": 8960, "num_attention_heads": 12, "num_key_value_heads": 2,
               "vocab_size": 151936, "mrope_section": [16, 24, 24], "vision_embed_dim": 1280, "vision_heads": 16,
               "vision_mlp_ratio": 4, "vision_depth": 32}
VISION_FULL = {"text_layers": 2, "vision_depth": 8, "batch": 1, "pixels": 50176, "reps": 4}
VISION_SMOKE = {"text_layers": 1, "vision_depth": 1, "batch": 1, "pixels": 3136, "reps": 1,
                "shape": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                          "vocab_size": 2048, "mrope_section": [2, 3, 3], "vision_embed_dim": 32, "vision_heads": 2,
                          "vision_mlp_ratio": 2}}


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
                      exclude_modules=r".*visual.*", task_type="CAUSAL_LM")
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


def _qwen2_vl_2b_shaped(tok, o: dict):
    """A Qwen2-VL model with 2B widths and vocabulary, `o` text layers / vision blocks, random weights."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLConfig

    shape = {**QWEN2_VL_2B, **o.get("shape", {})}
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    text = {"vocab_size": shape["vocab_size"], "hidden_size": shape["hidden_size"],
            "intermediate_size": shape["intermediate_size"], "num_hidden_layers": o["text_layers"],
            "num_attention_heads": shape["num_attention_heads"], "num_key_value_heads": shape["num_key_value_heads"],
            "max_position_embeddings": 32768, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": shape["mrope_section"]},
            "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"depth": o["vision_depth"], "embed_dim": shape["vision_embed_dim"], "hidden_size": shape["hidden_size"],
              "num_heads": shape["vision_heads"], "mlp_ratio": shape["vision_mlp_ratio"], "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config)


def _requires_grad(out) -> bool:
    """Whether any tensor of a module output (tensor, ModelOutput, tuple) is in the autograd graph."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.requires_grad
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return any(_requires_grad(v) for v in values)


def _vision_backward(work: Path, o: dict) -> dict:
    """Forward+backward time of one LoRA batch with the stock input-gradient hooks (the frozen
    vision tower is back-propagated) and with keep_frozen_vision_out_of_backward, alternating
    A B B A ... on the same model and batch, gradient checkpointing on as in the real recipes."""
    import numpy as np
    import torch
    from peft import get_peft_model
    from PIL import Image

    from bench import _proc_status, _reset_peak
    from mllm_tune.core import modeling
    from mllm_tune.core.prompts import DEFAULT_PROMPTS
    from synthpedes.tiny import build_tiny

    # the processor of a tiny model (our tokenizer, Qwen2-VL's image processor) at the training budget
    proc_dir = build_tiny("qwen2_vl", work / "proc_2b", image_pixels=o["pixels"])
    processor = modeling.load_processor(str(proc_dir), min_pixels=o["pixels"], max_pixels=o["pixels"])
    model = _qwen2_vl_2b_shaped(processor.tokenizer, o)
    modeling.keep_frozen_vision_out_of_backward(model)
    inner = model
    model = get_peft_model(model, modeling.build_lora_config(model, dropout=0.0), autocast_adapter_dtype=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    side = int(o["pixels"] ** 0.5)
    rng = np.random.default_rng(0)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPTS.render_loc(
        "A woman in a red coat and black trousers, carrying a white bag.")}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(o["batch"])]
    batch = dict(processor(text=[text] * o["batch"], images=images, return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()
    visual = next(m for n, m in model.named_modules() if n.endswith(".visual"))
    seen: list[bool] = []
    visual.register_forward_hook(lambda m, i, out: seen.append(_requires_grad(out)))

    def use(fixed: bool) -> None:
        inner.disable_input_require_grads()
        if fixed:
            inner.enable_input_require_grads()  # ours: language-model embeddings only
        else:
            type(inner).enable_input_require_grads(inner)  # transformers' own: patch_embed too

    def step(fixed: bool) -> dict:
        use(fixed)
        seen.clear()
        base = _proc_status().get("VmRSS", 0)
        _reset_peak()
        # CPU time of this process (all its threads) next to wall time: on a CPU shared with other
        # jobs the wall time swings with their load, the CPU time much less
        c0, t0 = time.process_time(), time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2, c2 = time.perf_counter(), time.process_time()
        peak = _proc_status().get("VmHWM", 0) - base
        model.zero_grad(set_to_none=True)
        return {"wall": t2 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "cpu": c2 - c0, "peak": peak,
                "loss": round(float(loss.detach()), 5), "grad": any(seen)}

    step(False), step(True)  # warm-up
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for r in range(o["reps"]):
        for fixed in ((False, True) if r % 2 == 0 else (True, False)):  # A B B A: load drift cancels
            runs[fixed].append(step(fixed))

    def med(fixed: bool, key: str) -> float:
        xs = sorted(x[key] for x in runs[fixed])
        return xs[len(xs) // 2]

    tokens = int(batch["input_ids"].numel())
    out = {f"vision_{mode}_{key}": med(fixed, key) for mode, fixed in (("stock", False), ("fixed", True))
           for key in ("wall", "fwd", "bwd", "cpu")}
    return {**out, "vision_ratio_wall": out["vision_stock_wall"] / out["vision_fixed_wall"],
            "vision_ratio_cpu": out["vision_stock_cpu"] / out["vision_fixed_cpu"],
            "vision_stock_peak_mb": med(False, "peak") / 2**20, "vision_fixed_peak_mb": med(True, "peak") / 2**20,
            "vision_same_loss": {x["loss"] for x in runs[False]} == {x["loss"] for x in runs[True]},
            "vision_out_requires_grad_stock": all(x["grad"] for x in runs[False]),
            "vision_out_requires_grad_fixed": any(x["grad"] for x in runs[True]),
            "vision_all_stock_wall": [x["wall"] for x in runs[False]],
            "vision_all_fixed_wall": [x["wall"] for x in runs[True]], "vision_tokens_per_batch": tokens,
            "vision_patches_per_image": int(batch["image_grid_thw"][0].prod()), "vision_setup": {
                **{k: v for k, v in o.items() if k != "shape"}, "widths": "tiny (smoke)" if "shape" in o else "Qwen2-VL-2B"}}


# SFT input pipeline (issue 16, item 3): the vision collator on the paper's 50,176-pixel budget,
# batch 4, against forward+backward of the Qwen2-VL-2B-shaped model (2 text layers, 8 of 32 vision
# blocks as above), and the main process's wait for a batch with and without dataloader workers
# while an accelerator step (simulated: the main process sleeps, leaving the CPU to the workers) runs.
PIPE_FULL = {"text_layers": 2, "vision_depth": 8, "batch": 4, "pixels": 50176, "pairs": 48, "ids": 24,
             "batches": 8, "reps": 2, "step_ms": (0, 100, 250), "loader_batches": 10}
PIPE_SMOKE = {"text_layers": 1, "vision_depth": 1, "batch": 1, "pixels": 3136, "pairs": 4, "ids": 6,
              "batches": 1, "reps": 1, "step_ms": (0,), "loader_batches": 2, "shape": VISION_SMOKE["shape"]}


def _mean_ms(xs: list[float]) -> float:
    return 1000 * sum(xs) / max(len(xs), 1)


def _loader_wait(trainer, workers: int, step_s: float, n: int, collator=None) -> dict:
    """ms per batch the training loop waits for its next batch from the dataloader sft.py's trainer
    builds, when each step takes `step_s` seconds of accelerator time (a sleep here: the CPU stays
    free for the workers, as it does while a GPU computes). The first batch (worker start-up) is
    not counted."""
    a = trainer.args
    a.dataloader_num_workers, a.dataloader_persistent_workers = workers, workers > 0
    a.dataloader_pin_memory = False  # nothing to pin for without a CUDA device
    ours = trainer.data_collator
    trainer.data_collator = collator or ours
    try:
        loader = trainer.get_train_dataloader()
    finally:
        trainer.data_collator = ours
    it = iter(loader)
    next(it)
    waits = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)
    del it, loader
    return {"wait_ms": _mean_ms(waits), "all_wait_ms": [round(1000 * w, 1) for w in waits]}


def _input_pipeline(work: Path, o: dict) -> dict:
    """Collator ms per batch and its share of a step for the Qwen2-VL-2B-shaped model, then the
    main process's wait per batch with 0 workers (before) and sft.py's CUDA default (after)."""
    import torch
    from peft import get_peft_model

    from mllm_tune.core import modeling
    from mllm_tune.sft import build_trainer
    from mllm_tune.sft_config import available_cpus, loader_defaults, parse_args
    from synthpedes.dataset import generate
    from synthpedes.tiny import build_tiny

    sys_path_tests()
    from sft_fixtures import write_pairs

    generate(work / "synth", num_ids=o["ids"], seed=0, progress=False)
    # a tiny checkpoint only for its processor (our tokenizer, Qwen2-VL's image processor) at the budget
    tiny = build_tiny("qwen2_vl", work / "proc_pipe", image_pixels=o["pixels"])
    data = write_pairs(work / "synth", work / "pairs_pipe", n_train=o["pairs"], n_eval=2)
    argv = _sft_argv(tiny, data, work / "pipe", {"steps": 1, "batch": o["batch"]})
    argv += ["--image_min_pixels", str(o["pixels"]), "--image_max_pixels", str(o["pixels"]),
             "--dataloader_num_workers", "0"]
    trainer, _ = build_trainer(parse_args(argv))
    ds, collate, proc = trainer.train_dataset, trainer.data_collator, trainer.processing_class
    raw = getattr(collate, "collator", collate)  # TRL's collator as the trainer calls it without sft.py's wrapper
    b = o["batch"]
    groups = [[(k * b + j) % len(ds) for j in range(b)] for k in range(o["batches"] + 1)]

    def once(threads: int | None, fn, g: list[int]) -> tuple[float, float, float, dict]:
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            rows = [ds[i] for i in g]  # row read + PNG decode (datasets.Image)
            t1 = time.perf_counter()
            batch = fn([dict(r) for r in rows])  # chat template, tokenizer, image processor, labels
            t2 = time.perf_counter()
            proc.image_processor(images=[im for r in rows for im in r["images"]], return_tensors="pt")
            t3 = time.perf_counter()  # resize + rescale + normalize + patchify alone
        finally:
            torch.set_num_threads(before)
        return t1 - t0, t2 - t1, t3 - t2, batch

    # before: TRL's collator with torch's default thread count; with 1 thread (what a dataloader
    # worker runs with: torch sets it in workers); after: sft.py's OneThreadCollator in the main
    # process. Rotated batch by batch so that the shared machine's load drift spreads over all three.
    variants = {"serial": (None, raw), "one": (1, raw), "ours": (None, collate)}
    names = list(variants)
    acc = {v: ([], [], []) for v in names}
    last: dict[str, dict] = {}
    for k, g in enumerate(groups):
        for v in names[k % 3:] + names[:k % 3]:
            *times, last[v] = once(*variants[v], g)
            if k or len(groups) == 1:  # the first batch warms up
                for xs, x in zip(acc[v], times):
                    xs.append(x)
    serial, one, ours = ({"fetch_ms": _mean_ms(acc[v][0]), "collate_ms": _mean_ms(acc[v][1]),
                          "image_proc_ms": _mean_ms(acc[v][2])} for v in names)
    batch, b1, b2 = last["serial"], last["one"], last["ours"]
    same = set(batch) == set(b1) == set(b2) and all(torch.equal(batch[k], b1[k]) and torch.equal(batch[k], b2[k])
                                                   for k in batch)
    resize = _resize_ms(proc, [ds[i] for i in groups[0]], o)

    # forward + backward of that batch on the 2B-shaped model, LoRA, frozen vision out of the backward
    model = _qwen2_vl_2b_shaped(proc.tokenizer, o)
    modeling.keep_frozen_vision_out_of_backward(model)
    model = get_peft_model(model, modeling.build_lora_config(model, dropout=0.0), autocast_adapter_dtype=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    walls, cpus = [], []
    for _ in range(o["reps"]):
        c0, t0 = time.process_time(), time.perf_counter()
        model(**batch).loss.backward()
        walls.append(time.perf_counter() - t0), cpus.append(time.process_time() - c0)
        model.zero_grad(set_to_none=True)
    del model
    fb = 1000 * sorted(walls)[len(walls) // 2]
    data_ms = serial["fetch_ms"] + serial["collate_ms"]

    cuda_workers = loader_defaults(True, available_cpus())["dataloader_num_workers"]
    loader = {}
    for step_ms in o["step_ms"]:
        for key, workers, fn in (("trl", 0, raw), ("0w", 0, None), (f"{cuda_workers}w", cuda_workers, None)):
            r = _loader_wait(trainer, workers, step_ms / 1000, o["loader_batches"], fn)
            loader[f"{step_ms}ms_{key}"] = {**r, "share": r["wait_ms"] / (r["wait_ms"] + step_ms) if r["wait_ms"] + step_ms else 0.0}
    return {"pipe_fetch_ms": serial["fetch_ms"], "pipe_collate_ms": serial["collate_ms"],
            "pipe_image_proc_ms": serial["image_proc_ms"], "pipe_resize_ms": resize,
            "pipe_fetch_ms_1thread": one["fetch_ms"], "pipe_collate_ms_1thread": one["collate_ms"],
            "pipe_image_proc_ms_1thread": one["image_proc_ms"], "pipe_collate_ms_sft": ours["collate_ms"],
            "pipe_collate_share_sft": ours["collate_ms"] / (ours["fetch_ms"] + ours["collate_ms"] + fb),
            "pipe_same_batch_1thread": same,
            "pipe_fwd_bwd_ms": fb, "pipe_all_fwd_bwd_s": [round(w, 2) for w in walls],
            "pipe_all_fwd_bwd_cpu_s": [round(c, 2) for c in cpus],
            "pipe_collate_share": serial["collate_ms"] / (data_ms + fb), "pipe_data_share": data_ms / (data_ms + fb),
            "pipe_tokens_per_batch": int(batch["input_ids"].numel()),
            "pipe_visual_tokens_per_image": int(batch["image_grid_thw"][0].prod()) // 4,
            "pipe_cuda_default_workers_here": cuda_workers, "pipe_loader": loader, "pipe_cpus": available_cpus(),
            "pipe_setup": {**{k: v for k, v in o.items() if k != "shape"},
                           "widths": "tiny (smoke)" if "shape" in o else "Qwen2-VL-2B"}}


def _resize_ms(proc, rows: list, o: dict) -> float:
    """ms per batch of the resize alone (PIL image -> tensor -> resized tensor, as the processor does)."""
    from torchvision.transforms.v2 import functional as F
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = proc.image_processor
    images = [im for r in rows for im in r["images"]]
    t0 = time.perf_counter()
    for _ in range(o["batches"]):
        for im in images:
            x = F.pil_to_tensor(im.convert("RGB"))
            h, w = smart_resize(x.shape[1], x.shape[2], factor=ip.patch_size * ip.merge_size,
                                min_pixels=o["pixels"], max_pixels=o["pixels"])
            F.resize(x, [h, w], interpolation=F.InterpolationMode.BICUBIC, antialias=True)
    return 1000 * (time.perf_counter() - t0) / o["batches"]


def sys_path_tests() -> None:
    import sys

    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


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
        vis = _vision_backward(work, VISION_SMOKE if smoke else VISION_FULL)
        pipe = _input_pipeline(work, PIPE_SMOKE if smoke else PIPE_FULL)

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
        **vis,
        **pipe,
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
        f"\n\n{_vision_markdown(vis)}\n\nSFT input pipeline (issue 16, item 3): {_pipeline_markdown(pipe)}"
    )
    return {"title": "LoRA SFT throughput: sft.py vs plain TRL", "markdown": md, "figures": figures}


def _pipeline_markdown(p: dict) -> str:
    o = p["pipe_setup"]
    t1 = md_table(["per batch (main process, 0 workers)", "ms", "ms with 1 torch thread", "share of step"], [
        ["row read + PNG decode (datasets.Image)", p["pipe_fetch_ms"], p["pipe_fetch_ms_1thread"],
         p["pipe_fetch_ms"] / (p["pipe_fetch_ms"] + p["pipe_collate_ms"] + p["pipe_fwd_bwd_ms"])],
        ["vision collator (template, tokenizer, images, labels), before", p["pipe_collate_ms"], p["pipe_collate_ms_1thread"],
         p["pipe_collate_share"]],
        ["vision collator as sft.py runs it (OneThreadCollator, after)", p["pipe_collate_ms_sft"], "",
         p["pipe_collate_share_sft"]],
        ["  of which image processor (resize, rescale, normalize, patchify)", p["pipe_image_proc_ms"],
         p["pipe_image_proc_ms_1thread"], ""],
        ["  of which resize alone", p["pipe_resize_ms"], "", ""],
        [f"forward + backward ({o.get('widths')} shape, CPU)", p["pipe_fwd_bwd_ms"], "", 1 - p["pipe_data_share"]],
    ])
    w = p["pipe_cuda_default_workers_here"]
    rows = []
    for step_ms in o["step_ms"]:
        a, c, b = (p["pipe_loader"][f"{step_ms}ms_{k}"] for k in ("trl", "0w", f"{w}w"))
        rows.append([step_ms, a["wait_ms"], a["share"], c["wait_ms"], c["share"], b["wait_ms"], b["share"]])
    t2 = md_table(["accelerator step ms (simulated)", "wait ms: 0 workers, TRL collator (before)", "data share",
                   "wait ms: 0 workers, sft.py collator", "data share",
                   f"wait ms: {w} worker(s), sft.py CUDA default (after)", "data share"], rows)
    return (
        f"{o.get('widths')} widths and vocabulary, {o['text_layers']} text layers, {o['vision_depth']} of 32 vision "
        f"blocks, random weights, LoRA r 8, gradient checkpointing, batch {o['batch']}, {o['pixels']}-pixel budget "
        f"({p['pipe_visual_tokens_per_image']} visual tokens per image, {p['pipe_tokens_per_batch']} tokens per "
        f"batch), SynthPEDES pairs (64x128 PNG) through the trainer sft.py builds, fp32 CPU ({p['pipe_cpus']} cores).\n\n"
        f"{t1}\n\nSame batch tensors from all three collator runs: {p['pipe_same_batch_1thread']}. "
        f"Forward+backward runs (wall s): {p['pipe_all_fwd_bwd_s']}, CPU s {p['pipe_all_fwd_bwd_cpu_s']}.\n\n"
        f"The training loop's wait for its next batch from `trainer.get_train_dataloader()` while an accelerator "
        f"step runs (a sleep of that length: the CPU stays free, as while a GPU computes), {o['loader_batches']} "
        f"batches after the first: before (the Trainer's default of 0 workers, TRL's collator), 0 workers with "
        f"sft.py's OneThreadCollator (its CPU default), and sft.py's CUDA default on this machine ({w} worker(s), "
        f"persistent):\n\n{t2}"
    )


def _vision_markdown(v: dict) -> str:
    o = v["vision_setup"]
    table = md_table(["input-gradient hooks", "vision output requires grad", "fwd+bwd wall s", "forward s",
                      "backward s", "CPU s", "peak RSS MB"], [
        ["transformers' stock (patch_embed + embed_tokens)", v["vision_out_requires_grad_stock"], v["vision_stock_wall"],
         v["vision_stock_fwd"], v["vision_stock_bwd"], v["vision_stock_cpu"], v["vision_stock_peak_mb"]],
        ["keep_frozen_vision_out_of_backward (embed_tokens)", v["vision_out_requires_grad_fixed"], v["vision_fixed_wall"],
         v["vision_fixed_fwd"], v["vision_fixed_bwd"], v["vision_fixed_cpu"], v["vision_fixed_peak_mb"]],
        ["ratio stock / fixed", "", v["vision_ratio_wall"], "", "", v["vision_ratio_cpu"], ""],
    ])
    return (
        f"Frozen vision tower in the backward pass (issue 11, item 5): {o.get('widths', 'Qwen2-VL-2B')} widths and vocabulary, "
        f"{o['text_layers']} text layers, {o['vision_depth']} of 32 vision blocks, random weights, LoRA r 8 on the "
        f"language model, gradient checkpointing (non-reentrant), batch {o['batch']}, {o['pixels']}-pixel images "
        f"({v['vision_patches_per_image']} patches, {v['vision_tokens_per_batch']} tokens per batch), fp32 CPU, "
        f"forward + backward of one batch, alternating A B B A on one model, {o['reps']} runs each (medians)."
        f"\n\n{table}\n\n"
        f"Same loss in both modes: {v['vision_same_loss']}. Wall s per run: stock "
        f"{[round(x, 2) for x in v['vision_all_stock_wall']]}, fixed {[round(x, 2) for x in v['vision_all_fixed_wall']]}. "
        "CPU s counts this process's threads only, so it moves less with other jobs' load than wall time. "
        "With 2 text layers the vision tower's share of a step is far larger than in the real 28-layer model; "
        "the time saved per image (stock minus fixed) is what carries over."
    )


if __name__ == "__main__":
    import json
    import sys

    # one measurement alone: the frozen-vision-tower one (a few minutes on 2 CPUs) or the SFT
    # input pipeline (issue 16, item 3)
    single = {"--vision-only": (_vision_backward, VISION_SMOKE, VISION_FULL, _vision_markdown),
              "--pipeline-only": (_input_pipeline, PIPE_SMOKE, PIPE_FULL, _pipeline_markdown)}
    for flag, (measure, smoke_shape, full_shape, markdown) in single.items():
        if flag in sys.argv:
            import transformers

            transformers.logging.set_verbosity_error()
            with tempfile.TemporaryDirectory() as tmp:
                got = measure(Path(tmp), smoke_shape if "--smoke" in sys.argv else full_shape)
            print(markdown(got))
            print(json.dumps(got, indent=2))
            sys.exit(0)
    res = run(smoke="--smoke" in sys.argv)
    print(res["markdown"])
    print(json.dumps(res["figures"], indent=2))
