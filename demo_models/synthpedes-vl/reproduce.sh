#!/usr/bin/env bash
# Rebuild demo_models/synthpedes-vl from scratch: data, every training stage, held-out evaluation.
#
#   make synthpedes-vl            (or: bash demo_models/synthpedes-vl/reproduce.sh [OUT])
#
# About 135 minutes on one CPU thread (stage times measured on the 2-core dev machine are in the
# comments). Every stage is full training (no LoRA) with TRL's SFTTrainer: the first eight through
# synthpedes/vl_train.py (plain TRL, what produced them), the last two through the users' own
# `python -m mllm_tune.sft` with a recipe. The rows come from `python -m synthpedes.vl_pretrain`
# (train identities only); docs/synthpedes_vl.md says why each stage exists.
set -euo pipefail
OUT=${1:-/tmp/synthpedes_vl}
PY=${PY:-python}
export OMP_NUM_THREADS=1   # one thread: ~9x faster than two on a loaded 2-core machine
mkdir -p "$OUT"
D=$OUT/data
build() { $PY -m synthpedes.vl_pretrain --dataset-root "$OUT/synth_pre" --out "$D/$1" "${@:2}"; }
train() { $PY -m synthpedes.vl_train "$@"; }

# 0. pre-training images: a 2000-identity SynthPEDES (only its train split is used)
[ -f "$OUT/synth_pre/stats.json" ] || $PY -m synthpedes.dataset --out "$OUT/synth_pre" --num-ids 2000 --seed 11

# 1-3. session 1: grounding, colours first, matching formats (9.7 + 4.5 + 3.8 min)
build grounding --stage grounding --num-samples 40000 --seed 8 --batch-size 32
build colors --stage colors --num-samples 24000 --seed 12 --batch-size 32
build matching --stage matching --num-samples 32000 --seed 9 --batch-size 32
train --init new: --data "$D/grounding" --out "$OUT/s1" --lr 1e-3 --batch-size 32 --warmup 0.02
train --init "$OUT/s1" --data "$D/colors" --out "$OUT/s2" --lr 1e-3 --batch-size 32 --warmup 0.02
train --init "$OUT/s2" --data "$D/matching" --out "$OUT/s3" --lr 5e-4 --batch-size 32 --warmup 0.02 --max-steps 400
# 4-6. attribute yes/no twice, then a short matching pass (3.4 + 3.4 + 2.0 min)
build yesno1 --stage colors --num-samples 16000 --seed 13 --batch-size 32 \
    --mix '{"attr_color": 0.35, "attr_yesno": 0.35, "loc_easy": 0.15, "loc_hard": 0.15}'
build yesno2 --stage colors --num-samples 16000 --seed 14 --batch-size 32 \
    --mix '{"attr_color": 0.3, "attr_yesno": 0.4, "loc_easy": 0.15, "loc_hard": 0.15}'
train --init "$OUT/s3" --data "$D/yesno1" --out "$OUT/s4" --lr 7e-4 --batch-size 32 --warmup 0.02
train --init "$OUT/s4" --data "$D/yesno2" --out "$OUT/s5" --lr 7e-4 --batch-size 32 --warmup 0.02
train --init "$OUT/s5" --data "$D/matching" --out "$OUT/s6" --lr 4e-4 --batch-size 32 --warmup 0.02 --max-steps 200

# 7-8. session 2: compare what it reads with a colour word (8.5 + 45 min)
build compareA --stage compare --num-samples 40000 --seed 21 --batch-size 32 \
    --mix '{"attr_color": 0.25, "color_yesno": 0.30, "loc_color": 0.25, "loc_easy": 0.10, "vqa_single": 0.10}'
build compare --stage compare --num-samples 160000 --seed 32 --batch-size 16
train --init "$OUT/s6" --data "$D/compareA" --out "$OUT/s7" --lr 3e-4 --batch-size 32 --warmup 0.02
train --init "$OUT/s7" --data "$D/compare" --out "$OUT/s8" --lr 3e-4 --batch-size 16 --warmup 0.01

# 9-10. session 2, through mllm_tune/sft.py: slot-swapped colours + near misses (28 min), then
# hair and shoe colours inside captions (22 min)
build slots --stage slots --num-samples 100000 --seed 51 --batch-size 16
build small --stage small --num-samples 80000 --seed 81 --batch-size 16
$PY -m mllm_tune.sft recipes/synthpedes_vl_compare.yaml --model_name_or_path "$OUT/s8" \
    --dataset_name "$D/slots" --output_dir "$OUT/s9"
$PY -m mllm_tune.sft recipes/synthpedes_vl_compare.yaml --model_name_or_path "$OUT/s9" \
    --dataset_name "$D/small" --output_dir "$OUT/final"

# held-out evaluation (test identities of the pre-training SynthPEDES)
$PY -m synthpedes.vl_eval --model "$OUT/final" --root "$OUT/synth_pre" --split test --n 300 --nvqa 180 --nfull 20 \
    --out "$OUT/heldout_eval.json"
echo "SynthPEDES-VL rebuilt in $OUT/final (compare with demo_models/synthpedes-vl/heldout_eval.json)"
