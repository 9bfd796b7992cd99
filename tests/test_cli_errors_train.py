"""Issue 11 item 7: the training-side CLIs (mllm_tune.sft, merge, push, retriever_train) turn bad
input into one `error: ...` line naming the file and the fix, a non-zero exit and no traceback.

Each CLI is called in-process for several bad inputs (fast), and once as a real subprocess to see
what a user sees on the terminal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sft_fixtures import write_pairs

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_lora.yaml"


def _error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert lines, "nothing printed"
    assert "Traceback" not in text, text
    err = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err) == 1, text
    return err[0]


def _run(args: list[str], tmp_path: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stderr + p.stdout


def _truncate(path: Path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _fake_adapter(folder: Path, base: str) -> Path:
    """A PEFT-shaped adapter folder (config + real safetensors), enough for the file checks."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    save_file({"base_model.model.x.lora_A.weight": torch.zeros(8, 64)}, str(folder / "adapter_model.safetensors"))
    return folder


# -- mllm_tune.sft ---------------------------------------------------------------------------------


def test_sft_cli_errors(tiny_models, synth_root, tmp_path, capsys):
    from mllm_tune import sft

    model = tiny_models("qwen2_vl")
    data = write_pairs(synth_root, tmp_path / "pairs", n_train=2, n_eval=2)
    base = ["--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]

    def err(argv: list[str]) -> str:
        assert sft.cli(argv) == 2
        return _error_line(capsys.readouterr().err)

    line = err([str(tmp_path / "missing.yaml"), *base])
    assert "recipe" in line and "missing.yaml" in line and "does not exist" in line
    line = err([str(RECIPE), *base, "--dataset_name", str(tmp_path / "no_pairs")])
    assert "no_pairs" in line and "does not exist" in line and "anchor_pairs" in line
    line = err([str(RECIPE), *base, "--model_name_or_path", str(tmp_path / "no_model")])
    assert "no_model" in line and "does not exist" in line and "repo id" not in line.lower()
    line = err([str(RECIPE), *base, "--model_name_or_path", str(data / "pairs.jsonl")])
    assert "is a file" in line
    # a checkpoint cut while saving: resuming names the file and what to do
    ckpt = tmp_path / "out" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    shutil.copy(model / "model.safetensors", ckpt / "adapter_model.safetensors")
    _truncate(ckpt / "adapter_model.safetensors", 4096)
    line = err([str(RECIPE), *base])
    assert "adapter_model.safetensors is truncated" in line and "Delete" in line

    # what a user sees: `accelerate launch mllm_tune/sft.py` runs the file as a script
    rc, out = _run([str(REPO / "mllm_tune" / "sft.py"), str(RECIPE), "--model_name_or_path", "./no_such_model",
                    "--dataset_name", str(data), "--output_dir", str(tmp_path / "out2")], tmp_path)
    assert rc == 2 and "no_such_model does not exist" in _error_line(out)


# -- mllm_tune.merge -------------------------------------------------------------------------------


def test_merge_cli_errors(tiny_models, tmp_path, capsys):
    from mllm_tune import merge

    def err(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            merge.main(argv)
        assert exc.value.code not in (0, None)
        return _error_line(str(exc.value.code))

    out = ["--out", str(tmp_path / "merged")]
    line = err(["--adapter", str(tmp_path / "nope"), *out])
    assert "nope does not exist" in line and "mllm_tune.sft" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "adapter_config.json is missing" in err(["--adapter", str(empty), *out])
    adapter = _fake_adapter(tmp_path / "adapter", str(tmp_path / "gone_base"))
    line = err(["--adapter", str(adapter), *out])
    assert "gone_base does not exist" in line and "--base" in line
    line = err(["--adapter", str(adapter), "--base", str(tiny_models("qwen2_vl")), *out])
    assert "cannot apply the adapter" in line and "adapter_config.json" in line  # no target_modules: PEFT refuses
    cut = _fake_adapter(tmp_path / "cut", str(tiny_models("qwen2_vl")))
    _truncate(cut / "adapter_model.safetensors", 50)
    line = err(["--adapter", str(cut), *out])
    assert "adapter_model.safetensors is truncated" in line and "copy it again" in line

    rc, text = _run(["-m", "mllm_tune.merge", "--adapter", "missing_adapter", "--out", "m"], tmp_path)
    assert rc != 0 and "missing_adapter does not exist" in _error_line(text)


# -- mllm_tune.push --------------------------------------------------------------------------------


def test_push_cli_errors(tmp_path, capsys):
    from mllm_tune import push

    def err(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            push.main(argv)
        assert exc.value.code not in (0, None)
        return _error_line(str(exc.value.code))

    line = err(["--adapter", str(tmp_path / "nope"), "--repo-id", "me/x"])
    assert "nope does not exist" in line
    cut = _fake_adapter(tmp_path / "cut", "base")
    _truncate(cut / "adapter_model.safetensors", 50)
    line = err(["--adapter", str(cut), "--repo-id", "me/x"])
    assert "adapter_model.safetensors is truncated" in line and "before pushing" in line
    good = _fake_adapter(tmp_path / "good", "base")
    # nothing listens on port 9 (discard): the hub is unreachable
    line = err(["--adapter", str(good), "--repo-id", "me/x", "--endpoint", "http://127.0.0.1:9", "--token", "t"])
    assert "127.0.0.1:9" in line and "HF_ENDPOINT" in line

    rc, text = _run(["-m", "mllm_tune.push", "--adapter", "missing_adapter", "--repo-id", "me/x"], tmp_path)
    assert rc != 0 and "missing_adapter does not exist" in _error_line(text)


# -- mllm_tune.retriever_train ---------------------------------------------------------------------


def test_retriever_train_cli_errors(tiny_clip, synth_root, tmp_path, capsys):
    from mllm_tune import retriever_train

    base = ["--model", str(tiny_clip), "--dataset-root", str(synth_root), "--dataset", "synthpedes",
            "--output-dir", str(tmp_path / "out"), "--epochs", "1"]

    def err(argv: list[str]) -> str:
        assert retriever_train.cli(argv) == 2
        return _error_line(capsys.readouterr().err)

    line = err([str(tmp_path / "missing.yaml"), *base])
    assert "missing.yaml does not exist" in line and "recipes/retriever_clip.yaml" in line
    line = err([*base, "--dataset-root", str(tmp_path / "no_data")])
    assert "--dataset-root" in line and "no_data" in line
    line = err([*base, "--model", str(tmp_path / "no_clip")])
    assert "no_clip does not exist" in line
    cut = tmp_path / "cut_clip"
    shutil.copytree(tiny_clip, cut)
    _truncate(cut / "model.safetensors", 2048)
    line = err([*base, "--model", str(cut)])
    assert "model.safetensors" in line and "truncated" in line
    line = err([*base, "--rda-file", str(tmp_path / "no.jsonl")])
    assert "no.jsonl does not exist" in line and "data_builders.rda" in line

    rc, text = _run(["-m", "mllm_tune.retriever_train", *base[:2], "--dataset-root", "missing_root",
                     *base[4:]], tmp_path)
    assert rc == 2 and "missing_root" in _error_line(text)


def test_sft_warns_when_vllm_would_refuse_the_adapter(tmp_path):
    from mllm_tune.sft import vllm_servable_warning
    from mllm_tune.sft_config import parse_args

    argv = ["--model_name_or_path", "m/m", "--dataset_name", "d", "--output_dir", str(tmp_path)]
    assert vllm_servable_warning(parse_args(argv)) is None  # the default: servable
    assert vllm_servable_warning(parse_args([*argv, "--lora_modules_to_save", "score"])) is None
    msg = vllm_servable_warning(parse_args([*argv, "--lora_modules_to_save", "lm_head"]))
    assert msg and "lm_head" in msg and "vLLM will refuse" in msg
    msg = vllm_servable_warning(parse_args([*argv, "--freeze_vision_tower", "false"]))
    assert msg and "vision tower" in msg
    assert vllm_servable_warning(parse_args([*argv, "--lora_modules_to_save", "lm_head", "--use_peft", "false"])) is None
