#!/usr/bin/env bash
# Issue 13, item 3 on one H200: fine-tune the pretrained LM on the Gutenberg books with the original's PG-19
# recipes (eval presets 4/5: 2,000-token windows, lr 1e-4 constant, 32 windows per step; DeciMamba with decimation
# active in training at layers 12-20, beta 0.83, L_base 8000, deci_num_chunks 2), then perplexity by length.
#   bash benchmarks/gpu_ppl_ft.sh END_S
# Needs, on the same machine: the corpus that benchmarks/gpu_repro.sh tokenized (/tmp/lm_corpus, with the train
# parts still in .data/gutenberg) and the kernels it built; carried: artifacts/pretrained/ (or PRETRAINED=DIR).
# Both arms start at once and stop at max_step or at END_S * 3/5 (SIGTERM -> checkpoint); both are then evaluated at
# the last step both reached (a checkpoint every 50 steps), beside the pretrained LM, vanilla and with the
# decimation of preset 4 added zero-shot: the 4 test books at the presets' lengths (1K ... 60K, 10 windows per
# book) and the 20 validation books at 1K ... 128K (5 windows per book). Each step-0 evaluation of a fine-tune is
# the pretrained LM on the test books (vanilla / with decimation). Back in $OUT: logs.tgz (logs, train logs,
# results, commands.txt). Call with DECIMAMBA_COMMIT=<the commit> (the device copy's .git is stale).
# Run it alone on the GPU (beside a pretraining and other trainers an arm runs out of memory: the fp32 logits of
# 16 x 2,000 tokens x 50K vocabulary are 6 GB); it refuses to start without the kernels gpu_repro.sh puts in /tmp/site.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/logs"; OUT=$(cd "$OUT" && pwd); L=$OUT/logs
END=${1:-560}; STEPS=${PPL_FT_STEPS:-400}
. "$(dirname "$0")/gpu_common.sh"   # el, latest, have_kernels, alive, wait_until, stop_all
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONPATH=/tmp/site:$PWD
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
have_kernels ||
  { echo "no kernels in /tmp/site: run benchmarks/gpu_repro.sh on this machine first (it builds them)"; exit 1; }
[ -n "${DECIMAMBA_COMMIT:-}" ] || echo "warning: DECIMAMBA_COMMIT is not set: records will name the copy's stale .git" | tee -a "$L/commands.txt"
CORPUS=/tmp/lm_corpus; RUNS=/tmp/runs; PG=/tmp/pg19_ft; W0=/tmp/pretrained_ppl; mkdir -p $RUNS
steps_of() { ls -d "$1"/epoch_*_step_* 2>/dev/null | sed 's/.*_step_//' | sort -n; }
P=${PRETRAINED:-artifacts/pretrained}
[ -f "$P/model.safetensors" ] || { echo "no pretrained weights at '$P'"; exit 1; }
ls $CORPUS/pg19_test/test_set.pt $CORPUS/pg19_validation/test_set.pt >/dev/null || { echo "no tokenized corpus at $CORPUS: run benchmarks/gpu_repro.sh on this machine first"; exit 1; }
rm -rf $W0; mkdir -p $W0 && cp "$P"/config.json "$P"/model.safetensors $W0/
python3 custom_datasets/tokenize_corpus.py --split train --pg19 --out $CORPUS .data/gutenberg/train.* > "$L/tokenize_pg19.log" 2>&1 ||
  { echo "tokenizing the train books failed (tokenize_pg19.log)"; tail -3 "$L/tokenize_pg19.log"; exit 1; }
rm -rf $PG; mkdir -p $PG; ln -s $CORPUS/pg19_train/train_set.pt $PG/; ln -s $CORPUS/pg19_test/test_set.pt $PG/
echo "$(el) s: train books in ppl_test format ($(du -hL $PG/train_set.pt | cut -f1))" >> "$L/commands.txt"

