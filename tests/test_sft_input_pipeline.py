"""The SFT input pipeline (issue 16, item 3): dataloader defaults per device, and dataloader workers
giving the training loop exactly the batches (and losses) of the in-process collator."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sft_fixtures import write_pairs

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_lora.yaml"
PIXELS = 6272


@pytest.fixture(scope="module")
def pairs8(synth_root, tmp_path_factory) -> Path:
    return write_pairs(synth_root, tmp_path_factory.mktemp("pairs8"), n_train=8, n_eval=2)


def _argv(model: Path, data: Path, out: Path, **over) -> list[str]:
    args = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "max_steps": 3,
            "per_device_train_batch_size": 2, "learning_rate": 1e-2, "save_strategy": "no", "eval_strategy": "no",
            "eval_fraction": 0, "dataset_test_split": "none", "image_min_pixels": PIXELS,
            "image_max_pixels": PIXELS, "lora_dropout": 0.0}
    args.update(over)
    argv = [str(RECIPE)]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


# -- defaults (no model) -------------------------------------------------------------------------


def test_loader_defaults_per_device():
    from mllm_tune.sft_config import MAX_DEFAULT_WORKERS, loader_defaults

    assert loader_defaults(False, cpus=64) == {"dataloader_num_workers": 0, "dataloader_pin_memory": False}
    cuda = loader_defaults(True, cpus=16)
    assert cuda["dataloader_num_workers"] == MAX_DEFAULT_WORKERS
    assert cuda["dataloader_pin_memory"] and cuda["dataloader_persistent_workers"] and cuda["non_blocking"]
    assert loader_defaults(True, cpus=16, local_world_size=8)["dataloader_num_workers"] == 1  # 2 cores per GPU
    assert loader_defaults(True, cpus=2)["dataloader_num_workers"] == 1
    assert loader_defaults(True, cpus=1, local_world_size=4)["dataloader_num_workers"] == 1


def test_cpu_run_loads_in_process(tiny_qwen2_vl, pairs8, tmp_path):
    from mllm_tune.sft_config import parse_args

    t = parse_args(_argv(tiny_qwen2_vl, pairs8, tmp_path)).training
    assert t.use_cpu and t.dataloader_num_workers == 0 and not t.dataloader_pin_memory
    assert not t.dataloader_persistent_workers
    # a recipe or command-line value wins; workers then persist across epochs unless told otherwise
    t = parse_args(_argv(tiny_qwen2_vl, pairs8, tmp_path, dataloader_num_workers=2)).training
    assert t.dataloader_num_workers == 2 and t.dataloader_persistent_workers
    t = parse_args(_argv(tiny_qwen2_vl, pairs8, tmp_path, dataloader_num_workers=2,
                         dataloader_persistent_workers="false")).training
    assert t.dataloader_num_workers == 2 and not t.dataloader_persistent_workers


def test_cuda_defaults_fill_only_unset_fields(monkeypatch):
    from mllm_tune import sft_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sft_config, "available_cpus", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")

    def args(**kw):
        base = {"use_cpu": False, "dataloader_num_workers": 0, "dataloader_pin_memory": True,
                "dataloader_persistent_workers": False, "accelerator_config": SimpleNamespace(non_blocking=False)}
        return SimpleNamespace(**{**base, **kw})

    t = args()
    sft_config.apply_loader_defaults(t, set())
    assert (t.dataloader_num_workers, t.dataloader_pin_memory, t.dataloader_persistent_workers) == (4, True, True)
    assert t.accelerator_config.non_blocking
    t = args(dataloader_num_workers=1, dataloader_pin_memory=False)
    sft_config.apply_loader_defaults(t, {"dataloader_num_workers", "dataloader_pin_memory"})
    assert (t.dataloader_num_workers, t.dataloader_pin_memory) == (1, False)
    assert not t.accelerator_config.non_blocking  # nothing pinned: no non-blocking copies
    t = args(use_cpu=True)  # use_cpu on a CUDA machine: the CPU settings
    sft_config.apply_loader_defaults(t, set())
    assert (t.dataloader_num_workers, t.dataloader_pin_memory) == (0, False)


# -- same batches, same losses -------------------------------------------------------------------


def _batches(trainer, workers: int) -> list[dict]:
    a = trainer.args
    a.dataloader_num_workers, a.dataloader_persistent_workers = workers, workers > 0
    torch.manual_seed(0)
    out = []
    for _epoch in range(2):  # a second pass reuses persistent workers
        out += [dict(b) for b in trainer.get_train_dataloader()]
    return out


def test_workers_give_the_in_process_batches(tiny_qwen2_vl, pairs8, tmp_path):
    from mllm_tune.sft import build_trainer
    from mllm_tune.sft_config import parse_args

    trainer, _ = build_trainer(parse_args(_argv(tiny_qwen2_vl, pairs8, tmp_path)))
    serial = _batches(trainer, 0)
    forked = _batches(trainer, 2)
    assert len(serial) == len(forked) == 8
    for a, b in zip(serial, forked):
        assert set(a) == set(b) and {"input_ids", "labels", "pixel_values", "image_grid_thw"} <= set(a)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # and each sample of the loader is what the trainer's collator makes of one row alone
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    alone = [trainer.data_collator([dict(r)]) for r in rows]
    for b in forked:
        pixels = b["pixel_values"].split([int(g.prod()) for g in b["image_grid_thw"]])
        for ids, mask, labels, px in zip(b["input_ids"], b["attention_mask"], b["labels"], pixels):
            assert any(torch.equal(ids[mask == 1], a["input_ids"][0]) and torch.equal(labels[mask == 1], a["labels"][0])
                       and torch.equal(px, a["pixel_values"]) for a in alone)
    # labels only on the answer and its end-of-turn token (unchanged by the loader)
    tok = trainer.processing_class.tokenizer
    for b in forked:
        for ids_, labels in zip(b["input_ids"], b["labels"]):
            text = tok.decode(ids_[labels != -100]).replace("\n", "")
            assert text in ("Yes<|im_end|>", "No<|im_end|>"), text


def test_one_thread_collator_gives_the_same_batch(tiny_qwen2_vl, pairs8, tmp_path):
    from mllm_tune.sft import OneThreadCollator, build_trainer
    from mllm_tune.sft_config import parse_args

    trainer, _ = build_trainer(parse_args(_argv(tiny_qwen2_vl, pairs8, tmp_path, image_min_pixels=50176,
                                                image_max_pixels=50176)))
    ours = trainer.data_collator
    assert isinstance(ours, OneThreadCollator) and ours.assistant_only_loss  # attributes pass through
    rows = [dict(trainer.train_dataset[i]) for i in range(4)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stock = ours.collator([dict(r) for r in rows])  # TRL's collator, 2 threads
        mine = ours([dict(r) for r in rows])
        assert torch.get_num_threads() == 2  # the caller's count again
    finally:
        torch.set_num_threads(before)
    assert set(stock) == set(mine)
    for k in stock:
        assert stock[k].dtype == mine[k].dtype and torch.equal(stock[k], mine[k]), k


def test_same_losses_with_and_without_workers(tiny_qwen2_vl, pairs8, tmp_path):
    from mllm_tune import sft

    losses = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        sft.main(_argv(tiny_qwen2_vl, pairs8, out, dataloader_num_workers=workers))
        history = json.loads((out / sft.METRICS_FILE).read_text())["log_history"]
        losses[workers] = [h["loss"] for h in history if "loss" in h]
    assert len(losses[0]) == 3 and losses[0] == losses[2], losses


def test_bench_input_pipeline_smoke(tmp_path):
    """bench/bench_sft.py's input-pipeline measurement starts and reports every figure (toy shapes)."""
    from bench.bench_sft import PIPE_SMOKE, _input_pipeline, _pipeline_markdown

    p = _input_pipeline(tmp_path, PIPE_SMOKE)
    assert p["pipe_collate_ms"] > 0 and p["pipe_fwd_bwd_ms"] > 0 and 0 < p["pipe_collate_share"] < 1
    assert p["pipe_image_proc_ms"] > 0 and p["pipe_resize_ms"] > 0
    w = p["pipe_cuda_default_workers_here"]
    assert {"0ms_trl", "0ms_0w", f"0ms_{w}w"} <= set(p["pipe_loader"]) and p["pipe_same_batch_1thread"]
    assert "vision collator" in _pipeline_markdown(p)
