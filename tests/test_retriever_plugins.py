"""Any retriever as f_cross: a plugin spec and a folder of precomputed features give the same base
metrics and THI decisions as the equivalent built-in CLIP run; every bad plugin says what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mllm_tune.core.retrievers import RetrieverLoadError, load_retriever
from mllm_tune.core.pedes import load_pedes


def _eval(root, retriever, out):
    from eval.icl_end2end import main

    main(["--dataset-root", str(root), "--dataset", "synthpedes", "--retriever", retriever, "--mllm", "oracle",
          "--out", str(out), "--no-progress", "--no-plots", "--xi-sweep", "--lambda-sweep", "--xi", "0.3"])
    res = json.loads((out / "results.json").read_text())
    decisions = [(d["query"], d["candidates"], d["loc"], d["anchor"], d["refined_round"], d["refined_text"])
                 for d in map(json.loads, (out / "decisions.jsonl").read_text().splitlines())]
    return res, decisions


@pytest.fixture(scope="module")
def features_dir(synth_root, tiny_clip, tmp_path_factory):
    """The built-in CLIP's features of the test split, stored as a features:DIR folder."""
    from safetensors.torch import save_file

    split = load_pedes(synth_root, "synthpedes").split("test")
    r = load_retriever(str(tiny_clip))
    d = tmp_path_factory.mktemp("features")
    save_file({"x": r.encode_images(split.gallery_paths, progress=False)}, d / "gallery.safetensors")
    save_file({"x": r.encode_texts(split.query_texts, progress=False)}, d / "queries.safetensors")
    (d / "gallery_paths.json").write_text(json.dumps([str(p) for p in split.gallery_paths]))
    (d / "queries.json").write_text(json.dumps(list(split.query_texts)))
    (d / "features.json").write_text(json.dumps({"text_encoder": str(tiny_clip), "name": "tiny-clip-test"}))
    return d


def test_plugin_and_features_equal_the_builtin_run(synth_root, tiny_clip, features_dir, tmp_path):
    ref, ref_dec = _eval(synth_root, str(tiny_clip), tmp_path / "builtin")
    plug, plug_dec = _eval(synth_root, f"example_retriever_plugin:build?folder={tiny_clip}", tmp_path / "plugin")
    feat, feat_dec = _eval(synth_root, f"features:{features_dir}", tmp_path / "features")
    assert ref["rounds"][-1]["refined"] > 0  # THI did rewrite queries: the text encoder was used
    for other, dec in ((plug, plug_dec), (feat, feat_dec)):
        assert other["base"] == pytest.approx(ref["base"], abs=1e-4)
        assert [r["R1"] for r in other["rounds"]] == pytest.approx([r["R1"] for r in ref["rounds"]], abs=1e-4)
        assert dec == ref_dec
    assert plug["config"]["retriever_identity"].startswith("my-plugin-")


def test_the_miner_takes_a_plugin(synth_root, tiny_clip, tmp_path):
    from data_builders.anchor_pairs import main

    main(["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever",
          f"example_retriever_plugin:build?folder={tiny_clip}", "--out", str(tmp_path / "pairs"), "--no-progress"])
    stats = json.loads((tmp_path / "pairs" / "stats.json").read_text())
    assert "my-plugin-" in json.dumps(stats) and (tmp_path / "pairs" / "pairs.jsonl").stat().st_size > 0


def test_features_folder_refuses_another_split(synth_root, features_dir):
    split = load_pedes(synth_root, "synthpedes").split("train")
    r = load_retriever(f"features:{features_dir}")
    with pytest.raises(RetrieverLoadError, match="does not match gallery_paths.json"):
        r.encode_images(split.gallery_paths)
    test = load_pedes(synth_root, "synthpedes").split("test")
    shuffled = list(test.query_texts)[::-1]
    with pytest.raises(RetrieverLoadError, match="captions do not match queries.json"):
        r.encode_texts(shuffled)
    assert torch.equal(r.encode_texts(list(test.query_texts)), r.inner.queries)


@pytest.mark.parametrize("factory, message", [
    ("build_bad_shape", r"encode_texts returned shape \(3, 4\) for 2 inputs"),
    ("build_not_normalised", "not L2-normalised"),
])
def test_bad_plugin_outputs(tiny_clip, factory, message):
    r = load_retriever(f"example_retriever_plugin:{factory}?folder={tiny_clip}")
    with pytest.raises(RetrieverLoadError, match=message):
        r.encode_texts(["a man", "a woman"])


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
    ("example_retriever_plugin:nothing", "has no callable 'nothing'"),
    ("example_retriever_plugin:build_missing_method?folder=x", "has no encode_texts"),
    ("example_retriever_plugin:build?colour=red", r"build\(colour\) failed"),
    ("features:/no/such/dir", "is not a folder"),
])
def test_bad_plugin_specs(spec, message):
    with pytest.raises(RetrieverLoadError, match=message):
        load_retriever(spec)
