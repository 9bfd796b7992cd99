"""Adapters in the pre-4.52 Qwen-VL layout (keys at model.layers.N, as LLaMA-Factory wrote them,
e.g. the ICL authors' released lora.tar.gz) give the same model as in today's layout."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from mllm_tune.core.adapter_layout import (
    AdapterLayoutError,
    convert_adapter,
    current_layout_dir,
    layout_of,
    map_key,
)


def test_key_mapping_rules():
    assert map_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight") == \
        "base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight"
    assert map_key("base_model.model.visual.blocks.0.attn.qkv.lora_B.weight") == \
        "base_model.model.model.visual.blocks.0.attn.qkv.lora_B.weight"
    new = "base_model.model.model.language_model.layers.0.mlp.up_proj.lora_A.weight"
    assert map_key(new) == new and map_key("base_model.model.lm_head.weight") == "base_model.model.lm_head.weight"
    assert layout_of([new]) == "current" and layout_of(["base_model.model.model.layers.0.x"]) == "old"


@pytest.fixture(scope="module")
def adapters(tiny_qwen2_vl, tmp_path_factory):
    """The same random LoRA saved in today's layout and rewritten in the old one (LLaMA-Factory
    output folder: list target_modules, trainer files, a checkpoint below), plus its .tar.gz."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen2_vl)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)",
                     init_lora_weights=False)  # random A and B: a wrong load shows in the logits
    get_peft_model(model, cfg).save_pretrained(root / "new")
    state = load_file(root / "new" / "adapter_model.safetensors")
    old = {k.replace("model.language_model.", "model."): v for k, v in state.items()}
    lf = root / "llamafactory_out"
    (lf / "checkpoint-10").mkdir(parents=True)
    save_file(old, lf / "adapter_model.safetensors")
    conf = json.loads((root / "new" / "adapter_config.json").read_text())
    conf["target_modules"] = ["q_proj", "v_proj", "up_proj"]
    (lf / "adapter_config.json").write_text(json.dumps(conf))
    for extra in ("trainer_state.json", "all_results.json"):
        (lf / extra).write_text("{}")
    (lf / "checkpoint-10" / "adapter_config.json").write_text(json.dumps(conf))
    tgz = root / "lora.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(lf, arcname="lora")
    return {"base": tiny_qwen2_vl, "new": root / "new", "old": lf, "tgz": tgz, "root": root}


def _logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter).eval()
    ids = torch.arange(5, 29).reshape(2, 12)
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_old_layout_converted_gives_the_same_logits(adapters, capsys):
    ref = _logits(adapters["base"], adapters["new"])
    # without conversion PEFT loads the old keys into nothing: the logits are not the adapter's
    assert (_logits(adapters["base"], adapters["old"]) - ref).abs().max() > 1e-3
    out = adapters["root"] / "converted"
    from mllm_tune import adapters as cli

    assert cli.main(["convert", str(adapters["tgz"]), str(out), "--base", str(adapters["base"])]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["layout"] == "old" and report["mapped"] > 0 and report["unmatched"] == []
    diff = (_logits(adapters["base"], out) - ref).abs().max().item()
    print(f"old-layout adapter after conversion: max |logit diff| = {diff:.3g}")
    assert diff < 1e-6
    assert not (out / "checkpoint-10").exists() and (out / "trainer_state.json").is_file()


def test_load_time_conversion_is_cached_and_a_current_adapter_is_untouched(adapters, tmp_path):
    assert current_layout_dir(adapters["new"], tmp_path) == adapters["new"]
    first = current_layout_dir(adapters["old"], tmp_path)
    assert first != adapters["old"] and current_layout_dir(adapters["old"], tmp_path) == first
    assert (_logits(adapters["base"], first) - _logits(adapters["base"], adapters["new"])).abs().max() < 1e-6


def test_foreign_and_broken_adapters_are_refused(adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    from mllm_tune.adapters import meta_model

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    state = load_file(adapters["new"] / "adapter_model.safetensors")
    save_file({k.replace("language_model.layers", "transformer.h"): v for k, v in state.items()},
              foreign / "adapter_model.safetensors")
    (foreign / "adapter_config.json").write_text((adapters["new"] / "adapter_config.json").read_text())
    with pytest.raises(AdapterLayoutError, match="none of its .* keys names a module.*first: base_model.model.model.transformer.h.0"):
        convert_adapter(foreign, tmp_path / "x", model=meta_model(str(adapters["base"])))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(adapters["tgz"].read_bytes()[:200])
    with pytest.raises(AdapterLayoutError, match="truncated|not a tar"):
        convert_adapter(cut, tmp_path / "y")
    with pytest.raises(AdapterLayoutError, match="does not exist"):
        convert_adapter(tmp_path / "missing", tmp_path / "z")


def test_cli_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mllm_tune.adapters", "convert", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_hf_backend_loads_an_old_layout_adapter_like_the_new(adapters, synth_root, caplog):
    from mllm_tune.core.backends import MLLMRequest, make_backend
    from mllm_tune.core.pedes import load_pedes

    img = str(load_pedes(synth_root, "synthpedes").split("test").gallery_paths[0])
    reqs = [MLLMRequest("loc", "Is this a man? Answer Yes or No.", img), MLLMRequest("aggr", "Say a colour.")]
    new = make_backend("hf", model=str(adapters["base"]), adapter=str(adapters["new"]), max_new_tokens=6).generate(reqs)
    with caplog.at_level("INFO", logger="mllm_tune.adapter_layout"):
        old = make_backend("hf", model=str(adapters["base"]), adapter=str(adapters["old"]), max_new_tokens=6).generate(reqs)
    assert old == new and any("old layout" in r.getMessage() for r in caplog.records)
