#!/usr/bin/env bash
# A small Mamba-2 passkey model trained from scratch at 2K with our CLI, gridded to 128K vanilla vs DeciMamba
# (issue 15, last item): the Mamba-1 recipe of benchmarks/results/passkey_h200_attempt3/ on a Mamba-2 model.
#
#   DECIMAMBA_COMMIT=<c> bash benchmarks/gpu_mamba2_passkey.sh train END_S   (first call; any machine)
#   DECIMAMBA_COMMIT=<c> bash benchmarks/gpu_mamba2_passkey.sh grids END_S   (next call, SAME warm machine)
# e.g. device run: DECIMAMBA_COMMIT=<c> bash benchmarks/gpu_mamba2_passkey.sh train 560, carry [".whl"], timeout 600.
#
# train: trains the two arms at once on the one GPU, each its own process (configs/passkey_small_mamba2.json;
#   m2_deci: DeciMamba at layer 3, L_base 2000, beta 0.5, as the Mamba-1 run; m2_vanilla: the same config with
#   --set mamba_arch=vanilla --set activate_decimation=false), until END_S - GRID_S; then grids of each arm's latest
#   checkpoint, 5 depths x 5 samples x 1K, 2K, 4K, 8K, 16K, 32K, 64K, 128K: m2g_deci (DeciMamba model, DeciMamba),
#   m2g_vanilla (vanilla model, vanilla), m2g_vanilla_plus_deci (vanilla model, decimation at layer 3 switched on),
#   all three at once (eval_batch_tokens 524288 each), stopped at END_S - 30; then packs up. An arm that already
#   has a checkpoint in /tmp/runs is resumed, not restarted.
# grids: the continuation, for when `train` ran out of time: refuses (one line) without the train call's runs in
#   /tmp/runs (the machine stays warm only 30 s after a call, so call it at once); resumes each unfinished arm
#   (--resume, bounded by max_train_seconds) to max_step 5,000, then grids the latest checkpoints. A grid folder is
#   named after its checkpoint (m2g_deci_epoch_E_step_S): a checkpoint already gridded reuses its recorded cells
#   (finetune_ssm.py prints "reusing N recorded cell(s)") and only cells cut off by the last call's deadline run;
#   a new checkpoint gets a new folder, the old grid stays beside it. Call `grids` again until commands.txt says
#   both arms are finished and the grids completed.
# END_S: seconds from the script's start at which it packs up (560 for a 600 s call: pip, the last grids'
#   SIGTERM and the tar fit in the rest). Knobs (env): GRID_S (default 150) seconds kept for the grids;
#   TRAIN_ONLY=1 train to END_S - 70 and grid nothing (when commands.txt's projection says training needs more
#   calls); MAX_STEP=N another schedule length (resume-safe: the cosine re-plans from the resumed step);
#   PREFILL_CHUNK=N streams grid prompts in N-token chunks (only if the grids run out of memory; it is in the
#   cells' identity, so keep it the same across calls); SHIP_WEIGHTS=1 also brings back each arm's latest
#   weights (tools/export_checkpoint.py, bf16 but A_log, D, dt_bias fp32; m2_<arm>.tar.part_*, 15 MiB parts);
#   M2PK_SMOKE=1: see below.
#
# Carried: .whl/ only, holding the nltk wheel (.whl/nltk-3.10.4-py3-none-any.whl in the checkout): the passkey task
# splits the haystack into sentences with nltk's Punkt (custom_datasets/niah.py), and the device image has no
# nltk (its regex, click, joblib, tqdm are there). The haystack text itself needs no carried data: it is
# WikiText-2 raw validation (training) and test (evaluation), read by custom_datasets/sources.py from the
# tracked data/wikitext-2-raw/ (the GPT-NeoX tokenizer is tracked too, data/gpt-neox-20b/), so it travels with
# the tree, as for gpu_passkey.sh. No kernel build: both arms train and evaluate on the pure-PyTorch Mamba-2 path
# (backend torch: modules/ssd.py's chunked SSD scan, cuDNN's depthwise conv), or, with SSD_FROM_SOURCE=1 and .device/
# carried, on mamba-ssm's SSD Triton kernels from its Python sources (backend ssd_kernel; gpu_common.sh), still
# with nothing built (causal-conv1d, which the fused kernel needs, would take ~380 s).
# Runs stay in /tmp/runs between calls (the names m2_*, m2g_*; gpu_passkey.sh's runs there are left alone).
# Back in $OUT: logs.tgz = logs/ with commands.txt (every command with its time, training progress and a
# projection, what finished), each process's output (<run>.log), each run's results.jsonl, train_log.jsonl,
# metrics.json and, for grids, the heatmap (<run>_heatmap.png), and nvidia-smi.txt.
# The device copy's .git is stale: DECIMAMBA_COMMIT=<the commit, typed here> makes every record name the code.
#
# Model shape (configs/passkey_small_mamba2.json): 6 layers x d_model 128, tied embeddings, like the Mamba-1
# model (7.14M parameters both: the 50K x 128 embedding is 6.4M of them), so the two runs differ in the mixer
# only. Mamba-2 mixer: expand 2 (d_inner 256 as Mamba-1's), headdim 32 -> 8 heads, d_state 64, ngroups 1:
# decimation scores a token by the norm of its Delta over heads (modules/mamba2_mixer.py), and Mamba-2 has one
# Delta per head rather than per channel, so 8 heads (not 4 at the default headdim 64) keep 8 step sizes, i.e.
# 8 decay rates a token can be selected on; d_state 64 (Mamba-2's default is 128, Mamba-1's run 16) gives each
# head a 32 x 64 state, 16K numbers a layer against Mamba-1's 256 x 16 = 4K, the larger state Mamba-2's SSD
# makes cheap, while the mixer's parameters stay near Mamba-1's (~118K vs ~115K a layer). Decimation at layer 3
# (of 0-5), L_base 2000, beta 0.5: the Mamba-1 run's choice (its README: n_layer / 2, the paper's 12 of 24),
# kept for a like-for-like comparison although that run found its retrieval done in layers 0-1
# (benchmarks/results/needle_retention.md); training itself is the Mamba-1 deci config's unchanged: lr 3e-3
# cosine to 5,000 steps of 16 samples, curriculum 4 epochs of 128-token haystacks, then 256/512/1K, then 2K.
#
# Expected timing (a projection: the torch SSD path's training speed on an H200 is unmeasured). The Mamba-1 run
# on its torch path, one arm a GPU (train_deci_every10.jsonl): ~8.6 steps/s on 128-token haystacks, ~5.5 at 2K,
# i.e. ~750 s for the 5,000 steps; a model this small is launch-bound, so two processes should share one GPU
# with little loss, and the Mamba-2 torch path (a handful of batched matmuls a 128-token chunk) is not expected
# to be slower. train 560: ~370 s of training (~2,700 steps: the curriculum through the 1K stage), grids
# from ~410 s (6.4M prompt tokens a grid; the Mamba-1 grids' cells to 128K took ~6 s of GPU time on the kernel
# path, by their results' "seconds": ten times that on the torch path, plus start-up and haystacks, fits GRID_S),
# packed by ~540 s.
# grids 560 (at once, same machine): ~370 s more (to step ~4,700-5,000), grids of that checkpoint; if
# commands.txt says an arm is unfinished and the session has ~7 min of device time left, `grids 300` (GRID_S
# default) ends the schedule and grids the final checkpoints. Two calls and a short third fit one session's
# 30 min; the first call's grid (at ~2,800 steps: the Mamba-1 model was at 100% at 1K-8K from step 2,500) is
# the result kept if the machine is lost between calls. Guards against a slow path:
# each trainer stops itself at max_train_seconds with a checkpoint, and SIGTERM at the deadline makes any
# late one checkpoint too (stop_all), so the grids always start on time on the latest checkpoint; commands.txt
# records each arm's step and steps/s at 120 s of training and at the stop, with the seconds still needed, so
# the next call can be chosen (another `grids`, TRAIN_ONLY=1, or MAX_STEP); cut grids finish in the next call.
#
# Check on CPU (M2PK_SMOKE=1: --device cpu, no CUDA check, 1 thread a process, 128-token training to 400 steps,
# grids of 1 depth x 1 sample x 256/512 tokens with L_base 100 so that layer 3 drops tokens):
#   M2PK_SMOKE=1 OUT=/tmp/m2pk_smoke M2PK_RUNS=/tmp/m2pk_runs GRID_S=70 bash benchmarks/gpu_mamba2_passkey.sh train 160
#   M2PK_SMOKE=1 OUT=/tmp/m2pk_smoke M2PK_RUNS=/tmp/m2pk_runs GRID_S=100 bash benchmarks/gpu_mamba2_passkey.sh grids 200
# then `grids 120` (no time to train: the same checkpoints, every cell reused): start, the time limit, resume,
# grids, cell reuse and packing, ~2.5 min each on 2 shared cores.
set -u
. "$(dirname "$0")/gpu_common.sh"   # el, latest, alive, wait_until, stop_all
STAGE=${1:-}; END=${2:-560}
case $STAGE in train|grids) ;;
  *) echo "usage: DECIMAMBA_COMMIT=<c> bash benchmarks/gpu_mamba2_passkey.sh train|grids END_SECONDS"; exit 2 ;; esac
