# Shared by the device scripts (gpu_repro.sh, gpu_passkey.sh, gpu_ppl_ft.sh): source it first thing.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }           # seconds since the script started
latest() { ls -d "$1"/epoch_*_step_* 2>/dev/null | awk -F_ '{print $NF, $0}' | sort -n | tail -1 | cut -d' ' -f2; }  # RUN's last checkpoint
# DECIMAMBA_SCAN=triton: the Mamba-1 scan runs in Triton, forward and backward (modules/triton_scan*.py), the conv
# in torch: no compiled kernel is needed, so none is built; otherwise the kernels are mamba-ssm and causal-conv1d.
triton_mode() { [ "${DECIMAMBA_SCAN:-}" = triton ]; }
# SSD_FROM_SOURCE=1 (Mamba-2 models): mamba-ssm's SSD kernels are Triton, so its Python sources serve them with no
# build (modules/kernels.py: they need no causal-conv1d; the conv runs in torch); Mamba-1 layers stay on torch.
ssd_mode() { [ "${SSD_FROM_SOURCE:-}" = 1 ]; }
# Triton's autotuner re-times every config in each new process unless told to keep its choices on disk: the Mamba-2
# LM's first training step took 116 s in a fresh call, 21 s on resume in the next (compiled kernels cached, autotune
# re-run: our reading), a passkey fine-tune's 123 s (repro_gutenberg_mamba2_d128/README.md). Kept here: the fine-tunes, grids and
# evaluations that follow reuse the pretraining's choices (binaries and timings in ~/.triton, on the warm machine).
export TRITON_CACHE_AUTOTUNING=1
SSD_SITE=/tmp/site_ssd
ssd_site() {  # DEVICE_DIR: mamba-ssm's Python package into $SSD_SITE beside a stand-in selective_scan_cuda that
  [ -d $SSD_SITE/mamba_ssm ] && return 0   # raises if called (nothing of Mamba-2 calls it; mamba_ssm imports it)
  local w; w=$(mktemp -d /tmp/ms.XXXX); mkdir -p $SSD_SITE
  tar xzf "$1"/mamba_ssm-2.3.2.post1.tar.gz -C $w && cp -r $w/mamba_ssm-2.3.2.post1/mamba_ssm $SSD_SITE/ || return 1
  printf 'def __getattr__(name):\n    raise RuntimeError("selective_scan_cuda is not built here (Mamba-2 SSD kernels only)")\n' \
    > $SSD_SITE/selective_scan_cuda.py
}
if ssd_mode; then ssd_site .device || echo "SSD_FROM_SOURCE=1: .device/ holds no mamba-ssm sources" >&2; fi
ssd_path() { ssd_mode && echo ":$SSD_SITE"; }   # appended to the scripts' PYTHONPATH (after /tmp/site's real kernels)
is_mamba2() {  # CHECKPOINT_DIR: its config.json describes a Mamba-2 model (what SSD_FROM_SOURCE=1 serves)
  python3 -c 'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("ssm_cfg", {}).get("layer") != "Mamba2")' "$1/config.json" 2>/dev/null
}
have_kernels() {
  if ssd_mode; then PYTHONPATH=${PYTHONPATH:-}:$SSD_SITE python3 -c \
      'from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined' 2>/dev/null
  elif triton_mode; then python3 -c 'import triton' 2>/dev/null
  else python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda' 2>/dev/null; fi
}
build_bg() {  # DEVICE_DIR LOG: the kernel build (../shared/device/build_kernels.sh) in the background, pid BUILD.
  BUILD=""    # Under SSD_FROM_SOURCE=1: mamba-ssm's sources on PYTHONPATH, nothing built (seconds).
  if ssd_mode; then
    echo "SSD_FROM_SOURCE=1: mamba-ssm's Python sources in $SSD_SITE ($(have_kernels && echo importable ||
      echo 'NOT importable')); no kernel build" >> "$2"; return
  fi          # Under DECIMAMBA_SCAN=triton the Triton scan's GPU tests run first (about a minute): passed, nothing
  if triton_mode; then   # is built (BUILD stays empty); failed, the kernels are built and mamba-ssm's scan serves
    if python3 -m pytest -q -x -m gpu tests/test_triton_scan_bwd.py > "$2" 2>&1; then
      echo "DECIMAMBA_SCAN=triton: its GPU tests passed at $(el) s; no kernel build" >> "$2"
      if [ -n "${SCAN_BENCH:-}" ]; then   # SCAN_BENCH=1: its training-step speed first (about 40 s), into the log's folder
        python3 benchmarks/bench_scan_bwd.py --max-seconds 40 --out "$(dirname "$2")/scan_bwd_h200" >> "$2" 2>&1
        local rc=$?; echo "bench_scan_bwd ended at $(el) s (exit $rc)" >> "$2"
      fi
      return
    fi
    echo "DECIMAMBA_SCAN=triton: its GPU tests failed (above): building the kernels instead" >> "$2"; export DECIMAMBA_SCAN=mamba_ssm
  fi
  (MAX_JOBS=14 bash "$1"/build_kernels.sh "$1" >> "$2" 2>&1; echo "build ended at $(el) s" >> "$2") >/dev/null 2>&1 &
  BUILD=$!
}
alive() { local p; for p in "$@"; do kill -0 $p 2>/dev/null && return 0; done; return 1; }
wait_until() { local t=$1; shift; while alive "$@" && [ $(el) -lt $t ]; do sleep 5; done; }   # DEADLINE PID...
stop_all() {  # PID...: SIGTERM (a trainer saves its checkpoint), 60 s to finish, then SIGKILL
  local t=$(( $(el) + 60 )); kill -TERM "$@" 2>/dev/null; wait_until $t "$@"; kill -KILL "$@" 2>/dev/null; wait "$@" 2>/dev/null
}
