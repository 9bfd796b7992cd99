#!/usr/bin/env bash
# Rebuild demo_models/clip-synthpedes from scratch (about 25 minutes on 2 CPU cores):
#
#   make clip-synthpedes          (or: bash demo_models/clip-synthpedes/reproduce.sh [OUT])
#
# A tiny CLIP trained with `python -m mllm_tune.retriever_train recipes/retriever_clip.yaml` on a
# 2000-identity SynthPEDES, three runs of 15 epochs, each continuing from the previous best epoch
# at a lower learning rate; then its R1/mAP on the demo's test split (300 identities, seed 0).
set -euo pipefail
OUT=${1:-/tmp/clip_synthpedes}
PY=${PY:-python}
mkdir -p "$OUT"
[ -f "$OUT/synth2k/stats.json" ] || $PY -m synthpedes.dataset --out "$OUT/synth2k" --num-ids 2000 --seed 1
$PY -m synthpedes.tiny --family clip --out "$OUT/clip_init"
$PY -m mllm_tune.retriever_train recipes/retriever_clip.yaml --model "$OUT/clip_init" \
    --dataset-root "$OUT/synth2k" --output-dir "$OUT/clip_a" --epochs 15 --batch-size 32
$PY -m mllm_tune.retriever_train recipes/retriever_clip.yaml --model "$OUT/clip_a" \
    --dataset-root "$OUT/synth2k" --output-dir "$OUT/clip_b" --epochs 15 --batch-size 32 --lr 3e-4
$PY -m mllm_tune.retriever_train recipes/retriever_clip.yaml --model "$OUT/clip_b" \
    --dataset-root "$OUT/synth2k" --output-dir "$OUT/clip_c" --epochs 15 --batch-size 32 --lr 2e-4 --warmup-epochs 0
# the demo's test split, never seen in training
[ -f "$OUT/synth_demo/stats.json" ] || $PY -m synthpedes.dataset --out "$OUT/synth_demo" --num-ids 300 --seed 0
$PY -m eval.icl_end2end --dataset-root "$OUT/synth_demo" --dataset synthpedes --split test \
    --retriever "$OUT/clip_c" --mllm oracle --rounds 1 --no-plots --out "$OUT/eval_test"
echo "CLIP rebuilt in $OUT/clip_c: its base R1/mAP are the 'base' row of $OUT/eval_test/table.md"
