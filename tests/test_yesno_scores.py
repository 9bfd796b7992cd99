"""p_yes in the SFT eval (issue 13): ROC-AUC, ECE and Brier of p_yes, and p_yes itself read from
the fused-loss forward pass equal to P(Yes) from the full logits of a plain forward."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_fixtures import write_pairs

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny_lora.yaml"

# -- the pure scores against hand-computed values -------------------------------------------------


def test_roc_auc_hand_values():
    from mllm_tune.yesno_eval import roc_auc

    # positives 0.9, 0.7; negatives 0.8, 0.6, 0.5: 0.9 beats 3, 0.7 beats 2 -> 5 of 6 pairs
    assert roc_auc([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 0]) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts half: (0.5 + 1 + 1 + 1) / 4
    assert roc_auc([0.5, 0.5, 0.9, 0.1], [1, 0, 1, 0]) == pytest.approx(0.875)
    assert roc_auc([0.3, 0.3, 0.3], [1, 0, 1]) == pytest.approx(0.5)  # all tied
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0 and roc_auc([0.1, 0.9], [True, False]) == 0.0
    assert math.isnan(roc_auc([0.2, 0.7], [1, 1])) and math.isnan(roc_auc([0.2, 0.7], [0, 0]))
    assert math.isnan(roc_auc([], []))
    with pytest.raises(ValueError):
        roc_auc([0.5, float("nan")], [1, 0])


def test_roc_auc_equals_pair_count_with_ties():
    from mllm_tune.yesno_eval import roc_auc

    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, size=60) / 5.0  # many ties
    y = rng.integers(0, 2, size=60).astype(bool)
    pos, neg = s[y], s[~y]
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a, b in product(pos, neg)]
    assert roc_auc(s, y) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_ece_and_brier_hand_values():
    from mllm_tune.yesno_eval import brier_score, expected_calibration_error

    p, y = [0.05, 0.15, 0.15, 0.95], [0, 1, 0, 1]
    # bins: [0, .1): p .05 vs gold 0 -> .05, weight 1/4; [.1, .2): p .15 vs gold .5 -> .35, weight 2/4;
    # [.9, 1]: p .95 vs gold 1 -> .05, weight 1/4.  ECE = .0125 + .175 + .0125
    assert expected_calibration_error(p, y) == pytest.approx(0.2)
    assert brier_score(p, y) == pytest.approx((0.05**2 + 0.85**2 + 0.15**2 + 0.05**2) / 4)
    assert expected_calibration_error([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(0.0)  # calibrated
    # 1.0 falls in the last bin, 0.0 in the first; 0.35 and 0.38 share [0.3, 0.4)
    assert expected_calibration_error([1.0, 0.0], [1, 1]) == pytest.approx(0.5)
    assert expected_calibration_error([0.35, 0.38], [1, 0]) == pytest.approx(abs(0.5 - 0.365))
    # with 2 bins both land in [0, .5)
    assert expected_calibration_error([0.1, 0.4], [1, 1], n_bins=2) == pytest.approx(0.75)
    assert math.isnan(expected_calibration_error([], [])) and math.isnan(brier_score([], []))
    with pytest.raises(ValueError):
        expected_calibration_error([1.2], [1])


def test_accumulator_reports_p_yes_scores():
    from mllm_tune.yesno_eval import YesNoAccumulator

    acc = YesNoAccumulator()
    # [valid, gold_yes, greedy_correct, p_yes]; the invalid row and the NaN p_yes row are not scored
    # (p_yes away from the bin edges: the rows are float32)
    acc.add(torch.tensor([[1, 1, 1, 0.95], [1, 0, 0, 0.85], [1, 1, 0, 0.75]]))
    acc.add(torch.tensor([[1, 0, 1, 0.65], [1, 0, 1, 0.55], [0, 0, 0, 0.99], [1, 1, 1, float("nan")]]))
    r = acc.result()
    assert r["yesno_pairs"] == 6 and r["yesno_accuracy"] == pytest.approx(4 / 6)
    assert r["yesno_auc"] == pytest.approx(5 / 6)
    p, y = np.array([0.95, 0.85, 0.75, 0.65, 0.55]), np.array([1, 0, 1, 0, 0])
    assert r["yesno_brier"] == pytest.approx(float(np.mean((p - y) ** 2)))
    # one row per bin: ECE = mean |y - p|
    assert r["yesno_ece"] == pytest.approx(float(np.mean(np.abs(y - p))))
    only_no = YesNoAccumulator()
    only_no.add(torch.tensor([[1, 0, 1, 0.25], [1, 0, 1, 0.45]]))
    assert math.isnan(only_no.result()["yesno_auc"]) and only_no.result()["yesno_ece"] == pytest.approx(0.35)
    old = YesNoAccumulator()  # 3 columns (no p_yes): accuracy only
    old.add(torch.tensor([[1, 1, 1]]))
    assert "yesno_auc" not in old.result() and old.result()["yesno_accuracy"] == 1.0


def test_yes_no_logits_are_the_head_rows():
    from mllm_tune.core.yes_no import YesNoIds, p_yes_from_logits
    from mllm_tune.yesno_eval import local_ids, yes_no_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    ids = YesNoIds((3, 41), (7, 11, 20), ("Yes", " Yes"), ("No", "no", " No"))
    w, b = head.weight[list(ids.all)].detach(), head.bias[list(ids.all)].detach()
    h = torch.randn(5, 16)
    with torch.no_grad():
        full = head(h)
    torch.testing.assert_close(yes_no_logits(h, w, b), full[:, list(ids.all)])
    torch.testing.assert_close(p_yes_from_logits(yes_no_logits(h, w, b), local_ids(ids)), p_yes_from_logits(full, ids))


# -- a real tiny SFT run: p_yes of the eval path == p_yes of a plain full-logit forward -----------


@pytest.fixture(scope="module")
def pairs_dir(synth_root, tmp_path_factory) -> Path:
    return write_pairs(synth_root, tmp_path_factory.mktemp("pairs"), n_train=4, n_eval=4)


def _argv(model: Path, data: Path, out: Path, **over) -> list[str]:
    args = {"model_name_or_path": model, "dataset_name": data, "output_dir": out, "learning_rate": 1e-2,
            "max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 3, "save_steps": 2,
            "eval_steps": 1, "image_min_pixels": 6272, "image_max_pixels": 6272}
    args.update(over)
    return [str(RECIPE)] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _reference_p_yes(model, eval_dataloader, processing_class) -> tuple[list[float], list[bool]]:
    """P(Yes) from the full logits of a plain forward, at the position before each first answer token."""
    from mllm_tune.core.yes_no import p_yes_from_logits, yes_no_ids

    ids = yes_no_ids(processing_class)
    was = model.training
    model.eval()
    ps, gold = [], []
    with torch.no_grad():
        for batch in eval_dataloader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            assert logits.size(-1) > max(ids.all)  # the full vocabulary
            for row, lab in zip(logits, batch["labels"]):
                i = int((lab != -100).nonzero()[0])
                ps.append(float(p_yes_from_logits(row[i - 1], ids)))
                gold.append(int(lab[i]) in ids.yes)
    model.train(was)
    return ps, gold


def test_tiny_sft_eval_p_yes_matches_full_logits(tiny_models, pairs_dir, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from mllm_tune import sft, yesno_eval
    from mllm_tune.yesno_eval import brier_score, expected_calibration_error, roc_auc

    captured: list[torch.Tensor] = []
    reset = yesno_eval.YesNoAccumulator.reset

    def keep_then_reset(self):
        if self.rows:
            captured.append(torch.cat(self.rows))
        reset(self)

    monkeypatch.setattr(yesno_eval.YesNoAccumulator, "reset", keep_then_reset)
    checked: list[dict] = []

    class Check(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, model=None, eval_dataloader=None,
                        processing_class=None, **kw):
            rows = captured[-1]  # this evaluation's rows ([valid, gold_yes, correct, p_yes])
            ref, gold = _reference_p_yes(model, eval_dataloader, processing_class)
            checked.append({"step": state.global_step, "metrics": dict(metrics), "rows": rows, "ref": ref,
                            "gold": gold})

    out = tmp_path / "run"
    metrics = sft.main(_argv(tiny_models("qwen2_vl"), pairs_dir, out), callbacks=[Check()])
    assert [c["step"] for c in checked] == [1, 2]  # eval after each step (the final one reused)
    for c in checked:
        rows, ref, gold = c["rows"], c["ref"], c["gold"]
        assert rows.shape == (4, 4) and (rows[:, 0] == 1).all()
        assert rows[:, 1].bool().tolist() == gold and sum(gold) == 2  # both classes
        torch.testing.assert_close(rows[:, 3].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
        m = c["metrics"]
        assert m["eval_yesno_auc"] == pytest.approx(roc_auc(ref, gold), abs=1e-9)  # ties are exact: same ranks
        assert m["eval_yesno_ece"] == pytest.approx(expected_calibration_error(ref, gold), abs=1e-5)
        assert m["eval_yesno_brier"] == pytest.approx(brier_score(ref, gold), abs=1e-5)
    assert 0 < min(r for c in checked for r in c["ref"]) and max(r for c in checked for r in c["ref"]) < 1
    # the step-1 and step-2 evaluations saw different weights (the head rows are taken per evaluation)
    assert checked[0]["ref"] != checked[1]["ref"]

    # what the run logs (final metrics, history, sft_metrics.json)
    assert 0.0 <= metrics["eval_yesno_auc"] <= 1.0
    assert 0.0 <= metrics["eval_yesno_ece"] <= 1.0 and 0.0 <= metrics["eval_yesno_brier"] <= 1.0
    record = json.loads((out / sft.METRICS_FILE).read_text())
    evals = [h for h in record["log_history"] if "eval_loss" in h]
    assert len(evals) == 2 and all({"eval_yesno_auc", "eval_yesno_ece", "eval_yesno_brier"} <= h.keys() for h in evals)
    assert record["metrics"]["eval_yesno_auc"] == metrics["eval_yesno_auc"]


# -- ZeRO-3 on two CPU processes: the partitioned head rows are gathered, p_yes is the same -------


@pytest.mark.slow
def test_zero3_eval_p_yes_matches_single_process(tiny_models, synth_root, tmp_path):
    """eval_on_start evaluates the untrained adapter (LoRA B = 0) under ZeRO-3 with two ranks (the
    head is partitioned: zero3_tiny.json has persistence threshold 0); its AUC, ECE and Brier must
    equal those of p_yes from full logits of the same model in this process."""
    from mllm_tune.yesno_eval import brier_score, expected_calibration_error, roc_auc

    model_dir = tiny_models("qwen2_vl")
    data = write_pairs(synth_root, tmp_path / "pairs", n_train=4, n_eval=6)
    out = tmp_path / "z3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO),
                "CUDA_VISIBLE_DEVICES": ""})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_zero3.yaml",
           "--main_process_port", str(port), "mllm_tune/sft.py",
           *_argv(model_dir, data, out, max_steps=1, eval_steps=1, save_steps=1, eval_on_start="true",
                  per_device_eval_batch_size=2)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    record = json.loads((out / "sft_metrics.json").read_text())
    first = next(h for h in record["log_history"] if "eval_loss" in h)
    assert first["step"] == 0 and first["eval_yesno_pairs"] == 6

    # the same evaluation in this process (build the trainer, evaluate before any step), and
    # p_yes from the full logits of a plain forward of that model
    from mllm_tune import sft
    from mllm_tune.sft_config import parse_args

    trainer, _ = sft.build_trainer(parse_args(_argv(model_dir, data, tmp_path / "single", max_steps=1,
                                                    per_device_eval_batch_size=2)))
    single = trainer.evaluate()
    ps, gold = _reference_p_yes(trainer.model, trainer.get_eval_dataloader(), trainer.processing_class)
    assert len(ps) == 6 and 0 < sum(gold) < 6 and len({round(p, 4) for p in ps}) > 1
    for key, ref in (("brier", brier_score(ps, gold)), ("ece", expected_calibration_error(ps, gold)),
                     ("auc", roc_auc(ps, gold))):
        assert single[f"eval_yesno_{key}"] == pytest.approx(ref, abs=1e-5), key
        assert first[f"eval_yesno_{key}"] == pytest.approx(ref, abs=1e-5), key
