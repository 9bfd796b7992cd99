"""Answer caches across processes and nodes: one file per process, merged atomically, resumed with
any number of processes; network file systems detected (issue 18, item 2)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest

import eval.icl_end2end as e2e
from mllm_tune.core.backends import CachedBackend, MLLMBackend, MLLMRequest, make_backend
from mllm_tune.core.backends import cache as cache_mod
from mllm_tune.core.backends.cache import (filesystem_type, is_network_fs, merge_caches, merge_shards, shard_files)
from spies import Dies, two_process_launch


class Counting(MLLMBackend):
    kind = "counting"

    def __init__(self) -> None:
        self.seen: list[MLLMRequest] = []

    def identity(self):
        return {"kind": "counting"}

    def generate(self, requests):
        self.seen.extend(requests)
        return [f"{r.task}:{r.prompt}" for r in requests]


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as con:
        return con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def test_shards_merge_atomically_and_a_shard_reads_the_merged_cache(tmp_path):
    c = tmp_path / "cache"
    for rank, prompts in ((0, "abc"), (1, "cde"), (7, "x")):  # "c" in two shards: one row after the merge
        cb = CachedBackend(Counting(), c, shard=rank)
        cb.generate([MLLMRequest("aggr", p) for p in prompts])
        assert cb.path.name == f"shard-{rank}.sqlite" and len(cb) == len(prompts)
        cb.close()
    assert [p.name for p in shard_files(c)] == ["shard-0.sqlite", "shard-1.sqlite", "shard-7.sqlite"]
    assert not list(c.glob("*-wal"))  # shard files use a rollback journal: no WAL on a shared disk
    got = merge_shards(c)
    assert got["shards"] == 3 and got["rows"] == 6 and shard_files(c) == []
    assert merge_shards(c)["rows"] == 6  # idempotent
    assert not list(c.glob(".*.tmp"))  # the temporary file became answers.sqlite
    # a process of a resumed run (any rank) answers from the merged file and asks only what is new
    inner = Counting()
    cb = CachedBackend(inner, c, shard=3)
    assert cb.generate([MLLMRequest("aggr", p) for p in "abcdexy"])[0] == "aggr:a"
    assert [r.prompt for r in inner.seen] == ["y"] and len(cb) == 7
    cb.close()
    # a single-process (WAL) cache merged with a shard: its WAL is folded in first
    one = CachedBackend(Counting(), tmp_path / "single")
    one.generate([MLLMRequest("aggr", "w1"), MLLMRequest("aggr", "a")])
    one.close()
    assert merge_caches(tmp_path / "single" / "answers.sqlite", [c]) == 8
    assert not (tmp_path / "single" / "answers.sqlite-wal").exists()


def test_merge_command(tmp_path, capsys):
    for name, prompts in (("r1", "ab"), ("r2", "bc")):
        cb = CachedBackend(Counting(), tmp_path / name)
        cb.generate([MLLMRequest("aggr", p) for p in prompts])
        cb.close()
    assert cache_mod.main(["merge", str(tmp_path / "out"), str(tmp_path / "r1"),
                           str(tmp_path / "r2" / "answers.sqlite")]) == 0
    assert "3 answers" in capsys.readouterr().out and _rows(tmp_path / "out" / "answers.sqlite") == 3
    assert cache_mod.main(["merge", str(tmp_path / "o2"), str(tmp_path / "nope")]) == 2
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not sqlite")
    assert cache_mod.main(["merge", str(tmp_path / "o3"), str(bad)]) == 2


MOUNTS = """sysfs /sys sysfs rw 0 0
/dev/sda1 / ext4 rw 0 0
server:/export /shared nfs4 rw,vers=4.2 0 0
lfs@o2ib:/scratch /shared/scratch lustre rw 0 0
sshfs#me@h: /mnt/ssh fuse.sshfs rw 0 0
tmpfs /shared/scratch/tmp tmpfs rw 0 0
"""


def test_network_file_systems_are_told_and_the_shared_layout_warns(tmp_path, monkeypatch, caplog):
    kind = lambda p: filesystem_type(p, MOUNTS)  # noqa: E731
    assert kind("/shared/runs/cache") == "nfs4" and kind("/shared/scratch/x") == "lustre"
    assert kind("/shared/scratch/tmp/x") == "tmpfs" and kind("/home/me") == "ext4" and kind("/mnt/ssh/a") == "fuse.sshfs"
    assert is_network_fs("nfs4") and is_network_fs("lustre") and is_network_fs("fuse.sshfs") and is_network_fs("gpfs")
    assert not is_network_fs("ext4") and not is_network_fs("tmpfs") and not is_network_fs(None)
    assert filesystem_type(tmp_path) is not None  # this machine's /proc/mounts
    monkeypatch.setattr(cache_mod, "filesystem_type", lambda p, mounts=None: "nfs4")
    with caplog.at_level("WARNING"):
        cb = CachedBackend(Counting(), tmp_path / "shared")
    assert "network file system (nfs4)" in caplog.text and "docs/multinode.md" in caplog.text
    assert cb._db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    cb.close()
    caplog.clear()
    with caplog.at_level("WARNING"):
        CachedBackend(Counting(), tmp_path / "sharded", shard=0).close()  # one file per process: no warning
    assert "network file system" not in caplog.text


# -- sharded runs of the harness, processes played by threads ------------------------------------

class _State:
    """What run() uses of accelerate's PartialState; the barrier is shared by the 'processes'."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.barrier = rank, world, barrier

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=300)


