#!/usr/bin/env bash
# RULER needle tasks that need no hub data, on the shipped checkpoint, vanilla and DeciMamba, on a CPU.
# Offline: the haystacks are generated ("repeat" / "needle"), the tokenizer is the bundled GPT-NeoX-20B.
# 20 samples per length (--limit; lm-eval chains the lengths, so one run per length), answers cut
# at 32 new tokens (RULER's yaml says 128; a 7-digit key or a UUID fits in 32). Run from the repo root.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # a shared 2-core machine: 2 threads thrash (18x slower measured)
OUT=benchmarks/results/lm_eval
TASKS=niah_single_1,niah_multikey_2,niah_multikey_3
BASE=pretrained=checkpoints/passkey_small_deci,tokenizer=data/gpt-neox-20b
for len in ${LENGTHS:-1024 2048 4096}; do
  for variant in vanilla deci; do
    args=$BASE
    [ "$variant" = deci ] && args=$args,decimating_layers=[3],decimation_beta=0.5,L_base=500
    .venv/bin/python decimamba_lm_eval.py --model decimamba --model_args "$args" --device cpu \
      --tasks $TASKS --metadata "{\"max_seq_lengths\":[$len]}" --gen_kwargs max_gen_toks=32 \
      --limit ${LIMIT:-20} --seed 0 --log_samples --output_path "$OUT/${variant}_L$len"
  done
done