if [ -n "${M2PK_SMOKE:-}" ]; then DEV=cpu
else DEV=0; python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null ||
  { echo "gpu_mamba2_passkey.sh: no CUDA here (torch missing or no GPU): it runs on the lent H200 only"; exit 1; }
fi
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/logs"; OUT=$(cd "$OUT" && pwd); L=$OUT/logs; C=$L/commands.txt
BACKEND=torch; ssd_mode && BACKEND=auto   # auto: mamba-ssm's SSD kernels (sources on PYTHONPATH); a resumed arm keeps its own
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONPATH=/tmp/site:$PWD$(ssd_path)
[ -n "${DECIMAMBA_COMMIT:-}" ] ||
  echo "warning: DECIMAMBA_COMMIT is not set: records will name the copy's stale .git" | tee -a "$C"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
python3 -c 'import nltk' 2>/dev/null ||
  { echo "no nltk on this machine: carry .whl/ with its wheel (this script's header)"; exit 1; }
RUNS=${M2PK_RUNS:-/tmp/runs}; CFG=configs/passkey_small_mamba2.json; mkdir -p "$RUNS"
ARMS="m2_deci:deci m2_vanilla:vanilla"
GRID_S=${GRID_S:-150}; [ -n "${TRAIN_ONLY:-}" ] && GRID_S=70
LENS='[1000,2000,4000,8000,16000,32000,64000,128000]'
SMOKE_T=(); SMOKE_G=()
if [ -n "${M2PK_SMOKE:-}" ]; then   # tiny CPU settings, appended last (a later --set wins); 1 thread a process
  export OMP_NUM_THREADS=1
  SMOKE_T=(--set max_step=${MAX_STEP:-400} --set niah_context_len_train=128 --set niah_context_len_train_curriculum=null
           --set grad_accum_steps=1 --set train_micro_batch_size=1 --set eval_steps=1000 --set save_steps=5
           --set 'niah_context_lens_eval=[256]' --set niah_samples_per_cell=1 --set 'niah_needle_depths_eval=[0.5]')
  SMOKE_G=(--set niah_samples_per_cell=1 --set 'niah_needle_depths_eval=[0.5]' --set 'niah_context_lens_eval=[256,512]'
           --set decimation_max_p_L_base=100)
