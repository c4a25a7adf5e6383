# Shared by the device scripts (gpu_repro.sh, gpu_passkey.sh, gpu_ppl_ft.sh): source it first thing.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }           # seconds since the script started
latest() { ls -d "$1"/epoch_*_step_* 2>/dev/null | awk -F_ '{print $NF, $0}' | sort -n | tail -1 | cut -d' ' -f2; }  # RUN's last checkpoint
have_kernels() { python3 -c 'import torch, selective_scan_cuda, causal_conv1d_cuda' 2>/dev/null; }
alive() { local p; for p in "$@"; do kill -0 $p 2>/dev/null && return 0; done; return 1; }
wait_until() { local t=$1; shift; while alive "$@" && [ $(el) -lt $t ]; do sleep 5; done; }   # DEADLINE PID...
stop_all() {  # PID...: SIGTERM (a trainer saves its checkpoint), 60 s to finish, then SIGKILL
  local t=$(( $(el) + 60 )); kill -TERM "$@" 2>/dev/null; wait_until $t "$@"; kill -KILL "$@" 2>/dev/null; wait "$@" 2>/dev/null
}
