"""Several OpenAI-compatible servers in one run (issue 18, items 1 and 4): requests spread over the
healthy ones, a failing, hanging or killed server's requests retried elsewhere, a server back in
the pool once its health check passes, and a THI run that loses a server midway finishing with the
undisturbed run's results, no answer asked twice. Fake servers on 127.0.0.1 (tests/openai_server.py)."""

from __future__ import annotations

import json
import time

import pytest
from openai_server import OracleServer

from mllm_tune.core.backends import BackendError, MLLMRequest, make_backend
from mllm_tune.core.backends.openai_compat import parse_base_urls
from mllm_tune.core.pedes import load_split
from mllm_tune.core.prompts import DEFAULT_PROMPTS as P


@pytest.fixture(scope="module")
def split(synth_root):
    return load_split(synth_root, "cuhk-pedes", "test")


@pytest.fixture(scope="module")
def reqs(split):
    out = [MLLMRequest("loc", P.render_loc(t), split.gallery_paths[i % 7]) for i, t in enumerate(split.query_texts[:24])]
    return out + [MLLMRequest("vqa", P.render_vqa(), p) for p in split.gallery_paths[:4]]


@pytest.fixture(scope="module")
def want(synth_root, reqs):
    return make_backend("oracle", dataset_root=synth_root, loc_rule="identity").generate(reqs)


def _backend(servers, **kw):
    kw = {"concurrency": 2, "backoff": 0.01, "health_interval": 0.2, **kw}
    return make_backend("openai", base_url=[s.base_url for s in servers], model="oracle", **kw)


def test_requests_spread_over_two_servers_and_names_are_checked(synth_root, reqs, want):
    with OracleServer(synth_root) as a, OracleServer(synth_root) as b:
        be = _backend([a, b])
        assert be.generate(reqs) == want  # order kept
        st = be.server_stats()
        assert [s["requests"] for s in st["servers"]] == [a.completions, b.completions]
        assert a.completions > 0 and b.completions > 0 and a.completions + b.completions == len(reqs)
        assert st["retries"] == 0 and all(s["errors"] == 0 for s in st["servers"])
        assert "servers" in be.identity() and "base_url" not in be.identity()  # any set of servers: same cache
        be.close()
        # one server of two down at the start: a warning, and the run goes on with the other
        dead = OracleServer(synth_root)
        dead_url = dead.base_url
        dead.httpd.server_close()
        be = make_backend("openai", base_url=[dead_url, a.base_url], model="oracle", backoff=0.01)
        assert be.generate(reqs[:3]) == want[:3] and be.server_stats()["servers"][0]["healthy"] is False
        be.close()
        with pytest.raises(BackendError, match="cannot reach any of the servers"):
            make_backend("openai", base_url=[dead_url, dead_url.replace("/v1", "/api/v1")],
                         model="oracle").generate(reqs[:1])
        assert parse_base_urls([a.base_url, a.base_url + "/"]) == [a.base_url]  # the same server once
    with OracleServer(synth_root) as a, OracleServer(synth_root, model="other") as b:
        with pytest.raises(BackendError, match="must all serve the model name 'oracle'") as err:
            _backend([a, b]).generate(reqs[:1])
        assert b.base_url in str(err.value) and a.base_url in str(err.value) and a.completions == 0


def test_failing_and_hanging_servers_are_retried_elsewhere(synth_root, reqs, want):
    with OracleServer(synth_root, fail_every=True) as bad, OracleServer(synth_root) as good:
        be = _backend([bad, good])
        assert be.generate(reqs) == want
        st = be.server_stats()["servers"]
        assert bad.completions == 0 and good.completions == len(reqs) and st[1]["requests"] == len(reqs)
        assert st[0]["errors"] == bad.failed > 0 and be.retries == bad.failed and st[0]["taken_out"] >= 1
        be.close()
    with OracleServer(synth_root, hang=30) as slow, OracleServer(synth_root) as good:
        be = _backend([slow, good], timeout=0.5, health_interval=60)
        t0 = time.monotonic()
        assert be.generate(reqs) == want
        took = time.monotonic() - t0
        st = be.server_stats()["servers"]
        assert good.completions == len(reqs) and st[0]["errors"] >= 1 and st[0]["healthy"] is False
        assert took < 25  # the hung requests were given up after the 0.5 s timeout, not waited for
        be.close()


