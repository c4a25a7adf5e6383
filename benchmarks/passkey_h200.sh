#!/usr/bin/env bash
# Passkey reproduction on a 2-GPU machine (nvidia-h200-x2): train the small vanilla and DeciMamba
# models at 2K tokens in parallel (one GPU each, or both on one GPU), then evaluate 5 depths x 1K..1M x 5 samples.
#   bash benchmarks/passkey_h200.sh OUT_DIR [TRAIN_SECONDS]
set -u
OUT=${1:-output/passkey}; SECS=${2:-270}
mkdir -p "$OUT"
G2=$(( $(nvidia-smi -L 2>/dev/null | wc -l) > 1 ? 1 : 0 ))   # second model on GPU 1, or share GPU 0
common="--set output_dir=$OUT --set max_train_seconds=$SECS"
CUDA_VISIBLE_DEVICES=0 python3 finetune_ssm.py --config configs/passkey_small_deci.json --run-name deci $common > "$OUT/deci_train.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$G2 python3 finetune_ssm.py --config configs/passkey_small_vanilla.json --run-name vanilla $common > "$OUT/vanilla_train.log" 2>&1 &
wait
last() { ls -d "$OUT/$1"/epoch_*_step_* | awk -F_ '{print $NF, $0}' | sort -n | tail -1 | cut -d' ' -f2; }
LENS='[1000,2000,4000,8000,16000,32000,64000,128000,256000,512000,1048576]'
grid="--set eval_mode=true --set niah_samples_per_cell=5 --set niah_context_lens_eval=$LENS --set output_dir=$OUT"
CUDA_VISIBLE_DEVICES=0 python3 finetune_ssm.py --config configs/passkey_small_deci.json --run-name eval_deci \
    --set load_cp="$(last deci)" $grid > "$OUT/eval_deci.log" 2>&1 &
CUDA_VISIBLE_DEVICES=$G2 python3 finetune_ssm.py --config configs/passkey_small_vanilla.json --run-name eval_vanilla \
    --set load_cp="$(last vanilla)" $grid > "$OUT/eval_vanilla.log" 2>&1 &
wait
# zero-shot: decimation switched on for the vanilla-trained model (no decimation in its training)
CUDA_VISIBLE_DEVICES=0 python3 finetune_ssm.py --config configs/passkey_small_deci.json --run-name eval_vanilla_plus_deci \
    --set load_cp="$(last vanilla)" $grid > "$OUT/eval_vanilla_plus_deci.log" 2>&1