def _args(root, out):
    return e2e.build_parser().parse_args([
        "--dataset-root", str(root), "--dataset", "synthpedes", "--retriever", "synth-bow", "--mllm", "oracle",
        "--oracle-loc-rule", "identity", "--out", str(out), "--no-progress", "--no-plots", "--xi-sweep",
        "--batch-size", "8"])


def _sharded(monkeypatch, root, out, backends: list[Dies]) -> tuple[dict, list[BaseException]]:
    """run() in len(backends) threads standing in for processes; returns rank 0's results and errors."""
    world = len(backends)
    barrier = threading.Barrier(world)
    local = threading.local()
    monkeypatch.setattr(e2e, "_dist_state", lambda: local.state)
    results: dict = {}
    errors: list[BaseException] = []

    def proc(rank: int) -> None:
        local.state = _State(rank, world, barrier)
        try:
            res = e2e.run(_args(root, out), backend=backends[rank])
            if rank == 0:
                results.update(res)
        except BaseException as exc:  # noqa: BLE001 - a killed 'process'; the others must not wait forever
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=proc, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    return results, errors


def _keys(reqs):
    return [(r.task, r.prompt, r.image) for r in reqs]


def test_killed_sharded_run_resumes_with_other_process_counts(synth_root, tmp_path, monkeypatch):
    orc = make_backend("oracle", dataset_root=synth_root, loc_rule="identity")
    whole = Dies(orc)
    ref = e2e.run(_args(synth_root, tmp_path / "ref"), backend=whole)
    out, cache = tmp_path / "k", tmp_path / "k" / "cache"
    # 1. two processes, both killed in their third batch: their shard files keep what they had answered
    first = [Dies(orc, die_at=3), Dies(orc, die_at=3)]
    res, errors = _sharded(monkeypatch, synth_root, out, first)
    assert res == {} and errors and not (out / "results.json").exists()
    kept = {p.name: _rows(p) for p in shard_files(cache)}
    assert set(kept) == {"shard-0.sqlite", "shard-1.sqlite"} and all(kept.values())
    asked_1 = [k for b in first for k in _keys(b.asked)]
    assert sum(kept.values()) == len(set(asked_1))
    # 2. resumed with three processes: both old shards merged first, nothing asked twice, finished
    second = [Dies(orc) for _ in range(3)]
    res, errors = _sharded(monkeypatch, synth_root, out, second)
    assert not errors, errors
    asked_2 = [k for b in second for k in _keys(b.asked)]
    assert not set(asked_1) & set(asked_2)  # no answer asked again after the kill
    assert res["config"]["processes"] == 3 and res["rounds"] == ref["rounds"] and res["calls"] == ref["calls"]
    assert res["base"] == ref["base"] and sum(res["main_replay_hits"].values()) > 0
    assert shard_files(cache) == [] and _rows(cache / "answers.sqlite") == len(set(asked_1) | set(asked_2))
    assert set(asked_1) | set(asked_2) >= set(_keys(whole.asked))  # sharding may ask a VQA in two shards
    assert json.loads((out / "run_state.json").read_text())["status"] == "complete"
    # 3. and once more in one process: everything from the merged cache
    monkeypatch.setattr(e2e, "_dist_state", lambda: None)
    third = Dies(orc)
    again = e2e.run(_args(synth_root, out), backend=third)
    assert third.asked == [] and again["rounds"] == ref["rounds"]


