"""Inference sees crops at the token count training saw (issue 11, item 1).

A tiny Qwen2-VL whose image processor carries the real Qwen2-VL settings (patch 14, merge 2,
min 3,136 / max 12,845,056 pixels as in the hub's preprocessor config): the SFT collator (TRL's
vision collator on the processor mllm_tune.sft loads with the 50,176 budget) and the hf backend
must give the same crop the same number of visual tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from mllm_tune.core.backends import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    MLLMRequest,
    make_backend,
    resolve_pixel_budget,
)
from mllm_tune.core.backends.base import adapter_pixel_budget

REAL_MIN, REAL_MAX = 3136, 12845056  # Qwen/Qwen2-VL-*-Instruct preprocessor_config.json
CROPS = {(64, 128): (10, 72), (100, 300): (44, 70)}  # (w, h) -> visual tokens (base processor, 50,176 budget)


@pytest.fixture(scope="module")
def real_budget_model(tmp_path_factory) -> Path:
    from synthpedes.tiny import build_tiny

    out = build_tiny("qwen2_vl", tmp_path_factory.mktemp("realpix") / "m")
    cfg_path = out / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    ip = cfg["image_processor"]
    assert ip["patch_size"] == 14 and ip["merge_size"] == 2
    ip["size"] = {"shortest_edge": REAL_MIN, "longest_edge": REAL_MAX}
    ip["min_pixels"], ip["max_pixels"] = REAL_MIN, REAL_MAX
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> dict[tuple[int, int], str]:
    d = tmp_path_factory.mktemp("crops")
    out = {}
    for i, (w, h) in enumerate(CROPS):
        p = d / f"crop_{w}x{h}.png"
        Image.new("RGB", (w, h), (40 * i, 120, 200)).save(p)
        out[(w, h)] = str(p)
    return out


def _adapter(model_dir: Path, out: Path, processor) -> Path:
    """An (untrained) LoRA adapter saved as mllm_tune.sft saves one: adapter + processor."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q|v)_proj"))
    peft.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _collator_tokens(processor, image_path: str) -> int:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    collator = DataCollatorForVisionLanguageModeling(processor)
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it him?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}],
           "images": [Image.open(image_path).convert("RGB")]}
    batch = collator([row])
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return int((batch["input_ids"] == image_token).sum())


def test_collator_and_hf_backend_agree(real_budget_model, crops, tmp_path):
    from mllm_tune.core import modeling

    # training: what mllm_tune.sft loads with the paper's budget
    train_proc = modeling.load_processor(str(real_budget_model), "main", DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    base_proc = modeling.load_processor(str(real_budget_model), "main")  # the base model's own budget
    adapter = _adapter(real_budget_model, tmp_path / "adapter", train_proc)
    assert adapter_pixel_budget(adapter) == (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)

    with_adapter = make_backend("hf", model=real_budget_model, adapter=adapter, max_new_tokens=1)
    no_adapter = make_backend("hf", model=real_budget_model, max_new_tokens=1)
    assert with_adapter.pixel_budget.source.startswith("adapter")
    assert no_adapter.pixel_budget.source.startswith("default")
    for (w, h), (before, after) in CROPS.items():
        path = crops[(w, h)]
        assert _collator_tokens(base_proc, path) == before  # what inference used to see
        train = _collator_tokens(train_proc, path)
        assert train == after
        for be in (with_adapter, no_adapter):
            be.visual_tokens.clear()
            be.generate([MLLMRequest("loc", "Is it him?", path)])
            assert be.visual_tokens == [train], (w, h, be.pixel_budget)
    stats = no_adapter.visual_token_stats()
    assert stats["images"] == 1 and stats["mean_visual_tokens"] == CROPS[(100, 300)][1]


def test_smart_resize_overshoots_for_upscaled_crops():
    """The documented behaviour of the Qwen2-VL resize under min = max = 50,176."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    assert smart_resize(128, 64, 28, 50_176, 50_176) == (336, 168)  # ceil: 56,448 px > max, 72 tokens
    assert smart_resize(336, 168, 28, 50_176, 50_176) == (308, 140)  # floor: 43,120 px, 55 tokens


def test_resolve_pixel_budget_sources(tmp_path, caplog):
    assert resolve_pixel_budget(None).as_dict() == {"min_pixels": 50_176, "max_pixels": 50_176,
                                                    "source": "default (training: 224x224)"}
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 12544, "max_pixels": 12544}))
    assert (resolve_pixel_budget(flat).min_pixels, resolve_pixel_budget(flat).max_pixels) == (12544, 12544)
    with caplog.at_level(logging.WARNING):
        b = resolve_pixel_budget(flat, None, 50_176)
    assert (b.min_pixels, b.max_pixels, b.source) == (12544, 50_176, "explicit")
    assert "differs from the one adapter" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        resolve_pixel_budget(flat, 12544, 12544)
    assert "differs" not in caplog.text
    no_proc = tmp_path / "bare"
    no_proc.mkdir()
    assert resolve_pixel_budget(no_proc).source.startswith("default")
    with pytest.raises(ValueError, match="larger than max_pixels"):
        resolve_pixel_budget(None, 60_000, 50_176)
    (no_proc / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json is not valid JSON"):
        resolve_pixel_budget(no_proc)
