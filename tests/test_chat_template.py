"""Issue 11 item 6: a chat template TRL cannot make training-compatible is a clear recipe error
(before any weight loads), and `chat_template: stock-...` trains with the family's stock template."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sft_fixtures import write_pairs
from test_sft import tiny_argv


@pytest.fixture(scope="module")
def pairs(synth_root, tmp_path_factory) -> Path:
    return write_pairs(synth_root, tmp_path_factory.mktemp("pairs_tpl"), n_train=4, n_eval=2)


def _one_byte_off(src: Path, dst: Path) -> Path:
    """A copy of a tiny model whose chat template differs from the stock one by one byte, as a
    fine-tuned checkpoint's edited template would."""
    shutil.copytree(src, dst)
    tpl = dst / "chat_template.jinja"
    text = tpl.read_text(encoding="utf-8")
    if "You are a helpful assistant." in text:  # Qwen2/2.5-VL's default system prompt
        edited = text.replace("You are a helpful assistant.", "You are a helpful assistant!", 1)
    else:  # Qwen3-VL has none: one more trailing newline
        edited = text + "\n"
    assert len(edited.encode()) - len(text.encode()) in (0, 1) and edited != text
    tpl.write_text(edited, encoding="utf-8")
    return dst


@pytest.mark.parametrize("family,stock", [("qwen2_vl", "stock-qwen2-vl"), ("qwen3_vl", "stock-qwen3-vl")])
def test_edited_template_is_a_recipe_error_before_weights_load(tiny_models, pairs, tmp_path, monkeypatch,
                                                               family, stock):
    from mllm_tune.core import modeling
    from mllm_tune.sft import build_trainer
    from mllm_tune.sft_config import RecipeError, parse_args

    model = _one_byte_off(tiny_models(family), tmp_path / "edited")

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the template was checked")

    monkeypatch.setattr(modeling, "load_model", no_weights)
    cfg = parse_args(tiny_argv(model, pairs, tmp_path / "out", family))
    with pytest.raises(RecipeError) as err:
        build_trainer(cfg)
    msg = str(err.value)
    assert str(model) in msg and f"chat_template: {stock}" in msg and "assistant_only_loss" in msg
    assert "differs from the stock" in msg


def test_stock_option_trains_with_answer_only_labels(tiny_models, pairs, tmp_path):
    from mllm_tune.sft import build_trainer
    from mllm_tune.sft_config import parse_args

    model = _one_byte_off(tiny_models("qwen2_vl"), tmp_path / "edited")
    cfg = parse_args(tiny_argv(model, pairs, tmp_path / "out", chat_template="stock-qwen2-vl", max_steps=2,
                               save_strategy="no", eval_strategy="no"))
    trainer, _ = build_trainer(cfg)
    tok = trainer.processing_class.tokenizer
    batch = trainer.data_collator([dict(trainer.train_dataset[i]) for i in range(2)])
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels != -100
        assert torch.equal(ids[kept], labels[kept])
        assert tok.decode(ids[kept]).replace("\n", "") in ("Yes<|im_end|>", "No<|im_end|>")
    # the stock system prompt (not the edited one) is what the model sees
    assert "helpful assistant." in tok.decode(batch["input_ids"][0])
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_template_option_errors(tmp_path):
    from mllm_tune.sft import read_chat_template
    from mllm_tune.sft_config import RecipeError

    assert "<|im_start|>" in read_chat_template("stock-qwen2.5-vl")
    with pytest.raises(RecipeError, match="neither a stock template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
