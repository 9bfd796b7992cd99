"""Issue 11 item 5: with LoRA on the language model only, the frozen vision tower is not back-propagated.

transformers 5.x hooks `visual.patch_embed` in `enable_input_require_grads` (called for gradient
checkpointing and by PEFT/TRL), which keeps the whole vision tower in the autograd graph.
`modeling.keep_frozen_vision_out_of_backward` hooks the language model's embeddings only; these
tests check that the loss and every LoRA gradient are unchanged and the tower's output is a leaf.
"""

from __future__ import annotations

import pytest
import torch

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _vision_module(model: torch.nn.Module) -> torch.nn.Module:
    from mllm_tune.core.modeling import VISION_MODULE_NAMES

    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_MODULE_NAMES:
            return mod
    raise AssertionError("no vision tower found")


def _any_requires_grad(out) -> bool:
    if isinstance(out, torch.Tensor):
        return out.requires_grad
    if isinstance(out, dict):  # ModelOutput
        return any(_any_requires_grad(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return any(_any_requires_grad(v) for v in out)
    return False


def _batch(path):
    from PIL import Image

    from mllm_tune.core.modeling import load_processor

    processor = load_processor(str(path))
    rng = torch.Generator().manual_seed(0)
    pixels = (torch.rand(128, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a man in a red coat?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    batch = processor(text=[text], images=[Image.fromarray(pixels)], return_tensors="pt")
    batch["labels"] = batch["input_ids"].clone()
    return dict(batch)


def _step(path, batch, fix: bool, reentrant: bool):
    """One forward/backward with LoRA (non-zero B so A gets gradients too); returns
    (loss, {lora param: grad}, vision output requires grad)."""
    from peft import get_peft_model

    from mllm_tune.core.modeling import build_lora_config, keep_frozen_vision_out_of_backward, load_model

    torch.manual_seed(0)
    model = load_model(str(path))
    if fix:
        keep_frozen_vision_out_of_backward(model)
    peft_model = get_peft_model(model, build_lora_config(model, dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    # the order Trainer uses: PEFT model first, then gradient checkpointing on the wrapped model
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    peft_model.train()
    seen: list[bool] = []
    handle = _vision_module(peft_model).register_forward_hook(lambda m, i, o: seen.append(_any_requires_grad(o)))
    loss = peft_model(**batch).loss
    loss.backward()
    handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, any(seen)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("family", FAMILIES)
def test_same_loss_and_lora_grads_without_vision_backward(tiny_models, family, reentrant):
    path = tiny_models(family)
    batch = _batch(path)
    loss0, grads0, vision_grad0 = _step(path, batch, fix=False, reentrant=reentrant)
    loss1, grads1, vision_grad1 = _step(path, batch, fix=True, reentrant=reentrant)
    if family != "qwen3_vl":
        # the problem the fix removes (if this fails, transformers stopped hooking the vision tower)
        assert vision_grad0, "stock transformers no longer back-propagates the frozen vision tower"
    assert not vision_grad1
    assert torch.allclose(loss0, loss1, atol=1e-6, rtol=0)
    assert grads0.keys() == grads1.keys()
    worst = max((grads0[n] - grads1[n]).abs().max().item() for n in grads0)
    assert worst <= 1e-6, f"LoRA gradients differ by {worst}"
    # the gradients reach the adapter at all (a test that could pass with everything zero would be useless)
    assert max(g.abs().max().item() for g in grads1.values()) > 0


def test_trainable_vision_tower_keeps_the_stock_hooks(tiny_models):
    """freeze_vision_tower: false trains the tower: its input must still carry gradients."""
    from mllm_tune.core.modeling import keep_frozen_vision_out_of_backward, load_model

    model = keep_frozen_vision_out_of_backward(load_model(str(tiny_models("qwen2_vl"))))
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable()
    hooked = {n for n, m in model.named_modules() if m._forward_hooks}
    assert hooked == {"model.language_model.embed_tokens"}
    for p in _vision_module(model).parameters():
        p.requires_grad_(True)
    model.enable_input_require_grads()
    hooked = {n for n, m in model.named_modules() if m._forward_hooks}
    assert "model.visual.patch_embed" in hooked and "model.language_model.embed_tokens" in hooked


def test_sft_trainer_does_not_backprop_the_vision_tower(tiny_models, synth_root, tmp_path):
    """The whole sft.py path (TRL + PEFT + Trainer's gradient checkpointing) with the fix in place."""
    from sft_fixtures import write_pairs

    from mllm_tune.sft import build_trainer
    from mllm_tune.sft_config import parse_args
    from test_sft import tiny_argv

    data = write_pairs(synth_root, tmp_path / "pairs", n_train=2, n_eval=2)
    cfg = parse_args(tiny_argv(tiny_models("qwen2_vl"), data, tmp_path / "out", max_steps=1,
                               gradient_checkpointing=True, eval_strategy="no", save_strategy="no"))
    trainer, _ = build_trainer(cfg)
    seen: list[bool] = []
    _vision_module(trainer.model).register_forward_hook(lambda m, i, o: seen.append(_any_requires_grad(o)))
    trainer.train()
    assert seen and not any(seen)
    hooked = {n for n, m in trainer.model.named_modules() if m._forward_hooks and "embed" in n}
    assert all("visual" not in n for n in hooked), hooked
