#!/usr/bin/env bash
# Issue 13, item 3 on one H200: fine-tune the pretrained LM on the Gutenberg books with the original's PG-19
# recipes (eval presets 4/5: 2,000-token windows, lr 1e-4 constant, 32 windows per step; DeciMamba with decimation
# active in training at layers 12-20, beta 0.83, L_base 8000, deci_num_chunks 2), then perplexity by length.
# Two consecutive calls on the warm machine (the weights and the train parts do not fit in one call's 64 MiB):
#   bash benchmarks/gpu_ppl_ft.sh prep END_S   carried: artifacts/pretrained/ (or PRETRAINED=DIR: config.json and
#       model.safetensors, or model.safetensors.xz to fit the 64 MiB), .device/, and in
#       .data/gutenberg/ the test and validation parts only. Builds the kernels (gpu_common.sh build_bg) while it
#       tokenizes the two splits and
#       keeps the weights in /tmp for the next call; then the pretrained LM's evaluations, vanilla and with the
#       decimation of preset 4 added zero-shot: the 20 validation books at 1K ... 128K (5 windows per book), then
#       the 4 test books at the presets' lengths (1K ... 60K, 10 windows per book), until END_S.
#   bash benchmarks/gpu_ppl_ft.sh ft END_S     carried: .data/gutenberg/ with train parts 00-01. Both arms start at
#       once and stop at max_step or at END_S * 3/5 (SIGTERM -> checkpoint); each is then evaluated at the last step
#       both reached (a checkpoint every 50 steps), vanilla, DeciMamba, and the vanilla fine-tune with decimation.
#       Each fine-tune's step-0 evaluation is the pretrained LM on the test books (vanilla / with decimation).
#       FT_DECI_SET='--set key=value ...' (words split on spaces, no inner quotes) changes the DeciMamba arm's training
#       only (its run is named after it): at L_base >= 1,000 the presets' recipe drops no token in training
#       (reference limitation L4). A stopped evaluation continues in its folder on the next call.
# Back in $OUT each time: logs.tgz (logs, train logs, results, commands.txt). Call with DECIMAMBA_COMMIT=<the commit>
# (the device copy's .git is stale). Run it alone on the GPU (beside a pretraining and other trainers an arm ran out
# of memory: the fp32 logits of 16 x 2,000 tokens x 50K vocabulary are 6 GB); `ft` needs what `prep` leaves on the
# machine: the kernels in /tmp/site (or DECIMAMBA_SCAN=triton), the weights in /tmp/pretrained_ppl, the two splits.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/logs"; OUT=$(cd "$OUT" && pwd); L=$OUT/logs
STAGE=${1:-}; END=${2:-560}; STEPS=${PPL_FT_STEPS:-400}
case $STAGE in prep|ft) ;; *) echo "usage: gpu_ppl_ft.sh prep|ft END_S (got '$STAGE')"; exit 2;; esac
. "$(dirname "$0")/gpu_common.sh"   # el, latest, have_kernels, alive, wait_until, stop_all
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONPATH=/tmp/site:$PWD$(ssd_path)
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -n "${DECIMAMBA_COMMIT:-}" ] || echo "warning: DECIMAMBA_COMMIT is not set: records will name the copy's stale .git" | tee -a "$L/commands.txt"
CORPUS=/tmp/lm_corpus; RUNS=/tmp/runs; PG=/tmp/pg19_ft; W0=/tmp/pretrained_ppl; mkdir -p $RUNS $CORPUS
steps_of() { ls -d "$1"/epoch_*_step_* 2>/dev/null | sed 's/.*_step_//' | sort -n; }
pack() {  # copy every run's results and train log into the logs, then logs.tgz
  for r in $RUNS/ftppl_* $RUNS/ppl_*; do [ -d $r ] || continue; b=$(basename $r)
    for f in results.jsonl train_log.jsonl; do [ -f $r/$f ] && cp $r/$f "$L/${b}_$f"; done; done
  nvidia-smi > "$L/nvidia-smi.txt" 2>&1
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"; echo "done at $(el) s"
}
if [ $STAGE = prep ]; then
  P=${PRETRAINED:-artifacts/pretrained}
  rm -rf $W0; mkdir -p $W0 && cp "$P"/config.json $W0/ || { echo "no pretrained model at '$P' (config.json)"; exit 1; }
  if [ -f "$P/model.safetensors.xz" ]; then   # xz: 29% smaller to carry
    xz -dc "$P/model.safetensors.xz" > $W0/model.safetensors || { echo "could not decompress '$P/model.safetensors.xz'"; exit 1; }
  else cp "$P"/model.safetensors $W0/ || { echo "no pretrained weights at '$P' (model.safetensors[.xz])"; exit 1; }; fi
  build_bg .device "$L/build.log"
  for s in test validation; do
    python3 custom_datasets/tokenize_corpus.py --split $s --pg19 --out $CORPUS .data/gutenberg/$s.tar.xz > "$L/tokenize_$s.log" 2>&1 ||
      { echo "tokenizing the $s books failed (tokenize_$s.log)"; tail -3 "$L/tokenize_$s.log"; }
  done
  echo "$(el) s: test and validation books tokenized" >> "$L/commands.txt"
  wait_until $(( END - 60 )) $BUILD
