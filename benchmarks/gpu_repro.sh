#!/usr/bin/env bash
# The reproduction on one H200 (issue 13), in consecutive 10-minute calls on the warm machine:
#   bash benchmarks/gpu_repro.sh pretrain END_S      call 1: unpack + tokenize the carried Gutenberg parts and build
#                                                     the kernels at once; pretrain meanwhile (on the Triton scan,
#                                                     the default without mamba-ssm's kernels), then
#                                                     on the kernels (SIGTERM -> checkpoint -> --resume) until END_S
#   bash benchmarks/gpu_repro.sh more END_S          later calls: tokenize newly carried parts, resume pretraining
#   then benchmarks/gpu_passkey.sh (the passkey fine-tunes and grids from the weights this script brings back)
# PRETRAIN_SET='--set key=value ...' changes the pretraining config (a new run only), e.g. a larger d_state or a
# Mamba-2 model (with SSD_FROM_SOURCE=1: mamba-ssm's SSD kernels from its sources, no build; gpu_common.sh);
# PRETRAIN_NAME=NAME names the run (/tmp/runs/NAME, default pretrain); MEAN_DISTANCE=1 also writes the Mamba
# Mean Distance per layer of the shipped checkpoint (tools/mean_distance.py) to /tmp/runs/NAME_<checkpoint>_mean_distance.json.
# Every call brings back the latest pretrained weights (bf16, A_log/D fp32) in <= 15 MiB parts, NAME.tar.part_*, and a
# log archive; with MEAN_DISTANCE=1 training stops 60 s earlier for it (97 s on 2 CPU cores for the d_state-64 model).
# Carried: .data/gutenberg/ (xz parts of ../shared/data/gutenberg), .device/ (kernel sources + build script),
# and the code snapshot .snap/ (git archive of the commit that runs: the tree around it may hold unfinished edits).
# The device copy's .git is stale: call with DECIMAMBA_COMMIT=$(git rev-parse --short HEAD) (typed here) so
# every record names the code that ran.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/logs"; OUT=$(cd "$OUT" && pwd); L=$OUT/logs
STAGE=$1; END=${2:-560}
. "$(dirname "$0")/gpu_common.sh"   # el, latest, have_kernels
MDT=0; [ "${MEAN_DISTANCE:-0}" = 1 ] && MDT=60   # seconds kept for the Mean Distance at the end
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
export PYTHONPATH=/tmp/site:$PWD/.snap$(ssd_path)
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
read -ra EXTRA <<< "${PRETRAIN_SET:-}"   # words of PRETRAIN_SET, not glob-expanded
ROOT=$PWD; CORPUS=/tmp/lm_corpus; RUNS=/tmp/runs; NAME=${PRETRAIN_NAME:-pretrain}; RUN=$RUNS/$NAME; mkdir -p $CORPUS $RUNS
cd .snap; ln -sfn "$ROOT/data" data
tokenize() {  # every carried part not yet tokenized, in parallel
  local pids=""
  for f in "$ROOT"/.data/gutenberg/*.tar.xz*; do
    case $f in *validation*) s=validation;; *test*) s=test;; *) s=train;; esac
    python3 custom_datasets/tokenize_corpus.py --split $s --out $CORPUS $([ $s = train ] || echo --pg19) "$f" \
      >> "$L/tokenize.log" 2>&1 & pids="$pids $!"
  done
  wait $pids
}
train() {  # in the background (pid TRAIN): resume the run if it has a checkpoint, else start it
  if ls -d $RUN/epoch_*_step_* >/dev/null 2>&1; then
    python3 finetune_ssm.py --resume $RUN >> "$L/pretrain.log" 2>&1 &
  else
    rm -rf $RUN
    python3 finetune_ssm.py --config configs/pretrain_gutenberg.json --run-name $NAME \
      --set output_dir=$RUNS --set lm_corpus_dir=$CORPUS "${EXTRA[@]}" >> "$L/pretrain.log" 2>&1 &
  fi
  TRAIN=$!
}
stop_train() { kill -TERM $TRAIN 2>/dev/null; wait $TRAIN; echo "trainer stopped at $(el) s" >> "$L/pretrain.log"; }
ship() {  # latest pretrained weights (bf16 export) + logs into $OUT
  local last; last=$(latest $RUN)
  if [ -n "$last" ]; then
    rm -rf /tmp/export; python3 tools/export_checkpoint.py "$last" /tmp/export >> "$L/pretrain.log" 2>&1 &&   # bf16, A_log/D fp32
      cp "$last"/finetune_ssm_config.json /tmp/export/ && echo "$last" > /tmp/export/SOURCE &&
      (cd /tmp/export && tar cf - . | split -b 15M - "$OUT/$NAME.tar.part_")
  fi
  if [ -n "$last" ] && [ "${MEAN_DISTANCE:-0}" = 1 ]; then
    md=$RUNS/${NAME}_$(basename "$last")_mean_distance.json    # one file per checkpoint (the tool refuses to replace one)
    [ -f "$md" ] || OMP_NUM_THREADS=8 timeout $MDT python3 tools/mean_distance.py --model "$last" --corpus $CORPUS \
      --split validation --windows 2 --out "$md" > "$L/mean_distance.log" 2>&1
    cp "$md" "$L/" 2>/dev/null
  fi
  cp $RUN/train_log.jsonl $RUN/results.jsonl $RUN/config.json "$L/" 2>/dev/null
  nvidia-smi > "$L/nvidia-smi.txt" 2>&1; ls -la $CORPUS > "$L/corpus.txt"; cat $CORPUS/*.json | head -c 2000 >> "$L/corpus.txt"
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
}
if ssd_mode && ! is_mamba2 "$(latest $RUN)" && [[ "${PRETRAIN_SET:-}" != *'"layer":"Mamba2"'* ]]; then
  echo "SSD_FROM_SOURCE=1 serves Mamba-2 models: $RUN and PRETRAIN_SET describe none (run without it)"; exit 1
fi
case $STAGE in
  pretrain)
    tokenize & TOKP=$!                       # beside the build, or the Triton scan's GPU tests (synchronous)
    build_bg "$ROOT"/.device "$L/build.log"
    wait $TOKP; echo "tokenized at $(el) s" >> "$L/tokenize.log"
    train
    wait_until $(( END - 60 )) $BUILD
    if ! triton_mode && ! ssd_mode && have_kernels && kill -0 $TRAIN 2>/dev/null; then stop_train; train; fi
    while kill -0 $TRAIN 2>/dev/null && [ $(el) -lt $(( END - 40 - MDT )) ]; do sleep 5; done
    stop_train; ship ;;
  more)
    tokenize; echo "tokenized at $(el) s" >> "$L/tokenize.log"
    train
    while kill -0 $TRAIN 2>/dev/null && [ $(el) -lt $(( END - 40 - MDT )) ]; do sleep 5; done
    stop_train; ship ;;
esac
echo "done at $(el) s"