def test_a_dead_server_is_put_back_when_its_health_check_passes(synth_root, reqs, want):
    with OracleServer(synth_root) as a, OracleServer(synth_root) as b:
        be = _backend([a, b])
        assert be.generate(reqs[:6]) == want[:6] and a.completions > 0
        port = a.port
        a.kill()
        deadline = time.monotonic() + 10
        while a.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        before = b.completions
        assert be.generate(reqs[6:16]) == want[6:16]
        assert b.completions - before == 10 and be.server_stats()["servers"][0]["healthy"] is False
        with OracleServer(synth_root, port=port) as a2:  # the same URL comes back
            time.sleep(0.3)  # past the health-check interval
            assert be.generate(reqs[16:]) == want[16:]
            st = be.server_stats()["servers"][0]
            assert st["put_back"] == 1 and st["healthy"] and a2.completions > 0
        be.close()


def test_killing_one_of_two_servers_mid_run(synth_root, tmp_path):
    """The fault the issue names: one of two servers dies in the middle of a THI run."""
    from eval.icl_end2end import main

    common = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", "synth-bow",
              "--no-progress", "--no-plots", "--xi-sweep", "--mllm", "openai", "--model", "oracle",
              "--concurrency", "2", "--batch-size", "16"]
    with OracleServer(synth_root) as a, OracleServer(synth_root) as b:
        t0 = time.perf_counter()
        ref = main(common + ["--base-url", a.base_url, "--base-url", b.base_url, "--out", str(tmp_path / "ref")])
        t_ref = time.perf_counter() - t0
    total = sum(ref["backend_calls"].values())
    assert a.completions + b.completions == total and a.completions > 0 and b.completions > 0
    assert [s["requests"] for s in ref["servers"]["servers"]] == [a.completions, b.completions]
    # the same run; server a dies after answering a third of the requests (the URLs come from a file)
    with OracleServer(synth_root, die_after=total // 3) as a, OracleServer(synth_root) as b:
        urls = tmp_path / "servers.txt"
        urls.write_text(f"# two fake servers\n{a.base_url}\n\n{b.base_url}\n")
        t0 = time.perf_counter()
        res = main(common + ["--base-url-file", str(urls), "--out", str(tmp_path / "killed")])
        t_kill = time.perf_counter() - t0
        assert a.dead
    for key in ("base", "rounds", "calls", "refined", "lambda_sweep", "backend_calls"):
        assert res[key] == ref[key], key
    dec = lambda d: (d / "decisions.jsonl").read_text()  # noqa: E731
    assert dec(tmp_path / "killed") == dec(tmp_path / "ref")
    # every answer was given once: none the dead server delivered was asked again
    assert not set(a.answered) & set(b.answered)
    assert len(a.answered) == total // 3 and len(a.answered) + len(b.answered) == total
    sa, sb = res["servers"]["servers"]
    assert sa["requests"] == len(a.answered) and sb["requests"] == len(b.answered)
    assert sa["healthy"] is False and sa["taken_out"] == 1 and sa["errors"] >= 1
    assert res["servers"]["retries"] == sa["errors"] + sb["errors"]
    assert res["config"]["backend_config"]["base_urls"] == [a.base_url, b.base_url]
    report = {"requests_total": total, "undisturbed": [s["requests"] for s in ref["servers"]["servers"]],
              "killed_run": {"a": sa, "b": sb, "retries": res["servers"]["retries"]},
              "wall_ratio_killed_over_undisturbed": round(t_kill / t_ref, 3)}
    print("FAILOVER " + json.dumps(report))