def test_shards_left_by_a_killed_run_join_a_single_process_resume(synth_root, tmp_path, monkeypatch):
    orc = make_backend("oracle", dataset_root=synth_root, loc_rule="identity")
    ref = e2e.run(_args(synth_root, tmp_path / "ref"), backend=Dies(orc))
    out = tmp_path / "k"
    first = [Dies(orc, die_at=4) for _ in range(2)]
    _sharded(monkeypatch, synth_root, out, first)
    assert len(shard_files(out / "cache")) == 2
    monkeypatch.setattr(e2e, "_dist_state", lambda: None)
    second = Dies(orc)
    res = e2e.run(_args(synth_root, out), backend=second)
    assert not {k for b in first for k in _keys(b.asked)} & set(_keys(second.asked))
    assert res["rounds"] == ref["rounds"] and shard_files(out / "cache") == []


@pytest.mark.slow
def test_sigkilled_two_process_run_resumes_in_one(synth_root, tmp_path):
    """Real processes: a 2-process `accelerate launch` run is SIGKILLed midway (its shard files keep
    what they had answered) and resumed by a 1-process run, which asks none of those answers again."""
    import os
    import signal
    import subprocess
    import time

    from mllm_tune.core.backends.cache import identity_hash, request_key
    from mllm_tune.core.prompts import load_prompts

    extra = ["--oracle-latency", "0.2", "--batch-size", "4"]
    argv = lambda out: [*_argv_list(synth_root, out), *extra]  # noqa: E731
    out = tmp_path / "k"
    cmd = two_process_launch(argv(out))
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rows, deadline = {}, time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                rows = {p.name: _rows(p) for p in shard_files(out / "cache")}
            except sqlite3.OperationalError:  # a shard being created or written this instant
                continue
            if len(rows) == 2 and min(rows.values()) >= 3:
                break
        assert proc.poll() is None, "the run finished (or failed) before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both processes
        proc.wait(timeout=60)
        # the workers can outlive the launcher by a moment: read the shards only once all are gone
        gone_by = time.time() + 30
        while time.time() < gone_by:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    assert not (out / "results.json").exists()
    kept: set[str] = set()
    for p in shard_files(out / "cache"):
        with sqlite3.connect(p) as con:
            kept |= {k for (k,) in con.execute("SELECT key FROM answers")}
    assert len(kept) >= 6
    args = e2e.build_parser().parse_args(argv(out))
    second = Dies(e2e.build_backend(args, load_prompts(None)))  # the same backend identity as the killed run
    res = e2e.run(args, backend=second)
    ident = identity_hash(second.identity())
    assert not {request_key(ident, r) for r in second.asked} & kept  # nothing asked twice
    ref = e2e.run(e2e.build_parser().parse_args(argv(tmp_path / "ref")),
                  backend=e2e.build_backend(args, load_prompts(None)))
    assert res["rounds"] == ref["rounds"] and res["calls"] == ref["calls"]
    # the resumed run asked at most what the undisturbed run holds minus what was kept (fewer when a
    # dying worker still wrote an answer after `kept` was read: those are reused, not asked)
    assert sum(res["backend_calls"].values()) + len(kept) <= _rows(tmp_path / "ref" / "cache" / "answers.sqlite")
    assert shard_files(out / "cache") == [] and res["config"]["processes"] == 1
    print("RESUME " + json.dumps({"killed_shard_rows": rows, "kept_answers": len(kept),
                                  "resume_backend_calls": sum(res["backend_calls"].values()),
                                  "undisturbed_backend_calls": sum(ref["backend_calls"].values())}))


def _argv_list(root, out):
    return ["--dataset-root", str(root), "--dataset", "synthpedes", "--retriever", "synth-bow", "--mllm", "oracle",
            "--oracle-loc-rule", "identity", "--out", str(out), "--no-progress", "--no-plots", "--xi-sweep"]
