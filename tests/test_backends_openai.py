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


# -- T_loc as a probability (issue 13) ---------------------------------------------------------------

def _loc_reqs(split, n=12):
    return [MLLMRequest("loc", P.render_loc(t), split.gallery_paths[(2 * i) % 9]) for i, t in enumerate(split.query_texts[:n])]


def test_openai_localize_reads_p_yes_from_the_first_tokens_top_logprobs(synth_root, split, caplog, tmp_path):
    from mllm_tune.core.backends import LocAnswer

    reqs = _loc_reqs(split)
    oracle = make_backend("oracle", dataset_root=synth_root, loc_rule="identity")
    texts = oracle.generate(reqs)
    with OracleServer(synth_root) as srv:
        be = make_backend("openai", base_url=srv.base_url, model="oracle", concurrency=3)
        ident = be.identity()
        with caplog.at_level("WARNING"):
            out = be.localize(reqs)
        assert "logprobs" not in caplog.text and be.scores_loc is True
        assert srv.logprob_requests == len(reqs)
        assert [a.text for a in out] == texts and all(isinstance(a, LocAnswer) for a in out)
        assert all(0.0 <= a.p_yes <= 1.0 for a in out) and {a.text for a in out} == {"Yes", "No"}
        assert all((a.p_yes > 0.5) == (a.text == "Yes") for a in out)
        if getattr(oracle, "scores_loc", False):  # the server spreads the oracle's p_yes over Yes/No variants
            want = oracle.localize(reqs)
            assert [a.p_yes for a in out] == pytest.approx([w.p_yes for w in want], abs=1e-6)
        assert be.loc_score_stats() == {"scored": len(reqs)}
        assert be.generate(reqs[:2]) == texts[:2] and srv.logprob_requests == len(reqs)  # generate asks none
        assert be.identity() == ident
        with pytest.raises(ValueError, match="T_loc requests only"):
            be.localize([MLLMRequest("aggr", "merge")])
        be.close()
        # scoring does not change the cache identity: the scored answers serve generate() from the cache
        cached = CachedBackend(make_backend("openai", base_url=srv.base_url, model="oracle"), tmp_path / "c")
        cached.localize(reqs[:4])
        before = srv.completions
        assert cached.generate(reqs[:4]) == texts[:4] and srv.completions == before
        cached.close()


@pytest.mark.parametrize("mode", [False, "unmatched"])
def test_openai_localize_without_usable_logprobs_keeps_the_text_and_warns_once(synth_root, split, caplog, mode):
    reqs = _loc_reqs(split, 8)
    texts = make_backend("oracle", dataset_root=synth_root, loc_rule="identity").generate(reqs)
    with OracleServer(synth_root, logprobs=mode) as srv:
        be = make_backend("openai", base_url=srv.base_url, model="oracle", concurrency=2)
        with caplog.at_level("WARNING", logger="mllm_tune.core.backends.openai_compat"):
            first = be.localize(reqs[:5])
            second = be.localize(reqs[5:])
        out = first + second
        assert [a.text for a in out] == texts and all(a.p_yes is None for a in out)
        warnings = [r for r in caplog.records if "p_yes" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        if mode is False:
            assert "sent no logprobs" in warnings[0].getMessage() and be.scores_loc is False
            assert be.loc_score_stats() == {"no logprobs": 8}
        else:
            assert "none of the first token's top 20 logprobs is a Yes/No token" in warnings[0].getMessage()
            assert be.scores_loc is True and be.loc_score_stats() == {"no Yes/No token": 8}
        be.close()


def test_p_yes_from_top_logprobs_matches_exact_token_text():
    import math

    from mllm_tune.core.backends.openai_compat import p_yes_from_top_logprobs

    lp = math.log
    obj = {"content": [{"token": "Yes", "logprob": lp(0.6), "top_logprobs": [
        {"token": "Yes", "logprob": lp(0.6)}, {"token": "No", "logprob": lp(0.2)}, {"token": " yes", "logprob": lp(0.1)},
        {"token": "Yes", "logprob": lp(0.05)},  # another id with the same text: summed
        {"token": "Yeah", "logprob": lp(0.05)}]}]}
    p, how = p_yes_from_top_logprobs(obj)
    assert how == "scored" and p == pytest.approx(0.75 / 0.95)
    # the chosen token counts when the server's top list lacks it (top_logprobs 0)
    assert p_yes_from_top_logprobs({"content": [{"token": "No", "logprob": -0.1, "top_logprobs": []}]}) == (0.0, "scored")
    assert p_yes_from_top_logprobs(None) == (None, "no logprobs")
    assert p_yes_from_top_logprobs({"content": []}) == (None, "no logprobs")
    assert p_yes_from_top_logprobs({"content": [{"token": "The", "logprob": -0.1,
                                                 "top_logprobs": [{"token": "A", "logprob": -3}]}]}) == (None, "no Yes/No token")


def test_a_reply_cut_off_after_its_headers_is_retried_on_the_other_server(synth_root, split):
    """What a real vLLM server SIGKILLed mid-reply does (tests/test_vllm_real.py found it): status 200
    and Content-Length arrive, the body stops short (http.client.IncompleteRead). The request is
    retried on the other server, not fatal."""
    reqs = _loc_reqs(split, 10)
    want = make_backend("oracle", dataset_root=synth_root, loc_rule="identity").generate(reqs)
    with OracleServer(synth_root, cut_after=3) as a, OracleServer(synth_root) as b:
        be = make_backend("openai", base_url=[a.base_url, b.base_url], model="oracle", concurrency=1,
                          backoff=0.01, health_interval=60)
        assert be.generate(reqs) == want
        st = be.server_stats()
        assert a.cut == 1 and a.completions == 3 and b.completions == len(reqs) - 3
        assert st["servers"][0]["requests"] == 3 and st["servers"][0]["healthy"] is False
        assert st["servers"][0]["errors"] >= 1 and "IncompleteRead" in st["servers"][0]["last_error"]
        assert st["retries"] == st["servers"][0]["errors"]
        be.close()
