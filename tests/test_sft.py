"""Single-process LoRA SFT on the tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sft_fixtures import write_pairs

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_lora.yaml"
PIXELS = {"qwen2_vl": 6272, "qwen2_5_vl": 6272, "qwen3_vl": 8192}


@pytest.fixture(scope="module")
def pairs_dir(synth_root, tmp_path_factory) -> Path:
    return write_pairs(synth_root, tmp_path_factory.mktemp("pairs"), n_train=4, n_eval=4)


def tiny_argv(model: Path, data: Path, out: Path, family: str = "qwen2_vl", **over) -> list[str]:
    args = {
        "model_name_or_path": model, "dataset_name": data, "output_dir": out,
        "learning_rate": 1e-2, "max_steps": 8, "per_device_train_batch_size": 2, "save_steps": 8,
        "eval_steps": 8, "image_min_pixels": PIXELS[family], "image_max_pixels": PIXELS[family],
    }
    args.update(over)
    argv = [str(RECIPE)]
    for k, v in args.items():
        argv += [f"--{k}", str(v)]
    return argv


# -- recipe parsing (no model) -------------------------------------------------------------------


def test_recipe_positional_config_and_overrides(tmp_path):
    from mllm_tune.sft_config import parse_args

    a = parse_args([str(RECIPE), "--lora_r", "4", "--learning_rate", "3e-4"])
    b = parse_args(["--config", str(RECIPE), "--lora_r", "4", "--learning_rate", "3e-4"])
    assert a.lora.lora_r == b.lora.lora_r == 4
    assert a.training.learning_rate == pytest.approx(3e-4)
    assert a.training.max_steps == 12  # from the recipe
    assert a.training.assistant_only_loss and a.training.max_length is None
    # CPU machine: fp32 + use_cpu without editing the recipe
    assert not torch.cuda.is_available() and a.training.use_cpu and not a.training.bf16
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_name: d\nlearning_rate: 5e-5\nlora_target_modules: [q_proj]\n")
    c = parse_args([str(recipe)])
    assert c.training.learning_rate == pytest.approx(5e-5)  # PyYAML reads 5e-5 as a string
    assert c.lora.lora_target_modules == ["q_proj"]


def test_unknown_keys_fail_naming_the_key(tmp_path):
    from mllm_tune.sft_config import RecipeError, parse_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: m\ndataset_name: d\nlora_rank: 8\n")
    with pytest.raises(RecipeError, match="unknown key 'lora_rank'"):
        parse_args([str(recipe)])
    with pytest.raises(RecipeError, match="--lora_rr"):
        parse_args([str(RECIPE), "--lora_rr", "3"])
    with pytest.raises(RecipeError, match="model_name_or_path is required"):
        recipe.write_text("dataset_name: d\n")
        parse_args([str(recipe)])


# -- LoRA targets --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_lora_targets_language_model_only(tiny_models, family):
    from peft import get_peft_model

    from mllm_tune.core.modeling import (ModelSetupError, build_lora_config, is_vision_module, language_linear_names,
                                    load_model, lora_module_names)

    path = tiny_models(family)
    cases = {
        None: None,  # default: every linear layer of the language model
        "one-element list": ["q_proj"],
        "regex": r".*language_model.*\.(q_proj|v_proj)",
        "names incl. vision-shared": ["gate_proj", "down_proj"],
    }
    for label, spec in cases.items():
        model = load_model(str(path))
        lang = language_linear_names(model)
        peft_model = get_peft_model(model, build_lora_config(model, target_modules=spec))
        names = lora_module_names(peft_model)
        assert names, label
        assert not [n for n in names if is_vision_module(n)], f"{label}: LoRA in the vision tower"
        leaves = {n.rsplit(".", 1)[-1] for n in names}
        if spec is None:
            assert len(names) == len(lang) and leaves == {n.rsplit(".", 1)[-1] for n in lang}
        elif label == "one-element list":
            assert leaves == {"q_proj"}
        elif label == "regex":
            assert leaves == {"q_proj", "v_proj"}
        else:
            assert leaves == {"gate_proj", "down_proj"}
    with pytest.raises(ModelSetupError, match="matches no module of the language model"):
        build_lora_config(load_model(str(path)), target_modules=["qkv"])  # vision-only name


# -- one training run per family: labels, loss, reload, no LoRA in vision --------------------------


class _Probe:
    """Callback that records a collated batch and the trained model's logits on it."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Probe(TrainerCallback):
            batch = None
            logits = None
            lora_names: list[str] = []

            def on_train_begin(self, args, state, control, train_dataloader=None, **kw):
                Probe.batch = next(iter(train_dataloader))

            def on_train_end(self, args, state, control, model=None, eval_dataloader=None,
                             processing_class=None, **kw):
                from mllm_tune.core.modeling import lora_module_names
                from mllm_tune.yesno_eval import answer_token_ids

                Probe.lora_names = lora_module_names(model)
                was = model.training
                model.eval()
                with torch.no_grad():
                    inputs = {k: v for k, v in Probe.batch.items() if k != "labels"}
                    Probe.logits = model(**inputs).logits.float()
                    # Yes/No accuracy the slow way: argmax of full logits before the first answer token
                    yes, no = answer_token_ids(processing_class.tokenizer)
                    right = total = 0
                    for batch in eval_dataloader:
                        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                        for row, lab in zip(logits, batch["labels"]):
                            i = int((lab != -100).nonzero()[0])
                            gold = int(lab[i])
                            if gold in (yes, no):
                                total += 1
                                right += int(row[i - 1].argmax()) == gold
                    Probe.yesno = (right, total)
                model.train(was)

        return Probe()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_train_labels_loss_reload(tiny_models, pairs_dir, tmp_path, family):
    from peft import PeftModel

    from mllm_tune import sft
    from mllm_tune.core.modeling import is_vision_module, load_model, load_processor

    model_dir = tiny_models(family)
    out = tmp_path / "run"
    probe = _Probe()
    metrics = sft.main(tiny_argv(model_dir, pairs_dir, out, family), callbacks=[probe])
    assert metrics["global_step"] == 8

    # labels: -100 everywhere but the answer and its end-of-turn token
    processor = load_processor(str(out))
    tok = processor.tokenizer
    batch = probe.batch
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = labels != -100
        assert torch.equal(ids[kept], labels[kept])
        text = tok.decode(ids[kept])
        assert text.replace("\n", "") in ("Yes<|im_end|>", "No<|im_end|>"), text
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_token).any() and (batch["labels"][batch["input_ids"] == image_token] == -100).all()

    # loss falls while overfitting four pairs
    history = json.loads((out / sft.METRICS_FILE).read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
    right, total = probe.yesno
    assert total == 4 and metrics["eval_yesno_pairs"] == total
    assert metrics["eval_yesno_accuracy"] == pytest.approx(right / total)

    # no LoRA module in the vision tower, but some in the language model
    assert probe.lora_names and not [n for n in probe.lora_names if is_vision_module(n)]

    # the saved adapter (base + adapter) reproduces the trained model's logits
    for f in ("adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json",
              "processor_config.json"):
        assert (out / f).is_file(), f
    reloaded = PeftModel.from_pretrained(load_model(str(model_dir)), str(out)).eval()
    with torch.no_grad():
        logits = reloaded(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    torch.testing.assert_close(logits, probe.logits, atol=1e-5, rtol=1e-5)
    base = load_model(str(model_dir)).eval()
    with torch.no_grad():
        base_logits = base(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    assert (base_logits - probe.logits).abs().max() > 1e-3  # training changed something

    card = (out / "README.md").read_text()
    assert str(model_dir) in card and "eval_yesno_accuracy" in card and "PeftModel.from_pretrained" in card


def test_data_errors_are_clear(tiny_models, pairs_dir, tmp_path):
    import datasets

    from mllm_tune import sft
    from mllm_tune.sft_config import RecipeError

    model_dir = tiny_models("qwen2_vl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello", "images": []}) + "\n")
    with pytest.raises(RecipeError, match=r"bad.jsonl.*'messages'"):
        sft.main(tiny_argv(model_dir, bad, tmp_path / "o"))
    with pytest.raises(RecipeError, match="does not exist"):
        sft.main(tiny_argv(model_dir, tmp_path / "nope.jsonl", tmp_path / "o"))
    # the miner's pairs.jsonl: one file, its `split` column decides train / eval
    train, ev, info = sft.load_pairs(sft.DataArguments(dataset_name=str(pairs_dir / "pairs.jsonl")))
    assert info["train_rows"] == 4 and info["eval_rows"] == 4
    assert train.column_names == ["messages", "images"]
    assert isinstance(train.features["images"].feature, datasets.Image)
    # rows without a split and with relative image paths: paths resolve against the file's folder,
    # eval rows are held out by eval_fraction
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    plain = tmp_path / "data" / "plain.jsonl"
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    for i, r in enumerate(rows):
        del r["split"]
        local = tmp_path / "data" / "imgs" / f"{i}.png"
        local.write_bytes(Path(r["images"][0]).read_bytes())
        r["images"] = [f"imgs/{i}.png"]
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, ev, info = sft.load_pairs(sft.DataArguments(dataset_name=str(plain), eval_fraction=0.25))
    assert info["train_rows"] == 6 and info["eval_rows"] == 2
    assert train[0]["images"][0].size[0] > 0  # decoded from the resolved path


def test_yesno_stats_unit():
    from mllm_tune.yesno_eval import YesNoAccumulator, first_answer_stats

    yes, no = 7, 9
    # 4 rows, positions already shifted (t predicts label t); answer starts at different places
    labels = torch.full((4, 5), -100)
    labels[0, 2:4] = torch.tensor([yes, 1])  # gold Yes, predicted right
    labels[1, 1:3] = torch.tensor([no, 1])  # gold No, predicted wrong
    labels[2, 3:5] = torch.tensor([yes, 1])  # gold Yes, predicted wrong (later token right)
    labels[3, 0:2] = torch.tensor([5, 1])  # neither Yes nor No: not counted
    mask = labels != -100
    top1 = torch.zeros(4, 5, dtype=torch.bool)
    top1[0, 2] = True
    top1[2, 4] = True
    top1[3, 0] = True
    stats = first_answer_stats(top1, mask, labels, yes, no)
    assert stats.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]
    acc = YesNoAccumulator()
    acc.add(stats)
    r = acc.result()
    assert r["yesno_pairs"] == 3 and r["yesno_accuracy"] == pytest.approx(1 / 3)
    assert r["yesno_accuracy_yes"] == pytest.approx(0.5) and r["yesno_accuracy_no"] == 0.0