fi
echo "$(el) s: $STAGE, END $END s, GRID_S $GRID_S, runs in $RUNS, device $DEV, commit ${DECIMAMBA_COMMIT:-unset}" \
  >> "$C"

arch_args() { [ "$1" = vanilla ] && echo "--set mamba_arch=vanilla --set activate_decimation=false"; }
ckpt_step() { local c; c=$(latest "$RUNS/$1"); [ -n "$c" ] && echo "${c##*_}"; }
max_step() { [ -n "${MAX_STEP:-}" ] && { echo "$MAX_STEP"; return; }
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["max_step"])' "$RUNS/$1/config.json" 2>/dev/null; }
finished() { local s m; s=$(ckpt_step "$1"); m=$(max_step "$1"); [ -n "$s" ] && [ -n "$m" ] && [ "$s" -ge "$m" ]; }
progress() {  # LABEL: each arm's step, steps/s over its last 50 logged steps, and the seconds it still needs
  local a n
  for a in $ARMS; do n=${a%%:*}
    python3 - "$RUNS/$n/train_log.jsonl" "$(max_step $n)" "$n" "$1" "$(el)" "$(ckpt_step $n)" >> "$C" 2>&1 <<'EOF'
import json, sys
path, total, name, label, now, ck = sys.argv[1:]
try:
    rows = [r for r in map(json.loads, open(path)) if "wall_s" in r]
except OSError:
    rows = []
if not rows:
    print(f"{now} s: {label}: {name}: no training step logged yet (latest checkpoint step {ck or 'none'})"); sys.exit()
# this call's rows only: a resume restarts wall_s
start = max([0] + [i for i in range(1, len(rows)) if rows[i]["wall_s"] < rows[i - 1]["wall_s"]])
last, ref = rows[-1], rows[max(start, len(rows) - 51)]
dt = last["wall_s"] - ref["wall_s"]
rate = (last["step"] - ref["step"]) / dt if dt > 0 else float("nan")
left = int(total or 0) - last["step"]
if left <= 0:
    need = "none"
else:
    need = f"{left / rate:.0f} s more at this rate" if rate == rate and rate > 0 else "unknown"
print(f"{now} s: {label}: {name}: step {last['step']} of {total}, {rate:.2f} steps/s (last "
      f"{last['step'] - ref['step']} steps, input {last.get('mean_input_len', '?')} tokens), loss "
      f"{last['loss']:.4f}; training still needed: {need}; latest checkpoint step {ck or 'none'}")
EOF
  done
}
TP=""
train_all() {  # SECONDS: start or resume every unfinished arm, each stopping itself after SECONDS of training (pids TP)
  TP=""; local a n arch args
  for a in $ARMS; do IFS=: read -r n arch <<< "$a"
    if finished $n; then echo "$(el) s: $n finished (step $(ckpt_step $n))" >> "$C"; continue; fi
    if [ -n "$(latest "$RUNS/$n")" ]; then
      args=(--resume "$RUNS/$n" --set max_train_seconds=$1 ${MAX_STEP:+--set max_step=$MAX_STEP})
    else rm -rf "$RUNS/$n"
      args=(--config $CFG --run-name $n --set output_dir="$RUNS" --set backend=$BACKEND $(arch_args $arch)
            --set max_train_seconds=$1 ${MAX_STEP:+--set max_step=$MAX_STEP} "${SMOKE_T[@]}"); fi
    echo "$(el) s: finetune_ssm.py ${args[*]} --device $DEV" >> "$C"
    python3 finetune_ssm.py "${args[@]}" --device $DEV >> "$L/$n.log" 2>&1 & TP="$TP $!"; done
}
GP=""
grid() {  # NAME RUN ARCH: 5 depths x 5 samples x LENS of RUN's latest checkpoint, in the background (pids GP)
  local n=$1 w arch=$3 args; w=$(latest "$RUNS/$2")
  [ -n "$w" ] || { echo "$(el) s: $n: no checkpoint of $RUNS/$2" >> "$C"; return; }
  n=${n}_$(basename "$w")   # one folder per checkpoint: finetune_ssm.py refuses other settings in a run's folder
  args=(--config $CFG --run-name $n --set eval_mode=true --set output_dir="$RUNS" --set load_cp="$w"
        --set scratch_model_config=null --set backend=$BACKEND --set niah_samples_per_cell=5
        --set "niah_context_lens_eval=$LENS" --set eval_batch_tokens=524288
        ${PREFILL_CHUNK:+--set eval_prefill_chunk_size=$PREFILL_CHUNK} $(arch_args $arch) "${SMOKE_G[@]}")
  echo "$(el) s: finetune_ssm.py ${args[*]} --device $DEV" >> "$C"
  python3 finetune_ssm.py "${args[@]}" --device $DEV >> "$L/$n.log" 2>&1 & GP="$GP $!"
}
ship() {  # this script's runs' records, the logs, nvidia-smi; SHIP_WEIGHTS=1: each arm's latest weights
  local r b p a n
  for r in "$RUNS"/m2_* "$RUNS"/m2g_*; do [ -d "$r" ] || continue; b=$(basename "$r")
    for f in results.jsonl metrics.json $([ "${b#m2g_}" = "$b" ] && echo train_log.jsonl); do
      [ -f "$r/$f" ] && cp "$r/$f" "$L/${b}_$f"; done
    case $b in m2g_*) p=$(ls -t "$r"/plots/*.png 2>/dev/null | head -1)
                      [ -n "$p" ] && cp "$p" "$L/${b}_heatmap.png" ;; esac
  done
  if [ -n "${SHIP_WEIGHTS:-}" ]; then
    for a in $ARMS; do n=${a%%:*}; [ -n "$(latest "$RUNS/$n")" ] || continue
      rm -rf /tmp/m2pk_export &&
        python3 tools/export_checkpoint.py "$(latest "$RUNS/$n")" /tmp/m2pk_export >> "$C" 2>&1 &&
        (cd /tmp/m2pk_export && tar cf - . | split -b 15M - "$OUT/$n.tar.part_"); done
  fi
  nvidia-smi > "$L/nvidia-smi.txt" 2>&1; tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
}

if [ "$STAGE" = grids ]; then
  for a in $ARMS; do [ -n "$(latest "$RUNS/${a%%:*}")" ] ||
    { echo "grids continues the train call on the same machine: no checkpoint of $RUNS/${a%%:*} here"; exit 1; }; done
fi
TD=$(( END - GRID_S )); TS=$(( TD - $(el) - 30 ))   # 30 s: a trainer's start (imports, data, first eval)
if [ $TS -ge 30 ]; then
  train_all $TS
  PROBE=$(( $(el) + 150 )); [ $PROBE -gt $TD ] && PROBE=$TD
  wait_until $PROBE $TP; progress "probe"
  wait_until $TD $TP; [ -n "$TP" ] && stop_all $TP; echo "$(el) s: trainers ended" >> "$C"; progress "trained"
else echo "$(el) s: less than 30 s to train before END_S - GRID_S: no training" >> "$C"; fi
if [ -z "${TRAIN_ONLY:-}" ]; then
  grid m2g_deci m2_deci deci; grid m2g_vanilla m2_vanilla vanilla; grid m2g_vanilla_plus_deci m2_vanilla deci
  wait_until $(( END - 30 )) $GP
  for p in $GP; do alive $p &&
    echo "$(el) s: a grid (pid $p) was cut at END_S - 30: call grids again to finish its cells" >> "$C"; done
  [ -n "$GP" ] && stop_all $GP; echo "$(el) s: grids ended" >> "$C"
fi
for a in $ARMS; do n=${a%%:*}; finished $n && echo "$n: finished at step $(ckpt_step $n)" >> "$C" ||
  echo "$n: unfinished (latest checkpoint step $(ckpt_step $n)): call grids again" >> "$C"; done
echo "done at $(el) s" >> "$C"; tail -n 8 "$C"; ship
