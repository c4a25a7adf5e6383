#!/usr/bin/env bash
# One 10-minute command on nvidia-h200-x4 (fewer GPUs work too, shared) that overlaps the CPU-bound kernel build with GPU work:
#   GPU 0, 1  train the small DeciMamba / vanilla passkey models at once, on the torch path while the
#             kernels build, then (SIGTERM -> checkpoint -> --resume) on the kernel path;
#   GPU 2     GPU tests once the kernels are in;      GPU 3  benchmarks (+ profile) once they are in;
#   then      passkey grids 1K..1M x 5 depths x 5 samples of both models (and vanilla + decimation).
#   OUT=... bash benchmarks/gpu_x4_round.sh [TRAIN_END_S=430] [END_S=560]
# A second call on the still-warm machine continues: bash benchmarks/gpu_x4_round.sh --more SECONDS [END]
# (with BENCH_ARGS set, it runs the benchmarks on GPU 3 meanwhile; BENCH_NAME names their result files).
# BENCH_ARGS are passed to bench_gpu.py; EXTRA_SET='--set k=v ...' is added to every run (e.g. a CPU dry run of this script).
# Expects .device/ (kernel sources + build script) and .whl/ (nltk, mambapy wheels), both carried; with
# SHIP_KERNELS=1 the built kernels come back as kwheels.part_* (copy them to .kwheels/ and carry that next
# time: no rebuild).
set -u
OUT=${OUT:-gpu_out}; L=$OUT/logs; PK=${PK:-/tmp/pk}; mkdir -p "$L" "$PK"
MORE=0; [ "${1:-}" = "--more" ] && { MORE=1; shift; }
TRAIN_END=${1:-430}; END=${2:-560}
. benchmarks/gpu_common.sh
restore_kernels() {  # kernels saved by an earlier session (carried as .kwheels/): seconds, not a 6-min build
  ls .kwheels/kwheels.part_* >/dev/null 2>&1 || return 0
  mkdir -p /tmp/site && cat .kwheels/kwheels.part_* | xz -d | tar xf - -C /tmp/site
}
pack_kernels() {    # the installed kernels, xz-compressed in <= 15 MiB parts (once per machine)
  [ -e /tmp/kwheels.done ] && return
  (cd /tmp/site && tar cf - mamba_ssm* selective_scan_cuda* causal_conv1d*) | xz -T0 -6 | split -b 15M - /tmp/kwheels.part_ \
    && touch /tmp/kwheels.done
}
ship_kernels() {    # ... into $OUT if they all fit
  pack_kernels
  local n used add
  n=$(( $(ls "$OUT" | wc -l) + $(ls /tmp/kwheels.part_* | wc -l) ))
  used=$(du -cb "$OUT"/* 2>/dev/null | tail -1 | cut -f1); add=$(du -cb /tmp/kwheels.part_* | tail -1 | cut -f1)
  if [ "$n" -le 8 ] && [ $(( ${used:-0} + add )) -le $(( 62 * 1048576 )) ]; then cp /tmp/kwheels.part_* "$OUT/"
  else echo "kernels not shipped: $n files, $(( (${used:-0} + add) / 1048576 )) MiB" >> "$OUT/wheels.txt"; fi
}
LENS='[1000,2000,4000,8000,16000,32000,64000,128000,256000,512000,1048576]'

train_bg() {  # name gpu args... ; the python pid goes to PID (no subshell: it stays our child)
  local n=$1 g=$2; shift 2
  CUDA_VISIBLE_DEVICES=$(gpu $g) python3 finetune_ssm.py "$@" ${EXTRA_SET:-} >> "$PK/${n}_train.log" 2>&1 &
  PID=$!
}
resume_or_start() {  # name gpu seconds
  if ls -d "$PK/$1"/epoch_*_step_* >/dev/null 2>&1; then
    train_bg "$1" "$2" --resume "$PK/$1" --set max_train_seconds="$3"
  else
    train_bg "$1" "$2" --config "configs/passkey_small_$1.json" --run-name "$1" --set output_dir=$PK --set max_train_seconds="$3"
  fi
}
restore_kernels
if [ $MORE = 0 ]; then
  nvidia-smi -L > "$L/gpus.txt"
  AT_START=0; BUILD=
  if have_kernels; then AT_START=1; echo "kernels restored from .kwheels" > "$L/build.log"
  else start_build
  fi
  resume_or_start deci 0 $TRAIN_END; P0=$PID; resume_or_start vanilla 1 $TRAIN_END; P1=$PID
  [ -n "$BUILD" ] && wait $BUILD
  echo "kernels ready (or build failed) at $(el) s" >> "$L/timeline.txt"
  [ "${SHIP_KERNELS:-0}" = 1 ] && have_kernels && { pack_kernels & }
  if [ $AT_START = 0 ] && have_kernels && [ $(( TRAIN_END - $(el) )) -gt 60 ]; then   # trainers to the kernel path
    kill -TERM $P0 $P1; wait $P0 $P1
    echo "trainers stopped at $(el) s" >> "$L/timeline.txt"
    resume_or_start deci 0 $(( TRAIN_END - $(el) )); P0=$PID; resume_or_start vanilla 1 $(( TRAIN_END - $(el) )); P1=$PID
  fi
  if have_kernels; then
    (CUDA_VISIBLE_DEVICES=$(gpu 2) timeout $(( END - 60 - $(el) )) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA \
       > "$L/gpu_tests_h200.log" 2>&1; echo "pytest rc $?" >> "$L/gpu_tests_h200.log") &
    bench 3
  fi
  wait $P0 $P1
else   # a second call: benchmarks on GPU 3 if BENCH_ARGS is set, train on for SECONDS (if asked), then evaluate
  [ -n "${BENCH_ARGS:-}" ] && have_kernels && bench 3
  if [ "$TRAIN_END" -gt 0 ]; then
    resume_or_start deci 0 $TRAIN_END; P0=$PID; resume_or_start vanilla 1 $TRAIN_END; P1=$PID; wait $P0 $P1
  fi
fi
echo "training ended at $(el) s" >> "$L/timeline.txt"
grid="--set eval_mode=true --set niah_samples_per_cell=5 --set niah_context_lens_eval=$LENS --set output_dir=$PK"
EV=eval; [ $MORE = 1 ] && EV=eval2
ev() {  # run-name gpu config checkpoint
  CUDA_VISIBLE_DEVICES=$(gpu $2) timeout $(( END - 25 - $(el) )) python3 finetune_ssm.py --config "configs/passkey_small_$3.json" \
    --run-name "$1" --set load_cp="$4" $grid ${EXTRA_SET:-} > "$PK/$1.log" 2>&1
}
ev ${EV}_deci 0 deci "$(last $PK/deci)" & ev ${EV}_vanilla 1 vanilla "$(last $PK/vanilla)" &
ev ${EV}_vanilla_plus_deci 2 deci "$(last $PK/vanilla)" &
wait
echo "evaluations ended at $(el) s" >> "$L/timeline.txt"
rm -rf "$PK"/export_*
python3 tools/export_checkpoint.py "$(last $PK/deci)" "$PK/export_deci" > "$L/export.log" 2>&1
python3 tools/export_checkpoint.py "$(last $PK/vanilla)" "$PK/export_vanilla" >> "$L/export.log" 2>&1
P=$(basename $PK)   # files come back at <= 16 MiB each: results and each exported model apart
tar czf "$OUT/pk_results.tgz" -C "$(dirname $PK)" --exclude='*/epoch_*' --exclude='*/best_model' --exclude='*/export_*' "$P"
for r in deci vanilla; do tar czf "$OUT/pk_$r.tgz" -C "$(dirname $PK)" "$P/export_$r"; done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
ls -l /tmp/wheels > "$OUT/wheels.txt" 2>/dev/null
wait   # a background pack_kernels
[ "${SHIP_KERNELS:-0}" = 1 ] && have_kernels && ship_kernels
echo "done at $(el) s"