fi
have_kernels ||
  { echo "no kernels in /tmp/site: run 'gpu_ppl_ft.sh prep' (or benchmarks/gpu_repro.sh) on this machine first"; pack; exit 1; }
[ -f $W0/model.safetensors ] || { echo "no pretrained weights in $W0: run 'gpu_ppl_ft.sh prep' on this machine first"; exit 1; }
ls $CORPUS/pg19_test/test_set.pt $CORPUS/pg19_validation/test_set.pt >/dev/null ||
  { echo "no tokenized test/validation books at $CORPUS: run 'gpu_ppl_ft.sh prep' on this machine first"; exit 1; }
BASE=(--config configs/pretrain_gutenberg.json --set dataset=ppl_test --set scratch_model_config=null
      --set output_dir=$RUNS --set ppl_test_context_len_train=2000 --set max_train_input_len=20000
      --set 'ppl_test_context_lens_eval=[1000,2000,4000,10000,20000,30000,40000,50000,60000]'
      --set ppl_test_num_windows_per_context_len_eval=10)
DECI=(--set mamba_arch=deci --set activate_decimation=true --set 'decimating_layers=[12,13,14,15,16,17,18,19,20]'
      --set decimation_beta=0.83 --set decimation_max_p_L_base=8000 --set deci_num_chunks=2)
FT=(--set load_cp=$W0 --set pg19_dir=$PG --set lr=1e-4 --set lr_sched_type=const --set warmup_steps=0
    --set grad_accum_steps=32 --set train_micro_batch_size=16 --set max_step=$STEPS --set epochs=1000
    --set save_steps=50 --set eval_steps=100000)
VAL=(--set pg19_dir=$CORPUS/pg19_validation --set ppl_test_num_windows_per_context_len_eval=5
     --set 'ppl_test_context_lens_eval=[1000,2000,4000,8000,16000,32000,64000,128000]')
