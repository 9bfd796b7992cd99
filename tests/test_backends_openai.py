"""The OpenAI-compatible backend against a local server on 127.0.0.1 answering like the oracle."""

from __future__ import annotations

import socket

import pytest
from openai_server import OracleServer

from mllm_tune.core.pedes import load_split
from mllm_tune.core.backends import BackendError, CachedBackend, MLLMRequest, make_backend
from mllm_tune.core.prompts import DEFAULT_PROMPTS as P


@pytest.fixture(scope="module")
def split(synth_root):
    return load_split(synth_root, "cuhk-pedes", "test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_matches_oracle_with_retries_and_order(synth_root, split):
    reqs = [MLLMRequest("loc", P.render_loc(t), split.gallery_paths[i % 5]) for i, t in enumerate(split.query_texts[:12])]
    reqs += [MLLMRequest("vqa", P.render_vqa(), split.gallery_paths[1]), MLLMRequest("aggr", P.render_aggr("A man.", ["He wears a hat."]))]
    want = make_backend("oracle", dataset_root=synth_root, loc_rule="identity").generate(reqs)
    with OracleServer(synth_root, fail_first=3) as srv:
        be = make_backend("openai", base_url=srv.base_url, model="oracle", concurrency=4, backoff=0.01)
        assert be.generate(reqs) == want  # order kept under concurrency
        assert be.retries == 3 and srv.completions == len(reqs)
        be.close()


def test_openai_unreachable_and_wrong_model(synth_root, split):
    be = make_backend("openai", base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", backoff=0.01)
    with pytest.raises(BackendError, match="cannot reach"):
        be.generate([MLLMRequest("aggr", "hi")])
    with OracleServer(synth_root) as srv:
        with pytest.raises(BackendError, match="does not serve model"):
            make_backend("openai", base_url=srv.base_url, model="gpt").generate([MLLMRequest("aggr", "hi")])


def test_openai_end_to_end_equals_oracle(synth_root, tmp_path):
    from eval.icl_end2end import main

    common = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", "synth-bow",
              "--no-progress", "--no-plots", "--xi-sweep"]
    ref = main(common + ["--mllm", "oracle", "--oracle-loc-rule", "identity", "--out", str(tmp_path / "oracle")])
    with OracleServer(synth_root) as srv:
        res = main(common + ["--mllm", "openai", "--base-url", srv.base_url, "--model", "oracle",
                             "--concurrency", "4", "--out", str(tmp_path / "openai")])
    assert res["rounds"] == ref["rounds"] and res["calls"] == ref["calls"] and res["refined"] > 0
    assert sum(res["backend_calls"].values()) == srv.completions
    # unreachable server: a clear error and no results.json
    with pytest.raises(SystemExit, match="cannot reach"):
        main(common + ["--mllm", "openai", "--base-url", f"http://127.0.0.1:{_free_port()}/v1", "--model", "x",
                       "--out", str(tmp_path / "down")])
    assert not (tmp_path / "down" / "results.json").exists()
