"""The transformers backend with a tiny Qwen2-VL and a LoRA adapter, on CPU, end to end."""

from __future__ import annotations

import copy
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
    # the base run sees images at the adapter's training budget (without an adapter it would use the
    # 50,176 default and the VQA image would be another input)
    assert loc_only.pixel_budget.source.startswith("adapter") and loc_only.max_pixels == 6272
    base = make_backend("hf", model=tiny_qwen2_vl, max_new_tokens=4, min_pixels=6272, max_pixels=6272)
    a_all, a_loc, a_base = everywhere.generate(reqs), loc_only.generate(reqs), base.generate(reqs)
    assert all(is_yes(a) for a in a_all[:3]) and all(is_yes(a) for a in a_loc[:3])
    # the random base model does not answer Yes throughout (the head-size-32 tiny model of c3eaf5f
    # happens to say "YesYesYesYes" to one of the three), the adapter does
    assert sum(map(is_yes, a_base[:3])) < 3 and a_base[:3] != a_all[:3]
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


def test_hf_end_to_end_harness(synth_root, tiny_qwen2_vl, tiny_clip, yes_adapter, tmp_path):
    from eval.icl_end2end import main

    # a real (tiny) CLIP retriever: the random MLLM's rewritten queries share no word with the
    # synth-bow vocabulary, whose all-zero rows the plugin check refuses; ξ = -1 lets every round-0
    # Yes refine whatever the random CLIP's similarities are
    argv = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", str(tiny_clip),
            "--mllm", "hf", "--model", str(tiny_qwen2_vl), "--adapter", str(yes_adapter), "--adapter-only-loc",
            "--max-new-tokens", "8", "--rounds", "3", "--xi", "-1", "--out", str(tmp_path / "o"), "--no-progress",
            "--xi-sweep", "--no-plots"]
    res = main(argv)
    assert res["complete"] and not any("oracle" in n for n in res["simulation_notes"])
    assert res["refined"] > 0 and res["calls"]["vqa"] > 0 and res["calls"]["aggr"] == res["refined"]
    assert res["config"]["backend_identity"]["adapter_tasks"] == ["loc"]
    # the budget saved with the adapter (the tiny model's 6,272 px), and what the model really saw
    budget = res["config"]["pixel_budget"]
    assert (budget["min_pixels"], budget["max_pixels"]) == (6272, 6272) and budget["source"].startswith("adapter")
    assert res["visual_tokens"]["images"] > 0 and 6 <= res["visual_tokens"]["mean_visual_tokens"] <= 10
    assert res["config"]["decoding"]["repetition_penalty"] == 1.0
    on_disk = json.loads((tmp_path / "o" / "results.json").read_text())
    assert on_disk["visual_tokens"] == res["visual_tokens"]
    again = main(argv)  # resumed entirely from the answer cache
    assert sum(again["backend_calls"].values()) == 0 and again["rounds"] == res["rounds"]
    assert again["visual_tokens"]["images"] == 0 and "not measured" in again["visual_tokens"]["measured"]


# -- decoding parity (issue 11, item 3) ------------------------------------------------------

@pytest.fixture(scope="module")
def sampling_checkpoint(tiny_qwen2_vl, tmp_path_factory) -> Path:
    """The tiny model with the generation_config real Qwen2-VL checkpoints ship (sampling on,
    repetition_penalty 1.05)."""
    import shutil

    out = tmp_path_factory.mktemp("gencfg") / "m"
    shutil.copytree(tiny_qwen2_vl, out)
    cfg = json.loads((out / "generation_config.json").read_text())
    cfg.update({"do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05})
    (out / "generation_config.json").write_text(json.dumps(cfg))
    return out


def _manual_greedy(backend, req: MLLMRequest, steps: int) -> list[int]:
    """Argmax of the next-token logits, full forward each step, no logit processor at all."""
    from PIL import Image

    proc, model = backend._processor, backend._model
    content = ([{"type": "image"}] if req.image else []) + [{"type": "text", "text": req.prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    images = [Image.open(req.image).convert("RGB")] if req.image else None
    enc = proc(text=[text], images=images, return_tensors="pt")
    ids, eos = enc["input_ids"], backend._gen_config.eos_token_id
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt in (eos if isinstance(eos, list) else [eos]):
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if "mm_token_type_ids" in extra:  # per-token modality (0 = text) grows with the sequence
                extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
    return new


def _encode(backend, req: MLLMRequest):
    from PIL import Image

    proc = backend._processor
    content = ([{"type": "image"}] if req.image else []) + [{"type": "text", "text": req.prompt}]
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[Image.open(req.image).convert("RGB")] if req.image else None, return_tensors="pt")


def test_hf_decodes_exactly_greedily(sampling_checkpoint, split, caplog):
    from mllm_tune.core.backends import DEFAULT_MAX_NEW_TOKENS

    steps = 12
    reqs = [MLLMRequest("loc", P.render_loc(split.query_texts[i]), split.gallery_paths[i]) for i in range(2)]
    reqs += [MLLMRequest("aggr", P.render_aggr("A man in a red coat.", ["He wears a hat."])),
             MLLMRequest("dec", "Split this: a man with a bag and a hat.")]
    be = make_backend("hf", model=sampling_checkpoint, max_new_tokens=steps, batch_size=4)
    with caplog.at_level("WARNING"):
        got = be.generate(reqs)
    manual = [_manual_greedy(be, r, steps) for r in reqs]
    decode = be._processor.tokenizer.decode
    assert got == [decode(m, skip_special_tokens=True).strip() for m in manual]
    assert got == be.generate(reqs)  # no sampling: the same answers again
    # token for token: the backend's GenerationConfig is the argmax loop, the checkpoint's is not
    from transformers import GenerationConfig

    ckpt = GenerationConfig.from_pretrained(sampling_checkpoint)
    ckpt.do_sample, ckpt.max_new_tokens = False, steps  # even without sampling, the penalty applies
    ours = copy.deepcopy(be._gen_config)
    ours.max_new_tokens = steps
    differs = 0
    for r, m in zip(reqs, manual):
        enc = _encode(be, r)
        n = enc["input_ids"].shape[1]
        assert be._model.generate(**enc, generation_config=ours)[0, n:].tolist()[: len(m)] == m
        differs += be._model.generate(**enc, generation_config=ckpt)[0, n:].tolist()[: len(m)] != m
    assert differs >= 1  # repetition_penalty 1.05 changes at least one answer of the random model
    # a random tiny model never stops: every answer ran into the cap, and that is said with a count
    assert be.capped and sum(be.capped.values()) >= 1
    assert "hit the max_new_tokens cap" in caplog.text
    ident = be.identity()
    assert ident["decoding"]["repetition_penalty"] == 1.0 and ident["decoding"]["do_sample"] is False
    assert ident["decoding"]["max_new_tokens"]["vqa"] == steps
    # per-task defaults, and a per-task override keeps the other defaults
    assert make_backend("hf", model=sampling_checkpoint).max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    per_task = make_backend("hf", model=sampling_checkpoint, max_new_tokens={"loc": 3})
    assert per_task.max_new_tokens["loc"] == 3 and per_task.max_new_tokens["vqa"] == DEFAULT_MAX_NEW_TOKENS["vqa"]
    assert per_task.identity() != be.identity()
