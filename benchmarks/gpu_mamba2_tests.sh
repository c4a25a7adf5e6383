#!/usr/bin/env bash
# Issue 15's GPU test log: Mamba-2 needs causal-conv1d (CUDA) and mamba-ssm's SSD kernels (Triton, pure Python),
# not mamba-ssm's compiled selective scan (Mamba-1). So this builds causal-conv1d alone (sm_90) and puts mamba-ssm's
# Python sources on the path with a stand-in `selective_scan_cuda` module that raises if anything calls it (the
# Mamba-2 tests never do; a Mamba-1 test would fail loudly, not pass).
#   bash benchmarks/gpu_mamba2_tests.sh END_S      carried: .device/ (the two source archives)
#   SSD_FROM_SOURCE=1 bash benchmarks/gpu_mamba2_tests.sh END_S   no build: the SSD kernels with the conv in torch
# The build takes 380 s (measured); the tests about 300 s more: run it twice on the warm machine (the second call
# finds the build and runs the tests alone); a full build already in /tmp/site (gpu_scan.sh profile) serves too.
# Back in $OUT: test_gpu_mamba2_h200.log (pytest -v, build, GPU).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; LOG=$OUT/test_gpu_mamba2_h200.log; END=${1:-450}
. "$(dirname "$0")/gpu_common.sh"   # el
SITE=/tmp/site_m2; mkdir -p $SITE; ssd_site .device || { echo "no mamba-ssm sources in .device" | tee $LOG; exit 1; }
build() {
  local w; w=$(mktemp -d /tmp/m2.XXXX)
  tar xzf .device/causal_conv1d-1.7.0.tar.gz -C $w || return 1
  python3 - $w/causal_conv1d-1.7.0/setup.py <<'PY'   # keep only sm_90 (as ../shared/device/build_kernels.sh)
import re, sys
p = sys.argv[1]; s = open(p).read()
pat = r'cc_flag\.append\("-gencode"\)\n(\s*)cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)'
open(p, "w").write(re.sub(pat, lambda m: m.group(0) if m.group(2) == "90" else "pass\n" + m.group(1) + "pass", s))
PY
  (cd $w/causal_conv1d-1.7.0 && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=16 python3 -m pip wheel -q --no-build-isolation \
    --no-deps -w $w/wh . > $w/build.log 2>&1) || { tail -20 $w/build.log; return 1; }
  python3 -m pip install -q --no-index --no-deps --target $SITE $w/wh/*.whl
}
if ssd_mode; then
  echo "SSD_FROM_SOURCE=1: no causal-conv1d build; the SSD kernels with the conv in torch" | tee $LOG
elif PYTHONPATH=/tmp/site python3 -c 'import torch, causal_conv1d_cuda, selective_scan_cuda' 2>/dev/null; then
  SITE=/tmp/site   # both kernels, built by an earlier call (build_kernels.sh; benchmarks/gpu_scan.sh profile)
  echo "causal-conv1d and mamba-ssm already built in $SITE (an earlier call on the warm machine)" | tee $LOG
elif PYTHONPATH=$SITE python3 -c 'import torch, causal_conv1d_cuda' 2>/dev/null; then
  echo "causal-conv1d already built in $SITE (a later call on the warm machine)" | tee $LOG
else
  build >> $LOG 2>&1 || { echo "the build failed (above)" >> $LOG; exit 1; }
  echo "causal-conv1d built in $(el) s (sm_90); mamba-ssm 2.3.2.post1 Python sources, selective_scan_cuda stand-in" | tee -a $LOG
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $LOG
if ssd_mode; then export PYTHONPATH=$SSD_SITE:$PWD; else export PYTHONPATH=$SITE:$SSD_SITE:$PWD; fi   # SSD alone: no
export PYTHONUNBUFFERED=1                                                                          # causal-conv1d
T=$(( END - $(el) )); [ $T -ge 30 ] || { echo "$T s left of END_S=$END: no time for the tests" | tee -a $LOG; exit 1; }
timeout $T python3 -m pytest -v -rs tests/test_gpu_mamba2.py >> $LOG 2>&1; echo "pytest rc $? at $(el) s" >> $LOG
