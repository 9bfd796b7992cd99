"""Resume after an interrupted run, and clear errors on truncated checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest

from sft_fixtures import write_pairs
from test_sft import tiny_argv


class Interrupted(RuntimeError):
    pass


def _interrupt_after_save(step: int):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == step:
                raise Interrupted(f"simulated crash after checkpoint {step}")

    return Stop()


def _losses(out) -> dict[int, float]:
    from mllm_tune.sft import METRICS_FILE

    hist = json.loads((out / METRICS_FILE).read_text())["log_history"]
    return {h["step"]: h["loss"] for h in hist if "loss" in h}


def test_resume_continues_and_truncated_checkpoint_fails(tiny_models, synth_root, tmp_path):
    from mllm_tune import sft

    model = tiny_models("qwen2_vl")
    data = write_pairs(synth_root, tmp_path / "pairs", n_train=4, n_eval=2)
    over = {"max_steps": 6, "save_steps": 2, "eval_strategy": "no"}

    full = sft.main(tiny_argv(model, data, tmp_path / "full", **over))
    ref = _losses(tmp_path / "full")
    assert full["global_step"] == 6 and sorted(ref) == [1, 2, 3, 4, 5, 6]

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupted):
        sft.main(tiny_argv(model, data, out, **over), callbacks=[_interrupt_after_save(4)])
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-6").exists()

    # same command again: continues from checkpoint-4 to the same final step
    resumed = sft.main(tiny_argv(model, data, out, **over))
    assert resumed["global_step"] == 6
    record = json.loads((out / sft.METRICS_FILE).read_text())
    assert record["resumed_from"].endswith("checkpoint-4")
    got = _losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the logged curve carries on from the checkpoint's history
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-3), (step, got, ref)

    # a truncated adapter in the last checkpoint: a clear error naming the file, before training
    ck = out / "checkpoint-6" / "adapter_model.safetensors"
    ck.write_bytes(ck.read_bytes()[:-100])
    with pytest.raises(sft.CheckpointError, match=r"checkpoint-6.*adapter_model.safetensors is truncated"):
        sft.main(tiny_argv(model, data, out, **over))

    # an explicit --resume_from_checkpoint with a truncated optimizer state
    bad = tmp_path / "bad_ckpt"
    shutil.copytree(out / "checkpoint-4", bad)
    opt = bad / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 2])
    with pytest.raises(sft.CheckpointError, match=r"optimizer.pt is truncated"):
        sft.main(tiny_argv(model, data, tmp_path / "other", resume_from_checkpoint=bad, **over))