TEST=(--set pg19_dir=$CORPUS/pg19_test)
PIDS=""; NAMES=""
start() {  # NAME ARGS...: finetune_ssm.py ARGS in the background (PIDS, NAMES), its output in NAME.log
  local n=$1; shift
  echo "$(el) s: finetune_ssm.py $*" >> "$L/commands.txt"
  python3 finetune_ssm.py "$@" >> "$L/$n.log" 2>&1 & PIDS="$PIDS $!"; NAMES="$NAMES $n"
}
run_ft() {  # NAME ARGS...: a fine-tune, resumed from its last checkpoint, else started afresh (a folder without a
  local n=$1; shift   # checkpoint never trained past its step-0 evaluation: nothing in it to keep)
  if ls -d $RUNS/$n/epoch_*_step_* >/dev/null 2>&1; then start $n --resume $RUNS/$n
  else rm -rf $RUNS/$n; start $n --run-name $n "$@"; fi
}
run_eval() {  # NAME ARGS...: an evaluation in its folder: the evaluator reuses the cells it already recorded (same
  local n=$1; shift   # weights, settings, backend) and measures the others, so a stopped one continues
  start $n --run-name $n "$@"
}
evals() {  # TAG WEIGHTS ARCH_ARGS...: validation and test evaluations of one model
  local tag=$1 w=$2; shift 2
  run_eval "ppl_${tag}_validation" "${BASE[@]}" --set eval_mode=true --set load_cp=$w "${VAL[@]}" "$@"
  run_eval "ppl_${tag}_test" "${BASE[@]}" --set eval_mode=true --set load_cp=$w "${TEST[@]}" "$@"
}
finish_evals() {  # wait for the evaluations until END - 20, stop those still running; log every exit status
  wait_until $(( END - 20 )) $PIDS
  set -- $NAMES; local p rc
  for p in $PIDS; do
    if kill -0 $p 2>/dev/null; then kill -TERM $p; wait $p 2>/dev/null
      echo "$(el) s: $1 stopped before it finished (its recorded cells stay; a later call continues it)" >> "$L/commands.txt"
    else wait $p; rc=$?; echo "$(el) s: $1 exited with status $rc" >> "$L/commands.txt"; fi
    shift
  done
}
if [ $STAGE = prep ]; then
  evals base_vanilla $W0; evals base_deci $W0 "${DECI[@]}"
  finish_evals; pack; exit 0
fi

python3 custom_datasets/tokenize_corpus.py --split train --pg19 --out $CORPUS .data/gutenberg/train.* > "$L/tokenize_pg19.log" 2>&1 ||
  { echo "tokenizing the train books failed (tokenize_pg19.log)"; tail -3 "$L/tokenize_pg19.log"; exit 1; }
rm -rf $PG; mkdir -p $PG; ln -s $CORPUS/pg19_train/train_set.pt $PG/; ln -s $CORPUS/pg19_test/test_set.pt $PG/
echo "$(el) s: train books in ppl_test format ($(du -hL $PG/train_set.pt | cut -f1))" >> "$L/commands.txt"
run_ft ftppl_vanilla "${BASE[@]}" "${FT[@]}"
read -ra TRAIN_DECI <<< "${FT_DECI_SET:-}"   # e.g. '--set decimation_max_p_L_base=500': decimation that acts in training
TAG=$(echo "${FT_DECI_SET:-}" | tr -c 'A-Za-z0-9\n' _ | sed 's/__*/_/g; s/^_//; s/_$//'); FD=ftppl_deci${TAG:+_$TAG}
run_ft $FD "${BASE[@]}" "${FT[@]}" "${DECI[@]}" "${TRAIN_DECI[@]}"
FTP=$PIDS; wait_until $(( END * 3 / 5 )) $FTP
stop_all $FTP
echo "fine-tunes stopped at $(el) s" >> "$L/commands.txt"
S=$(comm -12 <(steps_of $RUNS/ftppl_vanilla | sort) <(steps_of $RUNS/$FD | sort) | sort -n | tail -1)
echo "last step both fine-tunes reached: ${S:-none}" >> "$L/commands.txt"
PIDS=""; NAMES=""
if [ -n "$S" ]; then
  WV=$(ls -d $RUNS/ftppl_vanilla/epoch_*_step_$S); WD=$(ls -d $RUNS/$FD/epoch_*_step_$S)
  evals ft_vanilla_s$S "$WV"; evals ft_${FD#ftppl_}_s$S "$WD" "${DECI[@]}"; evals ft_vanilla_deci_s$S "$WV" "${DECI[@]}"
fi
evals base_vanilla $W0; evals base_deci $W0 "${DECI[@]}"   # what prep did not finish (its cells are reused)
finish_evals; pack
