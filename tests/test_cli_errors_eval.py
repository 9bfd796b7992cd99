"""Bad input to the evaluation/data CLIs ends in one ``error: ...`` line, not a traceback
(issue 11, item 7): eval.icl_end2end, data_builders.rda, data_builders.anchor_pairs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broken_root(synth_root, tmp_path_factory) -> Path:
    """The SynthPEDES root with a truncated annotation file."""
    root = tmp_path_factory.mktemp("broken")
    for p in synth_root.iterdir():
        (root / p.name).symlink_to(p)
    ann = root / "reid_raw.json"
    ann.unlink()
    text = (synth_root / "reid_raw.json").read_text()
    ann.write_text(text[: len(text) // 2])
    return root


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert "Traceback" not in text
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, text
    return errors[0]


def _e2e(root, out, *extra) -> list[str]:
    return ["--dataset-root", str(root), "--dataset", "cuhk-pedes", "--retriever", "synth-bow", "--out", str(out),
            "--no-plots", "--no-progress", *extra]


def test_icl_end2end_bad_inputs(synth_root, broken_root, tiny_qwen2_vl, tmp_path):
    from eval.icl_end2end import main

    cases = {
        "missing root": (_e2e(tmp_path / "no-root", tmp_path / "o1", "--mllm", "oracle"),
                         ["--dataset-root", "no-root", "does not exist", "pass the folder"]),
        "missing model": (_e2e(synth_root, tmp_path / "o2", "--mllm", "hf", "--model", str(tmp_path / "no-model")),
                          ["no-model does not exist", "check the path"]),
        "missing adapter": (_e2e(synth_root, tmp_path / "o3", "--mllm", "hf", "--model", str(tiny_qwen2_vl),
                                 "--adapter", str(tmp_path / "no-adapter")),
                            ["adapter folder", "no-adapter does not exist"]),
        "bad annotation": (_e2e(broken_root, tmp_path / "o4", "--mllm", "oracle"),
                           ["not valid JSON", "download or copy it again"]),
    }
    for name, (argv, want) in cases.items():
        with pytest.raises(SystemExit) as exc:
            main(argv)
        msg = _one_error_line(str(exc.value))
        assert all(w in msg for w in want), (name, msg)
        assert not (Path(argv[argv.index("--out") + 1]) / "results.json").exists()


def test_rda_bad_inputs(synth_root, broken_root, tiny_qwen2_vl, tmp_path, capsys):
    from data_builders.rda import cli

    base = ["--dataset", "cuhk-pedes", "--out", str(tmp_path / "o"), "--no-progress"]
    cases = {
        "missing root": (["--dataset-root", str(tmp_path / "nope"), "--mllm", "oracle", *base],
                         ["--dataset-root", "nope does not exist"]),
        "missing model": (["--dataset-root", str(synth_root), "--mllm", "hf", "--model", "/no/such/qwen", *base],
                          ["/no/such/qwen does not exist", "check the path"]),
        "missing adapter": (["--dataset-root", str(synth_root), "--mllm", "hf", "--model", str(tiny_qwen2_vl),
                             "--adapter", "/no/such/lora", *base], ["adapter folder /no/such/lora does not exist"]),
        "bad annotation": (["--dataset-root", str(broken_root), "--mllm", "oracle", *base], ["not valid JSON"]),
    }
    for name, (argv, want) in cases.items():
        assert cli(argv) == 2, name
        msg = _one_error_line(capsys.readouterr().err)
        assert all(w in msg for w in want), (name, msg)


def test_anchor_pairs_bad_inputs(synth_root, broken_root, tiny_clip, tmp_path, capsys):
    from data_builders.anchor_pairs import cli

    cases = {
        "missing root": (["--dataset-root", str(tmp_path / "nope"), "--retriever", str(tiny_clip)],
                         ["--dataset-root", "does not exist"]),
        "missing retriever": (["--dataset-root", str(synth_root), "--retriever", str(tmp_path / "no-clip")],
                              ["no-clip does not exist"]),
        "bad annotation": (["--dataset-root", str(broken_root), "--retriever", str(tiny_clip)], ["not valid JSON"]),
    }
    for name, (argv, want) in cases.items():
        assert cli([*argv, "--dataset", "cuhk-pedes", "--out", str(tmp_path / "o"), "--no-progress"]) == 2, name
        msg = _one_error_line(capsys.readouterr().err)
        assert all(w in msg for w in want), (name, msg)


@pytest.mark.parametrize("module,extra", [
    ("eval.icl_end2end", ["--retriever", "synth-bow", "--mllm", "oracle"]),
    ("data_builders.rda", ["--mllm", "oracle"]),
    ("data_builders.anchor_pairs", ["--retriever", "clip"]),
])
def test_cli_process_prints_one_line(module, extra, tmp_path):
    """The real command line: exit status non-zero, one error line on stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLLM_TUNE_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", module, "--dataset-root", str(tmp_path / "missing"), "--dataset",
                           "cuhk-pedes", "--out", str(tmp_path / "o"), *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    msg = _one_error_line(proc.stderr)
    assert "missing does not exist" in msg and "pass the folder" in msg
