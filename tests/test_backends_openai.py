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
    # the budget the server is stated to run with, and tokens computed from it (not measured)
    assert res["config"]["pixel_budget"]["min_pixels"] == res["config"]["pixel_budget"]["max_pixels"] == 50_176
    assert res["visual_tokens"]["images"] > 0 and res["visual_tokens"]["measured"].startswith("not measured: expected")
    assert res["config"]["decoding"]["request_fields"]["repetition_penalty"] == 1.0
    assert ref["config"]["pixel_budget"] == "not applicable"
    # unreachable server: a clear error and no results.json
    with pytest.raises(SystemExit, match="cannot reach"):
        main(common + ["--mllm", "openai", "--base-url", f"http://127.0.0.1:{_free_port()}/v1", "--model", "x",
                       "--out", str(tmp_path / "down")])
    assert not (tmp_path / "down" / "results.json").exists()


def test_openai_greedy_fields_caps_and_budget(split, caplog):
    """What each request asks the server for (issue 11, items 1 and 3), seen by a recording server."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mllm_tune.core.backends import DEFAULT_MAX_NEW_TOKENS

    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "m"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            cut = body["max_tokens"] == DEFAULT_MAX_NEW_TOKENS["vqa"]  # pretend the VQA answer ran out
            self._send({"choices": [{"message": {"content": "Yes"}, "finish_reason": "length" if cut else "stop"}]})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        be = make_backend("openai", base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", model="m")
        reqs = [MLLMRequest("loc", P.render_loc("A man."), split.gallery_paths[0]),
                MLLMRequest("vqa", P.render_vqa(), split.gallery_paths[1]), MLLMRequest("aggr", "merge")]
        with caplog.at_level("WARNING"):
            assert be.generate(reqs) == ["Yes"] * 3
        be.close()
    finally:
        httpd.shutdown()
        httpd.server_close()
    by_prompt = {b["messages"][0]["content"][-1]["text"]: b for b in bodies}
    for r in reqs:
        b = by_prompt[r.prompt]
        assert b["max_tokens"] == DEFAULT_MAX_NEW_TOKENS[r.task]
        assert b["temperature"] == 0.0 and b["repetition_penalty"] == 1.0 and b["top_k"] == -1
    assert "1 of 3 answers hit the max_new_tokens cap" in caplog.text and be.capped == {"vqa": 1}
    stats = be.visual_token_stats()
    assert stats["images"] == 2 and "not measured" in stats["measured"]
    from PIL import Image

    from mllm_tune.core.backends.base import expected_visual_tokens

    sizes = [Image.open(split.gallery_paths[i]).size for i in (0, 1)]
    assert stats["mean_visual_tokens"] == sum(expected_visual_tokens(w, h, 50_176, 50_176) for w, h in sizes) / 2
    assert be.identity()["pixels"]["min"] == 50_176
    plain = make_backend("openai", model="m", greedy_extras=False)
    assert "repetition_penalty" not in plain.sampling_fields() and plain.identity() != be.identity()


def test_an_adapter_vllm_cannot_serve_is_refused_before_any_request(tmp_path):
    import json

    from mllm_tune.core.backends import BackendError, make_backend

    ad = tmp_path / "lora"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                        "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}))
    with pytest.raises(BackendError, match="modules_to_save"):
        make_backend("openai", base_url="http://127.0.0.1:9/v1", model="anchor", adapter=str(ad))