def test_unfrozen_vision_tower_trains_fully(tiny_models):
    from peft import get_peft_model

    from mllm_tune.core.modeling import build_lora_config, is_vision_module, load_model

    model = load_model(str(tiny_models("qwen2_5_vl")))
    peft_model = get_peft_model(model, build_lora_config(model, freeze_vision_tower=False))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    vision = [n for n in trainable if "visual" in n]
    assert vision and all("lora_" not in n for n in vision)  # full copy, not LoRA
    assert any("language_model" in n and "lora_A" in n for n in trainable)
    frozen = load_model(str(tiny_models("qwen2_5_vl")))
    frozen_peft = get_peft_model(frozen, build_lora_config(frozen))
    assert not [n for n, p in frozen_peft.named_parameters() if p.requires_grad and is_vision_module(n.replace(
        "base_model.model.", ""))]


def test_every_recipe_and_launch_config_parses():
    import yaml

    from mllm_tune.sft_config import parse_args

    names = ["qwen_lora.yaml", "qwen2_5_vl_lora.yaml", "qwen3_vl_lora.yaml", "tiny_lora.yaml"]
    recipes = [RECIPE.parent / n for n in names]  # other recipes in the folder belong to other trainers
    for path in recipes:
        cfg = parse_args([str(path)])
        assert cfg.training.assistant_only_loss and cfg.vision.freeze_vision_tower, path
    paper = parse_args([str(RECIPE.parent / "qwen_lora.yaml")])
    t = paper.training
    assert (paper.lora.lora_r, paper.lora.lora_alpha, t.num_train_epochs, t.per_device_train_batch_size,
            t.gradient_accumulation_steps, t.learning_rate) == (8, 16, 2, 4, 16, pytest.approx(5e-5))
    assert paper.vision.image_min_pixels == paper.vision.image_max_pixels == 224 * 224
    assert paper.model.model_name_or_path == "Qwen/Qwen2-VL-7B-Instruct"
    accs = [RECIPE.parent / "accelerate" / f"{n}.yaml" for n in
            ("single_gpu", "multi_gpu", "zero2", "zero3", "cpu_ddp", "cpu_zero2", "cpu_zero3")]
    for acc in accs:
        conf = yaml.safe_load(acc.read_text())
        ds = (conf.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds:
            stage = json.loads((RECIPE.parents[1] / ds).read_text())["zero_optimization"]["stage"]
            assert stage == (3 if "zero3" in acc.name else 2), acc


def test_full_training_without_peft(tiny_models, pairs_dir, tmp_path):
    """use_peft: false trains the language model in full (SynthPEDES-VL pre-training), keeps the
    vision tower frozen unless asked, and saves a whole model that loads without PEFT."""
    from safetensors.torch import load_file

    from mllm_tune import sft
    from mllm_tune.core.modeling import is_vision_module, load_model

    model_dir = tiny_models("qwen2_vl")
    out = tmp_path / "full"
    argv = tiny_argv(model_dir, pairs_dir, out, learning_rate=3e-3, use_peft="false", lora_modules_to_save="null")
    metrics = sft.main(argv)
    assert metrics["global_step"] == 8
    assert not (out / "adapter_config.json").exists()
    before = load_file(str(model_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not [k for k in changed if is_vision_module(k)]  # vision tower frozen by default
    load_model(str(out))  # a plain checkpoint
    card = (out / "README.md").read_text()
    assert "Full fine-tune" in card and "PeftModel" not in card and "vision tower: frozen" in card
