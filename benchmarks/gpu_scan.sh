#!/usr/bin/env bash
# Issue 16 on the GPU machine: Nsight Compute profiles of the Triton scan and of mamba-ssm's, and bench_scan.py.
#   bash benchmarks/gpu_scan.sh profile END_S   carried: .device/ (the two source archives and build_kernels.sh).
#       Builds mamba-ssm and causal-conv1d into /tmp/site in the background (380-430 s) while the Triton scan's GPU
#       tests and ncu profiles of it run (128K tokens: defaults, prefetch variants, 128 channels a program); then
#       mamba-ssm's profile once the build is done.
#   bash benchmarks/gpu_scan.sh final END_S     one fresh call: the build in the background while the Triton scan's GPU
#       tests, benchmarks/mamba2_grad_precision.py (TF32, then IEEE fp32 dots) and bench_scan.py's sweep (no mamba-ssm)
#       run; then bench_scan.py's scan, model and streamed rows against mamba-ssm.
#   bash benchmarks/gpu_scan.sh bench END_S     the warm machine, kernels built: mamba-ssm's profile,
#       bench_scan.py (scan, sweep, model prefill against mamba-ssm, one run), then the Mamba-2 GPU tests
#       (gpu_mamba2_tests.sh on the same build).
# Back in $OUT: gpu_scan_MODE.tgz (log, ncu_*.txt report texts, scan_h200_r3.md/.json, the Mamba-2 test log).
set -u
MODE=${1:?profile, final or bench}; END=${2:-550}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; W=$(mktemp -d /tmp/scan.XXXX); LOG=$W/gpu_scan_$MODE.log
. "$(dirname "$0")/gpu_common.sh"   # el, build_bg, wait_until
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy
 --section LaunchStats --section SchedulerStats --section WarpStateStats --section InstructionStats"
METRICS=sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active
prof() {  # NAME ARGS...: ncu's text report of one profile_scan.py call (every kernel of it) into $W/ncu_NAME.txt
  local name=$1; shift
  timeout 150 ncu --clock-control none --profile-from-start off --print-details all $SECTIONS --metrics $METRICS \
    python3 benchmarks/profile_scan.py "$@" > $W/ncu_$name.txt 2>&1
  echo "ncu $name ($*) rc $? at $(el) s" >> $LOG
}
kernels_ok() { python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda' 2>/dev/null; }
pack() { tar czf "$OUT/gpu_scan_$MODE.tgz" -C $W .; echo "packed at $(el) s"; }
trap pack EXIT
{ echo "gpu_scan.sh $MODE, commit ${DECIMAMBA_COMMIT:-unknown}, $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader; ncu --version | tail -1; } > $LOG
if [ "$MODE" = profile ]; then
  if kernels_ok; then BUILD=""; echo "kernels already built" >> $LOG; else build_bg .device $W/build.log; fi
  timeout 200 python3 -m pytest -q -rs -m gpu tests/test_triton_scan.py > $W/test_triton_scan_gpu.log 2>&1
  echo "Triton scan GPU tests rc $? at $(el) s" >> $LOG
  prof triton_default --impl triton
  prof triton_prefetch_1_1 --impl triton --prefetch 1 1
  prof triton_prefetch_1_0 --impl triton --prefetch 1 0
  prof triton_block128 --impl triton --block-d 128
  ncu --query-metrics --chip gh100 2>&1 | grep -E "pipe_(xu|fma|alu|lsu)|issue_active|warp_latency|issue_stalled" | head -80 > $W/ncu_metric_names.txt
  [ -n "$BUILD" ] && wait_until $(( END - 60 )) $BUILD
  echo "build: $(kernels_ok && echo importable || echo 'NOT importable') at $(el) s" >> $LOG
  if kernels_ok && [ $(( END - $(el) )) -gt 50 ]; then prof mamba_ssm --impl mamba_ssm; fi
elif [ "$MODE" = final ]; then   # one fresh call: the build, and meanwhile what needs no compiled kernel
  build_bg .device $W/build.log; ssd_site .device
  run_for() { local t=$1 name=$2; shift 2; timeout $t "$@" > $W/$name.log 2>&1; echo "$name rc $? at $(el) s" >> $LOG; }
  PYTHONPATH=$PWD run_for 120 test_triton_scan_gpu python3 -m pytest -q -rs -m gpu tests/test_triton_scan.py
  PYTHONPATH=$SSD_SITE:$PWD run_for 120 grad_tf32 python3 benchmarks/mamba2_grad_precision.py --out $W/mamba2_grad_tf32
  PYTHONPATH=$SSD_SITE:$PWD TRITON_F32_DEFAULT=ieee TRITON_CACHE_DIR=/tmp/triton_ieee \
    run_for 120 grad_ieee python3 benchmarks/mamba2_grad_precision.py --out $W/mamba2_grad_ieee
  PYTHONPATH=$PWD run_for 200 sweep python3 benchmarks/bench_scan.py --skip scan model --out $W/scan_sweep_h200 \
    --max-seconds 150
  [ -n "$BUILD" ] && wait_until $(( END - 100 )) $BUILD
  echo "build: $(kernels_ok && echo importable || echo 'NOT importable') at $(el) s" >> $LOG
  T=$(( END - $(el) - 10 ))
  kernels_ok && run_for $T bench python3 benchmarks/bench_scan.py --skip sweep --out $W/scan_h200_r3 --max-seconds $(( T - 15 ))
else
  kernels_ok || { echo "mamba-ssm / causal-conv1d not built: run the profile mode first" >> $LOG; exit 1; }
  prof mamba_ssm --impl mamba_ssm
  timeout 200 python3 benchmarks/bench_scan.py --out $W/scan_h200_r3 --max-seconds 150 > $W/bench_scan.log 2>&1
  echo "bench_scan rc $? at $(el) s" >> $LOG
  T=$(( END - $(el) - 10 ))
  OUT=$W bash benchmarks/gpu_mamba2_tests.sh $T > $W/gpu_mamba2_tests.out 2>&1
  echo "Mamba-2 GPU tests ended at $(el) s" >> $LOG
fi
