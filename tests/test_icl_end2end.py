"""The end-to-end harness on SynthPEDES: oracle run, resume after a kill, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.icl_end2end import build_parser, main, run
from mllm_tune.core.backends import make_backend
from spies import Dies, two_process_launch


def _argv(root, out, *extra):
    return ["--dataset-root", str(root), "--dataset", "synthpedes", "--retriever", "synth-bow", "--mllm", "oracle",
            "--oracle-loc-rule", "identity", "--out", str(out), "--no-progress", "--xi-sweep", "0.45", "0.55",
            "--strips", "2", *extra]


def test_oracle_end_to_end_outputs(synth_root, tmp_path):
    res = main(_argv(synth_root, tmp_path / "o"))
    out = tmp_path / "o"
    saved = json.loads((out / "results.json").read_text())
    assert saved["complete"] and saved["simulated"] and "SIMULATION" in saved["simulation_notes"][0]
    for block in [saved["base"], *saved["rounds"]]:
        assert set(block) >= {"R1", "R5", "R10", "mAP", "mINP"}
    assert len(saved["rounds"]) == 5 and saved["rounds"][-1]["R1"] > saved["base"]["R1"]
    assert saved["calls"]["loc"] > 0 and set(saved["calls"]) == {"loc", "vqa", "aggr"}
    assert saved["calls"] == res["calls"] and saved["refined"] == saved["rounds"][-1]["refined"] > 0
    assert [e["xi"] for e in saved["xi_sweep"]] == [0.45, 0.5, 0.55]
    lines = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert len(lines) == saved["num_queries"]
    refined = [x for x in lines if x["refined_round"] is not None]
    assert all(x["anchor_correct"] for x in refined)  # identity oracle: anchors are right by construction
    assert all(x["refined_text"].startswith(x["caption"].rstrip(".")) for x in refined)
    for name in ("metrics_vs_round", "lambda_sweep", "xi_sweep", "top10_strips", "peer_vs_round", "r1_vs_calls"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert "SIMULATION" in (out / "table.md").read_text()
    # the same command again is answered entirely from the cache, with identical numbers
    again = main(_argv(synth_root, tmp_path / "o"))
    assert sum(again["backend_calls"].values()) == 0 and again["rounds"] == saved["rounds"]
    # minimal and exhaustive modes: same numbers, fewer T_loc calls
    ex = main(_argv(synth_root, tmp_path / "ex", "--exhaustive"))
    assert ex["rounds"] == saved["rounds"] and ex["calls"]["loc"] > saved["calls"]["loc"]


def test_killed_run_resumes_without_repeating_calls(synth_root, tmp_path):
    orc = make_backend("oracle", dataset_root=synth_root, loc_rule="identity")
    args = lambda out: build_parser().parse_args(_argv(synth_root, out, "--batch-size", "8", "--no-plots",  # noqa: E731
                                                       "--xi-sweep"))
    whole = Dies(orc, die_at=-1)
    ref = run(args(tmp_path / "ref"), backend=whole)
    first = Dies(orc, die_at=4)
    with pytest.raises(KeyboardInterrupt):
        run(args(tmp_path / "k"), backend=first)
    assert not (tmp_path / "k" / "results.json").exists()  # nothing presented as complete
    assert json.loads((tmp_path / "k" / "run_state.json").read_text())["status"] == "running"
    second = Dies(orc, die_at=-1)
    res = run(args(tmp_path / "k"), backend=second)
    keys = lambda reqs: [(r.task, r.prompt, r.image) for r in reqs]  # noqa: E731
    assert not set(keys(first.asked)) & set(keys(second.asked))  # no repeated call
    assert sorted(keys(first.asked) + keys(second.asked)) == sorted(keys(whole.asked))
    assert res["rounds"] == ref["rounds"] and res["base"] == ref["base"] and res["calls"] == ref["calls"]


def test_queries_without_gallery_positive_fail_clearly(synth_root, tmp_path):
    with pytest.raises(SystemExit, match="no image of their identity in the gallery"):
        main(_argv(synth_root, tmp_path / "bad", "--query-split", "val"))
    assert not (tmp_path / "bad" / "results.json").exists()


@pytest.mark.slow
def test_accelerate_two_processes_match_one(synth_root, tmp_path):
    import os
    import subprocess
    from pathlib import Path

    one = main(_argv(synth_root, tmp_path / "one", "--no-plots"))
    cmd = two_process_launch(_argv(synth_root, tmp_path / "two", "--no-plots"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["processes"] == 2  # really two processes
    shards = [json.loads((tmp_path / "two" / f"shard_{r}.json").read_text()) for r in range(2)]
    assert all(s["queries"] > 0 for s in shards) and sum(s["queries"] for s in shards) == two["num_queries"]
    assert two["base"] == one["base"] and two["rounds"] == one["rounds"] and two["calls"] == one["calls"]
    assert sum(two["main_replay_hits"].values()) > 0 and sum(two["backend_calls"].values()) > 0


def test_with_a_clip_retriever_folder(synth_root, tiny_clip, tmp_path):
    argv = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", str(tiny_clip),
            "--mllm", "oracle", "--out", str(tmp_path / "o"), "--no-progress", "--no-plots", "--xi-sweep",
            "--xi", "-1", "--source", "synthpedes-train", "--target", "synthpedes-test"]
    res = main(argv)
    assert res["complete"] and res["config"]["source"] == "synthpedes-train"
    assert any((tmp_path / "o" / "features").iterdir())  # gallery features cached for the next run
    assert res["refined"] > 0  # ξ = -1: every top-1 is above ξ, so round 0 decides (oracle Yes -> refined)
    assert res["calls"]["loc"] == res["num_queries"]  # minimal mode: one T_loc per query


@pytest.mark.slow
def test_sigkilled_process_resumes_from_cache(synth_root, tmp_path):
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    extra = ("--batch-size", "4", "--no-plots", "--xi-sweep", "--oracle-latency", "0.02")
    ref = main(_argv(synth_root, tmp_path / "ref", *extra))
    total = sum(ref["backend_calls"].values())
    out = tmp_path / "k"
    proc = subprocess.Popen([sys.executable, "-m", "eval.icl_end2end", *_argv(synth_root, out, *extra)],
                            cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = out / "cache" / "answers.sqlite"
    rows, deadline = 0, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if db.exists():
            try:
                with sqlite3.connect(db, timeout=30) as con:
                    rows = con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
            except sqlite3.OperationalError:  # the file exists a moment before its table does
                continue
            if rows >= 12:
                break
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()
    with sqlite3.connect(db) as con:
        kept = con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert 12 <= kept < total
    res = main(_argv(synth_root, out, *extra))
    assert sum(res["backend_calls"].values()) == total - kept  # nothing asked twice
    assert res["rounds"] == ref["rounds"] and res["calls"] == ref["calls"]


def test_no_argument_default_runs_the_shipped_demo_models(tmp_path, monkeypatch):
    """`python -m eval.icl_end2end` with no arguments: the shipped models through the hf backend
    (not the oracle), at the ξ calibrated for the shipped retriever."""
    from eval.icl_end2end import build_parser, default_args
    from synthpedes.demo_assets import DEMO_THI_XI, demo_model

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(default_args())
    assert args.mllm == "hf" and Path(args.model) == demo_model("synthpedes-vl")
    assert Path(args.retriever) == demo_model("clip-synthpedes")
    assert args.xi == DEMO_THI_XI and args.dataset == "synthpedes" and args.split == "test"
    assert (Path(args.dataset_root) / "reid_raw.json").is_file()  # generated on first use


# -- vLLM engine controls on the command line (issue 11, item 5) --------------------------------

VLLM_FLAGS = ["--vllm-gpu-memory-utilization", "0.6", "--vllm-max-model-len", "4096", "--vllm-max-num-seqs", "16",
              "--vllm-tensor-parallel-size", "2", "--vllm-enforce-eager", "--vllm-dtype", "bfloat16",
              "--vllm-engine-kwargs", '{"swap_space": 8}']
VLLM_KW = {"gpu_memory_utilization": 0.6, "max_model_len": 4096, "max_num_seqs": 16, "tensor_parallel_size": 2,
           "enforce_eager": True, "dtype": "bfloat16", "engine_kwargs": {"swap_space": 8}}


def test_vllm_engine_flags_reach_make_backend(synth_root, tiny_qwen2_vl, tmp_path, monkeypatch):
    import eval.icl_end2end as e2e
    import data_builders.rda as rda

    seen: list[tuple[str, dict]] = []

    def fake_make_backend(kind, **kw):
        seen.append((kind, kw))
        return make_backend("oracle", dataset_root=synth_root)  # answers from here on, as a stand-in

    monkeypatch.setattr(e2e, "make_backend", fake_make_backend)
    argv = ["--dataset-root", str(synth_root), "--dataset", "synthpedes", "--retriever", "synth-bow", "--out",
            str(tmp_path / "v"), "--no-progress", "--no-plots", "--xi-sweep", "--mllm", "vllm", "--model",
            str(tiny_qwen2_vl), *VLLM_FLAGS]
    res = e2e.main(argv)
    kind, kw = seen[0]
    assert kind == "vllm" and {k: kw[k] for k in VLLM_KW} == VLLM_KW and kw["model"] == str(tiny_qwen2_vl)
    assert res["config"]["backend_config"]["vllm_engine"] == VLLM_KW
    assert res["config"]["retriever_moved_to_cpu"] is False  # no CUDA here: nothing to free
    # only the flags given are passed
    seen.clear()
    e2e.build_backend(e2e.build_parser().parse_args(argv[: argv.index("--vllm-gpu-memory-utilization")]), None)
    assert not set(seen[0][1]) & (set(VLLM_KW) - {"dtype"}) and seen[0][1]["dtype"] == "auto"
    with pytest.raises(SystemExit, match="error: --vllm-engine-kwargs is not valid JSON"):
        e2e.main([*argv[:-1], "{swap_space: 8"])
    with pytest.raises(SystemExit, match="must be a JSON object"):
        e2e.main([*argv[:-1], "[1, 2]"])
    # RDA takes the same flags
    a = rda.parse_args(["--dataset-root", str(synth_root), "--dataset", "cuhk-pedes", "--out", str(tmp_path / "r"),
                        "--mllm", "vllm", "--model", str(tiny_qwen2_vl), *VLLM_FLAGS])
    monkeypatch.setattr("mllm_tune.core.backends.make_backend", fake_make_backend)
    seen.clear()
    rda.build_backend(a, None)
    assert seen[0][0] == "vllm" and {k: seen[0][1][k] for k in VLLM_KW} == VLLM_KW


def test_release_gpu_moves_the_retriever_to_cpu(synth_root, tiny_clip, tmp_path, monkeypatch):
    import torch

    from eval.icl_end2end import _Retrieval
    from mllm_tune.core.pedes import load_split

    split = load_split(synth_root, "cuhk-pedes", "test")
    r = _Retrieval(str(tiny_clip), synth_root, split.gallery_paths[:4], split.query_texts[:3], tmp_path / "f")
    before = r.encode_text(["a man in a red coat"])
    assert r.release_gpu() is False  # CPU only: nothing to do
    freed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    assert r.release_gpu() is True and freed and r.model.device == torch.device("cpu")
    assert torch.allclose(r.encode_text(["a man in a red coat"]), before)  # THI can still encode rewrites


def test_peer_metrics_calls_per_round_and_cross_domain_title(synth_root, tmp_path):
    res = main(_argv(synth_root, tmp_path / "p", "--retriever-trained-on", "cuhk-pedes", "--no-plots"))
    peer = res["peer_metrics"]
    assert [p["round"] for p in peer] == list(range(len(res["rounds"]) + 1))
    # Recall@K is Rank-K, round by round; Hits@K never falls; BRI is computed from the same ranks
    for p, m in zip(peer, [res["base"], *res["rounds"]]):
        assert p["Recall@1"] == pytest.approx(m["R1"], abs=1e-3) and p["Recall@10"] == pytest.approx(m["R10"], abs=1e-3)
    hits = [p["Hits@1"] for p in peer]
    assert hits == sorted(hits) and hits[-1] >= peer[-1]["Recall@1"] and peer[-1]["BRI"] <= peer[0]["BRI"] + 1e-9
    by_round = res["calls_by_round"]
    assert by_round[-1]["cumulative"] == sum(res["calls"].values())  # the curve adds up to what THI asked
    assert res["calls_per_query"]["loc"] == pytest.approx(res["calls"]["loc"] / res["num_queries"], abs=1e-4)
    table = (tmp_path / "p" / "table.md").read_text()
    assert table.splitlines()[1].startswith("cuhk-pedes -> synthpedes (test)") and "BRI" in table
    assert res["config"]["source"] == "cuhk-pedes" and res["paper_comparison"] is None


def test_run_without_matplotlib_keeps_its_results(synth_root, tmp_path, monkeypatch, caplog):
    """A venv without matplotlib (or a failing figure) costs the plots, not the finished run."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.delitem(sys.modules, "eval.plots", raising=False)
    with caplog.at_level("WARNING", logger="eval.icl_end2end"):
        res = main(_argv(synth_root, tmp_path / "o", "--strips", "0"))
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    assert saved["complete"] and saved["rounds"] == res["rounds"] and "figures" not in saved
    assert saved["figures_error"].startswith("ModuleNotFoundError")
    assert "pip install matplotlib" in caplog.text and not list((tmp_path / "o").glob("*.png"))
    assert json.loads((tmp_path / "o" / "run_state.json").read_text())["status"] == "complete"
