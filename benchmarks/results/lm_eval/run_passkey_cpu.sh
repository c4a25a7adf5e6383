#!/usr/bin/env bash
# The shipped checkpoint on its own task (the repository's passkey prompts, depth 0.5) through lm-eval,
# vanilla and DeciMamba (layer 3, L_base 500, as it was fine-tuned), on a CPU. Run from the repo root.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # a shared 2-core machine: 2 threads thrash (18x slower measured)
OUT=benchmarks/results/lm_eval
.venv/bin/python $OUT/make_passkey_task.py $OUT/passkey_task --lengths ${LENGTHS:-2000 8000} --samples ${SAMPLES:-5}
BASE=pretrained=checkpoints/passkey_small_deci,tokenizer=data/gpt-neox-20b
for variant in vanilla deci; do
  args=$BASE
  [ "$variant" = deci ] && args=$args,decimating_layers=[3],decimation_beta=0.5,L_base=500
  .venv/bin/python decimamba_lm_eval.py --model decimamba --model_args "$args" --device cpu \
    --include_path $OUT/passkey_task --tasks deci_passkey --seed 0 --log_samples --output_path "$OUT/passkey_$variant"
done
