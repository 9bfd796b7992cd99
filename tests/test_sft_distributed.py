"""`accelerate launch` with two CPU processes: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (STACK.md).

Same data and seed must give the same losses and adapters in the three modes; the ZeRO-3 adapter
(gathered from both ranks on save) must reload with PEFT. ~30-60 s each on two cores; the first
DeepSpeed run also JIT-compiles a communication op once (cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sft_fixtures import write_pairs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, model: Path, data: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)})
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{config}.yaml",
        "--main_process_port", str(_free_port()),
        "mllm_tune/sft.py", "recipes/tiny_lora.yaml",
        "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
        "--max_steps", "4", "--save_steps", "4", "--eval_steps", "4", "--learning_rate", "1e-2",
        "--per_device_train_batch_size", "2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    record = json.loads((out / "sft_metrics.json").read_text())
    record["losses"] = [h["loss"] for h in record["log_history"] if "loss" in h]
    return record


@pytest.fixture(scope="module")
def setup(tiny_models, synth_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return tiny_models("qwen2_vl"), write_pairs(synth_root, base / "pairs", n_train=8, n_eval=4), base


@pytest.fixture(scope="module")
def ddp(setup):
    model, data, base = setup
    return launch("cpu_ddp", model, data, base / "ddp"), base / "ddp"


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def test_ddp_two_processes(ddp):
    record, out = ddp
    assert record["world_size"] == 2
    assert record["metrics"]["global_step"] == 4 and len(record["losses"]) == 4
    assert record["losses"][-1] < record["losses"][0]
    assert record["metrics"]["eval_yesno_pairs"] == 4  # every eval pair counted once across ranks
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


def test_deepspeed_zero2_two_processes(setup, ddp):
    model, data, base = setup
    record = launch("cpu_zero2", model, data, base / "z2")
    assert record["world_size"] == 2 and record["metrics"]["global_step"] == 4
    assert record["losses"] == pytest.approx(ddp[0]["losses"], abs=1e-3)


def test_deepspeed_zero3_two_processes_adapter_reloads(setup, ddp):
    from peft import PeftModel

    from mllm_tune.core.modeling import is_vision_module, load_model, lora_module_names

    model, data, base = setup
    out = base / "z3"
    record = launch("cpu_zero3", model, data, out)
    assert record["world_size"] == 2 and record["metrics"]["global_step"] == 4
    assert record["losses"] == pytest.approx(ddp[0]["losses"], abs=1e-3)
    z3, ref = _adapter(out), _adapter(ddp[1])
    assert z3.keys() == ref.keys() and all(t.numel() > 0 for t in z3.values())  # gathered, not shards
    for k in ref:
        torch.testing.assert_close(z3[k], ref[k], atol=1e-4, rtol=1e-3)
    reloaded = PeftModel.from_pretrained(load_model(str(model)), str(out))
    names = lora_module_names(reloaded)
    assert names and not [n for n in names if is_vision_module(n)]
    for name, p in reloaded.named_parameters():
        if "lora_B" in name:
            key = name.replace(".default", "")
            torch.testing.assert_close(p.detach(), z3[key])
