"""Merge an adapter into its base; push adapters to a local hub server (127.0.0.1, real HTTP)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hub_server import HubServer
from sft_fixtures import write_pairs
from test_sft import tiny_argv


@pytest.fixture(scope="module")
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def trained(tiny_models, synth_root, tmp_path_factory, hub):
    """One short training run with `push_to_hub: true` pointed at the local hub."""
    import os

    from mllm_tune import sft

    base = tmp_path_factory.mktemp("mp")
    data = write_pairs(synth_root, base / "pairs", n_train=4, n_eval=2)
    out = base / "adapter"
    old = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url
    try:
        metrics = sft.main(tiny_argv(tiny_models("qwen2_vl"), data, out, max_steps=4, save_steps=2, eval_steps=4,
                                     push_to_hub="true", hub_model_id="tester/tiny-anchor-lora",
                                     hub_token="test-token"))
    finally:
        if old is None:
            os.environ.pop("HF_ENDPOINT")
        else:
            os.environ["HF_ENDPOINT"] = old
    return out, metrics


def _batch(model_dir: Path, synth_root: Path):
    from mllm_tune.core.modeling import load_processor
    from sft_fixtures import pair_rows
    from PIL import Image

    proc = load_processor(str(model_dir))
    rows = pair_rows(synth_root, 2, 0)["train"]
    texts = [proc.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    images = [[Image.open(r["images"][0]).convert("RGB")] for r in rows]
    return proc(text=texts, images=images, return_tensors="pt", padding=True)


def test_recipe_push_to_hub_sends_adapter_processor_and_card(trained, hub):
    out, metrics = trained
    files = hub.files("tester/tiny-anchor-lora")
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        assert name in files, (name, sorted(files))
        assert files[name] == (out / name).read_bytes(), name
    assert not [p for p in files if p.startswith("checkpoint-") or p.endswith((".pt", ".pth"))]
    card = files["README.md"].decode()
    assert "base_model:" in card and "eval_yesno_accuracy" in card and "lora" in card.lower()
    assert "tester/tiny-anchor-lora" in card  # how-to-load snippet names the hub repo
    assert metrics["hub_url"].startswith(hub.url)


def test_push_cli_to_local_hub(trained, hub, tmp_path):
    from mllm_tune import push

    out, _ = trained
    folder = tmp_path / "adapter"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("checkpoint-*"))
    (folder / "README.md").unlink()  # the card is written when missing
    url = push.main(["--adapter", str(folder), "--repo-id", "tester/cli-push", "--endpoint", hub.url,
                     "--token", "test-token"])
    assert "/tester/cli-push/commit/" in url
    files = hub.files("tester/cli-push")
    assert files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    base = json.loads(files["adapter_config.json"])["base_model_name_or_path"]
    assert base in files["README.md"].decode()
    with pytest.raises(push.PushError, match="adapter_config.json is missing"):
        push.push_adapter(tmp_path, "tester/x", endpoint=hub.url, token="t")


def test_merge_matches_adapter_and_refuses_quantised_base(trained, tiny_models, synth_root, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from mllm_tune import merge
    from mllm_tune.core.modeling import load_model

    out, _ = trained
    base_dir = tiny_models("qwen2_vl")
    merged_dir = merge.main(["--adapter", str(out), "--out", str(tmp_path / "merged")])
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "tokenizer.json").is_file()
    batch = _batch(base_dir, synth_root)
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(str(base_dir)), str(out)).eval()(**batch).logits
        got = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()(**batch).logits
        base = load_model(str(base_dir)).eval()(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (base - want).abs().max() > 1e-3

    # a quantised base is refused with a clear message (checked before loading anything)
    qbase = tmp_path / "qbase"
    shutil.copytree(base_dir, qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (qbase / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(merge.MergeError, match="quantised"):
        merge.merge_adapter(out, tmp_path / "m2", base=str(qbase))
