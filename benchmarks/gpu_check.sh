#!/usr/bin/env bash
# GPU check: the mamba-ssm / causal-conv1d kernels, the GPU tests, then the GPU benchmark.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--no-install] [--tests-only | --bench-only] [-- BENCH_GPU_ARGS...]
#
# Needs Linux, an NVIDIA GPU, a CUDA build of torch and `pip install -r requirements-dev.txt`.
# Steps:
#   1. kernels: if `selective_scan_cuda` / `causal_conv1d_cuda` do not import, installs them with
#        pip install --no-build-isolation causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1
#      (a source build when no wheel matches your torch/CUDA: several minutes; MAX_JOBS limits its
#      parallelism). --no-install stops with that line instead.
#   2. tests: pytest tests/test_gpu*.py tests/test_triton*.py (kernel path vs torch path in fp32 and
#      bf16 up to 1M tokens, streaming prefill, the Triton kernels)  -> DIR/gpu_tests.log
#   3. benchmark: python benchmarks/bench_gpu.py --out DIR/gpu_bench BENCH_GPU_ARGS
#      -> DIR/gpu_bench.{json,md} (+ DIR/gpu_bench_profile.md); prefill tokens/s and peak memory of our
#      vanilla and DeciMamba models vs mamba-ssm's, the torch path, transformers, streaming prefill,
#      the passkey grid's wall time and a training step. Its defaults go to 1M tokens (about 50 GB of
#      GPU memory in fp32) and 10M streamed; on a smaller GPU pass e.g. `-- --lengths 2048 16384 131072
#      --stream-lengths 1048576`. `python benchmarks/bench_gpu.py --help` lists the options.
# DIR defaults to output/gpu_check in the repository (git-ignored); PYTHON (default python3) picks the interpreter.
# Exit status: 0 when every step that ran succeeded, else 1 (all steps still run).
# The recorded H200 results and how to read them: benchmarks/results/README.md.
set -u
PY=${PYTHON:-python3}
OUT=; INSTALL=1; TESTS=1; BENCH=1; BENCH_ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --out) OUT=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --tests-only) BENCH=0; shift ;;
    --bench-only) TESTS=0; shift ;;
    --) shift; BENCH_ARGS=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$OUT" ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2; fi
cd "$(dirname "$0")/.."                       # the repository root
[ -n "$OUT" ] || { OUT=output/gpu_check; mkdir -p "$OUT"; }
KERNELS="causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1"

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check.sh: $PY has no CUDA: needs an NVIDIA GPU and a CUDA build of torch (and requirements-dev.txt)" >&2
  exit 1
fi
"$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}")'

have_kernels() { "$PY" -c 'import torch, selective_scan_cuda, causal_conv1d_cuda' 2>/dev/null; }
if ! have_kernels; then
  if [ $INSTALL = 0 ]; then
    echo "gpu_check.sh: the kernels are not importable; install them with" >&2
    echo "  $PY -m pip install --no-build-isolation $KERNELS" >&2
    exit 1
  fi
  echo "installing the kernels: $PY -m pip install --no-build-isolation $KERNELS"
  "$PY" -m pip install --no-build-isolation $KERNELS || { echo "gpu_check.sh: kernel install failed" >&2; exit 1; }
  have_kernels || { echo "gpu_check.sh: kernels installed but selective_scan_cuda / causal_conv1d_cuda do not import" >&2; exit 1; }
fi
echo "kernels: $("$PY" -c 'import mamba_ssm, causal_conv1d; v = lambda m: getattr(m, "__version__", "?"); print("mamba-ssm", v(mamba_ssm), "/ causal-conv1d", v(causal_conv1d))')"

RC=0
if [ $TESTS = 1 ]; then
  echo "== GPU tests -> $OUT/gpu_tests.log"
  "$PY" -m pytest -q -rA -p no:cacheprovider $(ls tests/test_gpu*.py tests/test_triton*.py 2>/dev/null) \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -n 25
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "GPU tests failed (full log: $OUT/gpu_tests.log)"; RC=1; }
fi
if [ $BENCH = 1 ]; then
  echo "== GPU benchmark -> $OUT/gpu_bench.{json,md}"
  "$PY" benchmarks/bench_gpu.py --out "$OUT/gpu_bench" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} || { echo "benchmark failed"; RC=1; }
  [ -f "$OUT/gpu_bench.md" ] && cat "$OUT/gpu_bench.md"
fi
exit $RC