BASE=(--config configs/pretrain_gutenberg.json --set dataset=ppl_test --set scratch_model_config=null
      --set output_dir=$RUNS --set ppl_test_context_len_train=2000 --set max_train_input_len=20000
      --set 'ppl_test_context_lens_eval=[1000,2000,4000,10000,20000,30000,40000,50000,60000]'
      --set ppl_test_num_windows_per_context_len_eval=10)
DECI=(--set mamba_arch=deci --set activate_decimation=true --set 'decimating_layers=[12,13,14,15,16,17,18,19,20]'
      --set decimation_beta=0.83 --set decimation_max_p_L_base=8000 --set deci_num_chunks=2)
FT=(--set load_cp=$W0 --set pg19_dir=$PG --set lr=1e-4 --set lr_sched_type=const --set warmup_steps=0
    --set grad_accum_steps=32 --set train_micro_batch_size=16 --set max_step=$STEPS --set epochs=1000
    --set save_steps=50 --set eval_steps=100000)
run() {  # NAME ARGS...: one finetune_ssm.py run in the background (pids in PIDS); a run this machine already has is
  local n=$1; shift   # resumed from its checkpoint (a fine-tune) or kept (an evaluation with results), never started over
  if ls -d $RUNS/$n/epoch_*_step_* >/dev/null 2>&1; then set -- --resume $RUNS/$n
  elif [ -s $RUNS/$n/results.jsonl ]; then echo "$(el) s: $n already has results: kept" >> "$L/commands.txt"; return
  else set -- --run-name $n "$@"; fi
  echo "$(el) s: finetune_ssm.py $*" >> "$L/commands.txt"
  python3 finetune_ssm.py "$@" >> "$L/$n.log" 2>&1 & PIDS="$PIDS $!"
}
PIDS=""
run ftppl_vanilla "${BASE[@]}" "${FT[@]}"
run ftppl_deci "${BASE[@]}" "${FT[@]}" "${DECI[@]}"
FTP=$PIDS; wait_until $(( END * 3 / 5 )) $FTP
stop_all $FTP
echo "fine-tunes stopped at $(el) s" >> "$L/commands.txt"
S=$(comm -12 <(steps_of $RUNS/ftppl_vanilla | sort) <(steps_of $RUNS/ftppl_deci | sort) | sort -n | tail -1)
echo "last step both fine-tunes reached: ${S:-none}" >> "$L/commands.txt"

VAL=(--set pg19_dir=$CORPUS/pg19_validation --set ppl_test_num_windows_per_context_len_eval=5
     --set 'ppl_test_context_lens_eval=[1000,2000,4000,8000,16000,32000,64000,128000]')
TEST=(--set pg19_dir=$CORPUS/pg19_test)
PIDS=""
evals() {  # TAG WEIGHTS ARCH_ARGS...: test and validation evaluations of one model
  local tag=$1 w=$2; shift 2
  run "ppl_${tag}_test" "${BASE[@]}" --set eval_mode=true --set load_cp=$w "${TEST[@]}" "$@"
  run "ppl_${tag}_validation" "${BASE[@]}" --set eval_mode=true --set load_cp=$w "${VAL[@]}" "$@"
}
evals base_vanilla $W0
evals base_deci $W0 "${DECI[@]}"
if [ -n "$S" ]; then
  WV=$(ls -d $RUNS/ftppl_vanilla/epoch_*_step_$S); WD=$(ls -d $RUNS/ftppl_deci/epoch_*_step_$S)
  evals ft_vanilla_s$S "$WV"; evals ft_deci_s$S "$WD" "${DECI[@]}"; evals ft_vanilla_deci_s$S "$WV" "${DECI[@]}"
fi
wait_until $(( END - 20 )) $PIDS; kill -TERM $PIDS 2>/dev/null; sleep 3
for r in $RUNS/ftppl_* $RUNS/ppl_*; do [ -d $r ] || continue; b=$(basename $r)
  for f in results.jsonl train_log.jsonl; do [ -f $r/$f ] && cp $r/$f "$L/${b}_$f"; done; done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "done at $(el) s"
