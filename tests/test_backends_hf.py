"""The transformers backend with a tiny Qwen2-VL and a LoRA adapter, on CPU, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm_tune.core.pedes import load_split
from mllm_tune.core.backends import BackendError, MLLMRequest, make_backend
from mllm_tune.core.prompts import DEFAULT_PROMPTS as P
from mllm_tune.core.prompts import is_yes


def train_yes_adapter(model_dir: Path, images: list[str], out: Path, steps: int = 12) -> Path:
    """A LoRA adapter trained for a few steps to answer "Yes" to T_loc (so THI really refines)."""
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16,
                                             target_modules=r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"))
    prompts = [proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": P.render_loc(f"A person number {i}.")}]}],
        add_generation_prompt=True, tokenize=False) for i in range(len(images))]
    ims = [Image.open(p).convert("RGB") for p in images]
    proc.tokenizer.padding_side = "right"
    enc = proc(text=[t + "Yes<|im_end|>" for t in prompts], images=ims, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    for i, (t, im) in enumerate(zip(prompts, ims)):
        labels[i, : len(proc(text=[t], images=[im], return_tensors="pt")["input_ids"][0])] = -100
    labels[enc["attention_mask"] == 0] = -100
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    proc.save_pretrained(out)  # as mllm_tune.sft does: the training pixel budget travels with the adapter
    return out


@pytest.fixture(scope="module")
def split(synth_root):
    return load_split(synth_root, "cuhk-pedes", "test")


@pytest.fixture(scope="module")
def yes_adapter(tiny_qwen2_vl, split, tmp_path_factory):
    return train_yes_adapter(tiny_qwen2_vl, split.gallery_paths[:2], tmp_path_factory.mktemp("adapter") / "yes")


def test_hf_batched_generation_and_adapter_tasks(tiny_qwen2_vl, yes_adapter, split):
    reqs = [MLLMRequest("loc", P.render_loc(split.query_texts[i]), split.gallery_paths[i + 3]) for i in range(3)]
    reqs += [MLLMRequest("vqa", P.render_vqa(), split.gallery_paths[5]), MLLMRequest("aggr", P.render_aggr("A man.", ["Hat."]))]
    everywhere = make_backend("hf", model=tiny_qwen2_vl, adapter=yes_adapter, max_new_tokens=4, batch_size=2)
    loc_only = make_backend("hf", model=tiny_qwen2_vl, adapter=yes_adapter, adapter_tasks=("loc",), max_new_tokens=4)
    base = make_backend("hf", model=tiny_qwen2_vl, max_new_tokens=4)
    a_all, a_loc, a_base = everywhere.generate(reqs), loc_only.generate(reqs), base.generate(reqs)
    assert all(is_yes(a) for a in a_all[:3]) and all(is_yes(a) for a in a_loc[:3])
    assert not any(is_yes(a) for a in a_base)
    assert a_loc[3:] == a_base[3:]  # base weights for VQA/aggregation
    # batching with left padding gives the answers of one-at-a-time generation
    one = [base.generate([r])[0] for r in reqs]
    assert one == a_base
    ident = loc_only.identity()
    assert ident["adapter_sha256"] and ident["adapter_tasks"] == ["loc"] and ident != everywhere.identity()
    json.dumps(ident)


def test_hf_adapter_mismatch_and_bad_paths(yes_adapter, tmp_path):
    from synthpedes.tiny import build_tiny

    other = build_tiny("qwen2_vl", tmp_path / "wider", hidden_size=96, intermediate_size=160)
    with pytest.raises(BackendError, match="does not match the base model"):
        make_backend("hf", model=other, adapter=yes_adapter, max_new_tokens=2).generate([MLLMRequest("aggr", "hi")])
    with pytest.raises(BackendError, match="no config.json"):
        make_backend("hf", model=tmp_path)
    with pytest.raises(BackendError, match="adapter_config.json"):
        make_backend("hf", model=other, adapter=tmp_path / "wider")


def test_hf_end_to_end_harness(synth_root, tiny_qwen2_vl, yes_adapter, tmp_path):
    from eval.icl_end2end import main

    argv = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", "synth-bow",
            "--mllm", "hf", "--model", str(tiny_qwen2_vl), "--adapter", str(yes_adapter), "--adapter-only-loc",
            "--max-new-tokens", "8", "--rounds", "3", "--out", str(tmp_path / "o"), "--no-progress",
            "--xi-sweep", "--no-plots"]
    res = main(argv)
    assert res["complete"] and not any("oracle" in n for n in res["simulation_notes"])
    assert res["refined"] > 0 and res["calls"]["vqa"] > 0 and res["calls"]["aggr"] == res["refined"]
    assert res["config"]["backend_identity"]["adapter_tasks"] == ["loc"]
    again = main(argv)  # resumed entirely from the answer cache
    assert sum(again["backend_calls"].values()) == 0 and again["rounds"] == res["rounds"]
