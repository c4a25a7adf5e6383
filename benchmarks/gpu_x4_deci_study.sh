#!/usr/bin/env bash
# One 10-minute call on nvidia-h200-x4: does decimation help the small passkey models that
# gpu_x4_round.sh trained (their exports carried in $MODELS/export_deci)? And the GPU re-measures.
#   GPU 0  inference-time sweep of the decimating layer (find_deci_layer over layers 1-5) at L_base 500
#          and at 2000, 16K and 64K tokens x 5 depths x 2 samples
#   GPU 1  fine-tune the model at 2K with decimation active in training (layer 3 keeps 500 of ~2K tokens)
#   GPU 2  control: the same fine-tune without decimation
#   CPU    the kernels build meanwhile; then GPU 3 runs the GPU tests, GPU 0 the benchmarks (BENCH_ARGS),
#          GPUs 1-3 grid the fine-tuned models (1K-128K x 5 depths x 5 samples), with and without decimation.
#   OUT=... MODELS=.pk bash benchmarks/gpu_x4_deci_study.sh [TRAIN_S=330] [END_S=560]
# SWEEP_LENS / GRID_LENS override the lengths (JSON lists; a CPU dry run: EXTRA_SET='--device cpu ...').
# Expects .device/ (kernel sources + build script) and .whl/ (nltk, mambapy wheels), carried with $MODELS.
set -u
OUT=${OUT:-gpu_out}; L=$OUT/logs; W=${W:-/tmp/study}; MODELS=${MODELS:-.pk}; mkdir -p "$L" "$W"
TRAIN_S=${1:-330}; END=${2:-560}
. benchmarks/gpu_common.sh
CFG=configs/passkey_small_deci.json
BASE="--config $CFG --set output_dir=$W --set load_cp=$MODELS/export_deci ${EXTRA_SET:-}"   # later --set win
run() {  # gpu name args...: one finetune_ssm.py run, log in $W/name.log
  local g=$1 n=$2; shift 2
  CUDA_VISIBLE_DEVICES=$(gpu $g) timeout $(( END - 20 - $(el) )) python3 finetune_ssm.py $BASE --run-name "$n" "$@" \
    > "$W/$n.log" 2>&1
}
nvidia-smi -L > "$L/gpus.txt"
start_build

sweep=(--set eval_mode=true --set find_deci_layer=true --set "find_deci_layer_candidates=[1,2,3,4,5]"
       --set "niah_context_lens_eval=${SWEEP_LENS:-[16000,64000]}" --set niah_samples_per_cell=2)
{ run 0 sweep_Lbase500 "${sweep[@]}" --set decimation_max_p_L_base=500 & run 0 sweep_Lbase2000 "${sweep[@]}" & wait; } &
SWEEP=$!
ft=(--set niah_context_len_train_curriculum=null --set lr=1e-3 --set warmup_steps=50 --set max_step=1500
    --set eval_steps=100000 --set save_steps=250 --set max_train_seconds=$TRAIN_S)
deci=(--set "decimating_layers=[3]" --set decimation_max_p_L_base=500)
run 1 ft_deci "${ft[@]}" "${deci[@]}" & P1=$!
run 2 ft_control "${ft[@]}" --set activate_decimation=false & P2=$!
wait $BUILD; echo "kernels ready (or build failed) at $(el) s" >> "$L/timeline.txt"
(CUDA_VISIBLE_DEVICES=$(gpu 3) timeout $(( END - 60 - $(el) )) python3 -m pytest -q -p no:cacheprovider -rA \
   tests/test_gpu.py tests/test_triton_correction.py > "$L/gpu_tests_h200.log" 2>&1; echo "pytest rc $?" >> "$L/gpu_tests_h200.log") &
TESTS=$!
wait $SWEEP; echo "sweep ended at $(el) s" >> "$L/timeline.txt"
bench 0
wait $P1 $P2; echo "fine-tunes ended at $(el) s" >> "$L/timeline.txt"
grid=(--set eval_mode=true --set niah_samples_per_cell=5
      --set "niah_context_lens_eval=${GRID_LENS:-[1000,2000,4000,8000,16000,32000,64000,128000]}")
run 1 grid_ft_deci "${grid[@]}" --set load_cp="$(last $W/ft_deci)" "${deci[@]}" &
run 2 grid_ft_control "${grid[@]}" --set load_cp="$(last $W/ft_control)" --set activate_decimation=false &
wait $TESTS
run 3 grid_ft_control_plus_deci "${grid[@]}" --set load_cp="$(last $W/ft_control)" "${deci[@]}" &
wait
echo "grids ended at $(el) s" >> "$L/timeline.txt"
for r in ft_deci ft_control; do python3 tools/export_checkpoint.py "$(last $W/$r)" "$W/export_$r" >> "$L/export.log" 2>&1; done
P=$(basename $W)   # files come back at <= 16 MiB each
tar czf "$OUT/study_results.tgz" -C "$(dirname $W)" --exclude='*/epoch_*' --exclude='*/best_model' --exclude='*/export_*' "$P"
for r in ft_deci ft_control; do tar czf "$OUT/$r.tgz" -C "$(dirname $W)" "$P/export_$r"; done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
echo "done at $(el) s"
