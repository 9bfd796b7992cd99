"""The one command per shipped demo model that rebuilds it: valid bash, and every stage, task mix
and recipe it names exists (they take 25-135 min, so CI checks them statically)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "demo_models" / "synthpedes-vl" / "reproduce.sh"


def test_script_parses_and_names_only_things_that_exist():
    from synthpedes.vl_pretrain import STAGES, TASKS

    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    stages = re.findall(r"--stage (\S+)", text)
    assert stages and set(stages) <= set(STAGES), set(stages) - set(STAGES)
    for mix in re.findall(r"--mix '([^']+)'", text):
        assert set(json.loads(mix)) <= set(TASKS)
    for recipe in re.findall(r"(recipes/\S+\.yaml)", text):
        assert (ROOT / recipe).is_file(), recipe
    # every training stage starts from the previous stage's output
    outs = re.findall(r'--out "\$OUT/(s\d+)"', text)
    inits = re.findall(r'--init "\$OUT/(s\d+)"', text)
    assert inits == outs[:-1], (inits, outs)
    # then the sft.py stages, each from the one before
    sft_from = re.findall(r'--model_name_or_path "\$OUT/(\w+)"', text)
    sft_to = re.findall(r'--output_dir "\$OUT/(\w+)"', text)
    assert sft_from == [outs[-1]] + sft_to[:-1] and sft_to[-1] == "final", (sft_from, sft_to)
    assert '--model "$OUT/final"' in text
    assert "demo_models/synthpedes-vl/reproduce.sh" in (ROOT / "Makefile").read_text()


def test_clip_script_parses_and_names_existing_recipes():
    script = ROOT / "demo_models" / "clip-synthpedes" / "reproduce.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    recipes = re.findall(r"(recipes/\S+\.yaml)", text)
    assert recipes and all((ROOT / r).is_file() for r in recipes)
    # each run continues from the previous one's output
    outs = re.findall(r'--output-dir "\$OUT/(\w+)"', text)
    models = re.findall(r'--model "\$OUT/(\w+)"', text)
    assert models == ["clip_init"] + outs[:-1], (models, outs)
    assert "demo_models/clip-synthpedes/reproduce.sh" in (ROOT / "Makefile").read_text()
