# Shared by the device-round scripts (gpu_x4_round.sh, gpu_x4_deci_study.sh); sourced after they set
# OUT, L (log folder) and END (seconds after start by which GPU jobs must have ended).
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=/tmp/site:$PWD TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl   # nltk, mambapy
NG=$(nvidia-smi -L 2>/dev/null | wc -l); [ "$NG" -gt 0 ] || NG=1
gpu() { echo $(( $1 % NG )); }   # fewer GPUs than jobs: they share
have_kernels() { python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda' 2>/dev/null; }
start_build() {  # mamba-ssm + causal-conv1d from .device/ into /tmp/site, in the background; pid in BUILD
  (MAX_JOBS=${MAX_JOBS:-48} bash .device/build_kernels.sh .device > "$L/build.log" 2>&1
   echo "build ended at $(el) s" >> "$L/build.log") &
  BUILD=$!
}
last() { ls -d "$1"/epoch_*_step_* | awk -F_ '{print $NF, $0}' | sort -n | tail -1 | cut -d' ' -f2; }  # latest checkpoint of a run folder
bench() {  # GPU $1, in the background, to END - 60 s (at most 300 s); results as $L/${BENCH_NAME:-gpu_h200}.{md,json}
  local bs=$(( END - 90 - $(el) )); [ $bs -gt 300 ] && bs=300
  CUDA_VISIBLE_DEVICES=$(gpu $1) timeout $(( bs + 30 )) python3 benchmarks/bench_gpu.py --out "$L/${BENCH_NAME:-gpu_h200}" \
    --max-seconds $bs ${BENCH_ARGS:-} > "$L/${BENCH_NAME:-gpu_h200}.log" 2>&1 &
}
