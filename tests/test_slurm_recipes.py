"""recipes/slurm/*.sbatch without Slurm: the scripts run under bash with stand-ins for srun,
scontrol, curl and the launched programs (each records its arguments), so a change that breaks
their quoting or their variables fails here. They also ran for real on a CPU Slurm cluster
(docs/multinode.md)."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "recipes" / "slurm"

# stand-ins: each appends its argv (one line, shell-quoted) to $STUB_LOG/NAME.log
STUBS = {
    "scontrol": 'printf "%s\\n" nodeA nodeB',
    # srun: run the step's command once per node, with that node's SLURM_NODEID, as srun would
    "srun": 'echo "$SRUN_CPUS_PER_TASK" >> "$STUB_LOG/srun_cpus.log"; while [[ "$1" == --* ]]; do shift; done; '
            'for id in 0 1; do SLURM_NODEID=$id "$@"; done',
    "curl": 'echo \'{"data": [{"id": "anchor"}]}\'',
    "python": "",
    "accelerate": "",
    "vllm": "",
    "hostname": "echo nodeA",
}


@pytest.fixture()
def stubs(tmp_path: Path) -> dict[str, str]:
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/bash\nprintf "%q " "$@" >> "$STUB_LOG/{name}.log"; echo >> "$STUB_LOG/{name}.log"\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", STUB_LOG=str(log_dir), SLURM_JOB_NODELIST="nodeA,nodeB",
               SLURM_JOB_NUM_NODES="2", SLURM_GPUS_PER_NODE="4", SLURM_CPUS_PER_TASK="32")
    return env


def _calls(env: dict[str, str], name: str) -> list[list[str]]:
    log = Path(env["STUB_LOG"]) / f"{name}.log"
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _run(script: str, env: dict[str, str], cwd: Path, **extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run(["bash", str(SLURM / script)], cwd=cwd, env={**env, **extra}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run


def test_sharded_script_launches_one_process_group_over_all_nodes(stubs, tmp_path):
    _run("thi-sharded.sbatch", stubs, tmp_path, OUT=str(tmp_path / "out"), PROCS_PER_NODE="2")
    launches = _calls(stubs, "accelerate")
    assert len(launches) == 2  # one launcher per node
    assert _calls(stubs, "srun_cpus") == [["32"]]  # the step gets the job's CPUs, not one
    for rank, argv in enumerate(launches):
        assert argv[0] == "launch" and "--multi_gpu" in argv
        assert [_flag(argv, f) for f in ("--num_machines", "--num_processes", "--machine_rank")] == ["2", "4", str(rank)]
        assert (_flag(argv, "--main_process_ip"), _flag(argv, "--main_process_port")) == ("nodeA", "29500")
        assert _flag(argv, "-m") == "eval.icl_end2end" and _flag(argv, "--mllm") == "vllm" and "--adapter-only-loc" in argv
        assert _flag(argv, "--vllm-tensor-parallel-size") == "2"  # 4 GPUs per node / 2 processes
        assert _flag(argv, "--vllm-dtype") == "bfloat16" and _flag(argv, "--out") == str(tmp_path / "out")
        assert _flag(argv, "--dataset") == "icfg-pedes" and _flag(argv, "--model") == "Qwen/Qwen2-VL-7B-Instruct"


def test_servers_script_starts_a_server_per_gpu_and_one_client(stubs, tmp_path):
    out = tmp_path / "runs" / "e2e"
    _run("thi-servers.sbatch", stubs, tmp_path, OUT=str(out), GPUS_PER_NODE="2", ADAPTER="/shared/lora",
         EVAL_ARGS="--dataset-root data/CUHK-PEDES --dataset cuhk-pedes --retriever rde:ckpt.pth")
    assert _calls(stubs, "python")[0] == ["-m", "mllm_tune.core.backends.adapter_check", "/shared/lora",
                                          "--max-lora-rank", "8"]
    servers = _calls(stubs, "vllm")
    assert len(servers) == 4  # 2 nodes x 2 GPUs
    assert _calls(stubs, "srun_cpus") == [["32"]]
    for argv in servers:
        assert argv[:2] == ["serve", "Qwen/Qwen2-VL-7B-Instruct"] and _flag(argv, "--lora-modules") == "anchor=/shared/lora"
        assert _flag(argv, "--mm-processor-kwargs") == '{"min_pixels": 50176, "max_pixels": 50176}'
        assert _flag(argv, "--dtype") == "bfloat16" and _flag(argv, "--max-num-seqs") == "16"
    assert sorted(_flag(a, "--port") for a in servers) == ["8000", "8000", "8001", "8001"]
    urls = (tmp_path / "runs" / "e2e.servers.txt").read_text().split()
    assert urls == ["http://nodeA:8000/v1", "http://nodeA:8001/v1", "http://nodeB:8000/v1", "http://nodeB:8001/v1"]
    client = _calls(stubs, "python")[1]
    assert client[:2] == ["-m", "eval.icl_end2end"] and _flag(client, "--dataset") == "cuhk-pedes"
    assert [_flag(client, f) for f in ("--mllm", "--model", "--concurrency", "--out")] == ["openai", "anchor", "16", str(out)]
    assert _flag(client, "--base-url-file") == str(out) + ".servers.txt"


def test_servers_script_says_which_server_never_came_up(stubs, tmp_path):
    curl = Path(stubs["PATH"].split(":")[0]) / "curl"
    curl.write_text('#!/bin/bash\n[[ "$*" == *nodeB* ]] && exit 7; echo \'"anchor"\'\n')
    fast_sleep = curl.with_name("sleep")
    fast_sleep.write_text("#!/bin/bash\n")
    fast_sleep.chmod(0o755)
    run = _run("thi-servers.sbatch", stubs, tmp_path, OUT=str(tmp_path / "e2e"), GPUS_PER_NODE="1")
    assert "http://nodeB:8000/v1 is not up after 30 min" in run.stdout and "nodeA" not in run.stdout
    assert _calls(stubs, "python")[1][:2] == ["-m", "eval.icl_end2end"]  # the run starts without it
