#!/usr/bin/env bash
# One GPU session on the lent H200 machines, in steps that each fit a 10-minute command.
#   bash benchmarks/gpu_session.sh tests bench          # build kernels if needed (~5.5 min), GPU tests, benchmarks
#   bash benchmarks/gpu_session.sh passkey 380          # (same warm machine) train + evaluate the passkey models
# Expects: the kernel sources in .device/ (copied from the shared device folder; carried), nltk
# as a wheel in .whl/ (carried); writes everything worth keeping under $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
ensure_kernels() {   # the CUDA extensions only import after torch
  python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda' 2>/dev/null && return 0
  bash .device/build_kernels.sh .device > "$OUT/build.log" 2>&1
}
while [ $# -gt 0 ]; do
  case "$1" in
    tests) ensure_kernels
           timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA > "$OUT/gpu_tests_h200.log" 2>&1
           echo "pytest rc $?" >> "$OUT/gpu_tests_h200.log" ;;
    bench) ensure_kernels
           timeout 200 python3 benchmarks/bench_gpu.py --out "$OUT/gpu_h200" --max-seconds 150 > "$OUT/bench.log" 2>&1 ;;
    passkey) shift; ensure_kernels
           bash benchmarks/passkey_h200.sh /tmp/pk "${1:-380}"
           (cd /tmp/pk && tar czf "$OLDPWD/$OUT/passkey_results.tgz" --exclude='*.safetensors' --exclude='training_state.pt' --exclude='tokenizer.json' .)
           for r in deci vanilla; do
             ck=$(ls -d /tmp/pk/$r/epoch_*_step_* | awk -F_ '{print $NF, $0}' | sort -n | tail -1 | cut -d' ' -f2)
             python3 tools/export_checkpoint.py "$ck" "$OUT/ckpt_$r"
           done ;;
    *) echo "unknown step $1 (tests | bench | passkey SECONDS)"; exit 2 ;;
  esac
  shift
done
