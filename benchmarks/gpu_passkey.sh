#!/usr/bin/env bash
# The paper's passkey recipe on our pretrained LM (issue 13, items 2 and 4), in consecutive calls on one warm H200:
#   bash benchmarks/gpu_passkey.sh ft END_S     build the kernels and, meanwhile, fine-tune the pretrained LM at 2K on
#                                               the Triton scan, the default without them (vanilla; DeciMamba at layer 5, the Mean-Distance
#                                               layer; DeciMamba at layer 12, the paper's), then resume on the kernels
#   bash benchmarks/gpu_passkey.sh grids END_S  (same machine) finish those; fine-tune vanilla / DeciMamba-12 at 512
#                                               tokens (item 4); grids 5 depths x 5 samples x 1K..128K (+ the vanilla
#                                               fine-tune with decimation at 5 and 12), then 256K..1M streamed
#   SHIP_WEIGHTS=RUN bash benchmarks/gpu_passkey.sh ship   (same machine) RUN's latest weights only
#   PRETRAINED=NAME bash benchmarks/gpu_passkey.sh short END_S   one call for a model pretrained at a short context
#                                               (gpu_repro.sh PRETRAIN_NAME=NAME, same machine; item 4): fine-tune at
#                                               FT_LEN tokens (default 512) vanilla, DeciMamba at 12 and at the run's
#                                               Mean-Distance layer (NAME_<checkpoint>_mean_distance.json), grids 512 ... 128K and
#                                               256K ... 1M, and the pretrained model's perplexity by length; its runs
#                                               are named NAME_s_*, NAME_gs_*, NAME_ppl_* (a second model gets its own);
#                                               FT_ONLY=1: fine-tunes only, to END_S (a Mamba-2 fine-tune's first step
#                                               took 123 s on the SSD kernels, 0.45 s the later ones: a call of its own);
#                                               PPL_ONLY=1: the perplexity by length only; SKIP_PPL=1: no perplexity (it
#                                               was measured on these weights before); PRETRAINED=DIR also takes a
#                                               carried export (config.json, model.safetensors, and a mean_distance.json
#                                               whose first_global_layer adds the Mean-Distance arm); MD_LAYER=N names it
# END_S: seconds from the start at which the stage stops its runs and packs up (keep it under the call's limit).
# Carried: artifacts/pretrained/ (the step-3,866 weights of gpu_repro.sh; or PRETRAINED=DIR, or PRETRAINED=pretrain
# for the latest checkpoint of gpu_repro.sh's run on the same machine), .device/ (kernel sources + build script),
# .whl/ (the nltk wheel; the passkey haystack splits sentences with it; regex, click, joblib and tqdm are on the
# machine). Runs stay in /tmp/runs between the calls. Back in $OUT: logs.tgz (every run's log, results and train log,
# commands.txt) and, with SHIP_WEIGHTS=RUN, RUN.tar.part_* (bf16, A_log/D/dt_proj.bias fp32, 15 MiB parts).
# The device copy's .git is stale: call with DECIMAMBA_COMMIT=<the commit, typed here> so every record names the
# code that ran (commit first: the working tree runs as it is).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT/logs"; OUT=$(cd "$OUT" && pwd); L=$OUT/logs
STAGE=${1:-}; END=${2:-560}
. "$(dirname "$0")/gpu_common.sh"   # el, latest, have_kernels, alive, wait_until, stop_all
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONPATH=/tmp/site:$PWD$(ssd_path)
[ -n "${DECIMAMBA_COMMIT:-}" ] || echo "warning: DECIMAMBA_COMMIT is not set: records will name the copy's stale .git" | tee -a "$L/commands.txt"
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
python3 -c 'import nltk' 2>/dev/null || { echo "no nltk on this machine: carry .whl/ with its wheel (README of this script)"; exit 1; }
ROOT=$PWD; RUNS=/tmp/runs; W0=/tmp/pretrained; [ "$STAGE" = short ] && W0=/tmp/pretrained_short_$(basename "${PRETRAINED:-none}")  # one per model: two may share a call
mkdir -p $RUNS

ARMS2K="ft_vanilla:vanilla:12:2000 ft_deci5:deci:5:2000 ft_deci12:deci:12:2000"
ARMS512="ft512_vanilla:vanilla:12:512 ft512_deci12:deci:12:512"
FT=(--set load_cp=$W0 --set scratch_model_config=null --set output_dir=$RUNS --set niah_context_len_train_curriculum=null
    --set lr=3e-4 --set warmup_steps=20 --set grad_accum_steps=16 --set train_micro_batch_size=16 --set max_step=768
    --set epochs=2 --set eval_steps=768 --set save_steps=128 --set decimation_beta=0.5
    --set 'niah_context_lens_eval=[2000,8000]')
ft_all() {  # NAME:ARCH:LAYER:TRAIN_LEN ... in the background (pids FTP): resume a run that has a checkpoint, else start it
  FTP=""; local a n arch layer len
  for a in "$@"; do IFS=: read -r n arch layer len <<< "$a"
    if [ -n "$(latest $RUNS/$n)" ]; then args=(--resume $RUNS/$n)
    else rm -rf $RUNS/$n; args=(--config configs/passkey_small_$arch.json --run-name $n "${FT[@]}"
      --set "decimating_layers=[$layer]" --set niah_context_len_train=$len --set decimation_max_p_L_base=$len); fi
    echo "$(el) s: finetune_ssm.py ${args[*]}" >> "$L/commands.txt"
    nice -n 10 python3 finetune_ssm.py "${args[@]}" >> "$L/$n.log" 2>&1 & FTP="$FTP $!"; done
}
ft_stop() { stop_all $FTP; echo "fine-tunes stopped at $(el) s" >> "$L/commands.txt"; }
GP=""
grid() {  # NAME ARCH RUN LAYER L_BASE LENS [--set ...]: 5 depths x 5 samples per length, in the background (pids GP)
  local n=$1 arch=$2 w layer=$4 lbase=$5 lens=$6; w=$(latest $RUNS/$3); shift 6
  [ -n "$w" ] || { echo "$n: no checkpoint of $RUNS/$3" >> "$L/commands.txt"; return; }
  n=${n}_$(basename "$w")   # one folder per checkpoint: finetune_ssm.py refuses other settings in a run's folder
  args=(--config configs/passkey_small_$arch.json --run-name $n --set eval_mode=true --set output_dir=$RUNS
        --set load_cp=$w --set scratch_model_config=null --set niah_samples_per_cell=5 --set "decimating_layers=[$layer]"
        --set decimation_max_p_L_base=$lbase --set "niah_context_lens_eval=$lens" --set eval_batch_tokens=524288 "$@")
  echo "$(el) s: finetune_ssm.py ${args[*]}" >> "$L/commands.txt"
  python3 finetune_ssm.py "${args[@]}" > "$L/$n.log" 2>&1 & GP="$GP $!"
}
ship() {  # every run's train log and results, the logs, nvidia-smi
  local r b
  for r in $RUNS/*; do [ -d $r ] || continue; b=$(basename $r)
    for f in results.jsonl train_log.jsonl; do [ -f $r/$f ] && cp $r/$f "$L/${b}_$f"; done; done
  if [ -n "${SHIP_WEIGHTS:-}" ] && [ -n "$(latest $RUNS/$SHIP_WEIGHTS)" ]; then   # one run's weights, bf16, <= 15 MiB parts
    rm -rf /tmp/export; python3 tools/export_checkpoint.py "$(latest $RUNS/$SHIP_WEIGHTS)" /tmp/export >> "$L/commands.txt" 2>&1 &&
      (cd /tmp/export && tar cf - . | split -b 15M - "$OUT/$SHIP_WEIGHTS.tar.part_"); fi
  nvidia-smi > "$L/nvidia-smi.txt" 2>&1; tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
}
take_pretrained() {  # PRETRAINED: a folder, a run name in $RUNS (its latest checkpoint), or artifacts/pretrained
  P=${PRETRAINED:-$ROOT/artifacts/pretrained}
  if [ -d "$RUNS/$P" ]; then P=$(latest "$RUNS/$P"); [ -n "$P" ] || { echo "run $RUNS/$PRETRAINED has no checkpoint"; exit 1; }; fi
  [ -f "$P/model.safetensors" ] || { echo "no pretrained weights at '$P'"; exit 1; }
  rm -rf $W0; mkdir -p $W0 && cp "$P"/config.json "$P"/model.safetensors $W0/ && echo "pretrained: $P" >> "$L/commands.txt"
  if ssd_mode && ! is_mamba2 $W0; then   # else a Mamba-1 model would run on the torch path, "kernels" or not
    echo "SSD_FROM_SOURCE=1 serves Mamba-2 models; $P is Mamba-1: run without it" | tee -a "$L/commands.txt"; exit 1
  fi
}
ppl_by_length() {  # NAME ARCH_ARGS...: perplexity of $W0 on the validation books (5 windows per book), background (GP)
  local n=$1; shift
  args=(--config configs/pretrain_gutenberg.json --run-name $n --set eval_mode=true --set dataset=ppl_test
        --set output_dir=$RUNS --set load_cp=$W0 --set scratch_model_config=null --set pg19_dir=/tmp/lm_corpus/pg19_validation
        --set ppl_test_num_windows_per_context_len_eval=5 --set "ppl_test_context_lens_eval=$LENS512" "$@")
  echo "$(el) s: finetune_ssm.py ${args[*]}" >> "$L/commands.txt"
  python3 finetune_ssm.py "${args[@]}" > "$L/$n.log" 2>&1 & GP="$GP $!"
}
ppl_pair() {  # the short stage's perplexity runs of $W0: vanilla, and DeciMamba zero-shot at layer 12 with L_base $N
  ppl_by_length ${T}_ppl_vanilla; ppl_by_length ${T}_ppl_deci12 --set mamba_arch=deci --set activate_decimation=true \
    --set 'decimating_layers=[12]' --set decimation_beta=0.5 --set decimation_max_p_L_base=$N
}
LENS='[1000,2000,4000,8000,16000,32000,64000,128000]'; LENS512='[512,1000,2000,4000,8000,16000,32000,64000,128000]'
case $STAGE in
  ft)
    take_pretrained
    build_bg "$ROOT"/.device "$L/build.log"
    ft_all $ARMS2K
    wait_until $(( END - 60 )) $BUILD
    if triton_mode || ssd_mode; then :         # already on the Triton scan / the SSD kernels: no restart
    elif have_kernels; then ft_stop; echo "resume on the kernels at $(el) s" >> "$L/commands.txt"; ft_all $ARMS2K
    else echo "the kernels did not build by $(el) s (build.log): the next call must build them again" >> "$L/commands.txt"; fi
    wait_until $(( END - 40 )) $FTP; ft_stop; [ -n "$BUILD" ] && { pkill -P $BUILD; kill $BUILD; } 2>/dev/null; ship ;;
  grids)
    [ -f $W0/model.safetensors ] && [ -n "$(latest $RUNS/ft_vanilla)" ] || { echo "grids runs on the ft call's machine (no $RUNS/ft_vanilla checkpoint here)"; exit 1; }
    have_kernels || echo "no kernels on this machine: the Triton scan runs where Triton imports, else the torch path (128K and longer will not finish)" >> "$L/commands.txt"
    ft_all $ARMS2K $ARMS512; wait_until $(( END / 3 )) $FTP; ft_stop
    grid g_vanilla vanilla ft_vanilla 12 2000 "$LENS"; grid g_deci5 deci ft_deci5 5 2000 "$LENS"
    grid g_deci12 deci ft_deci12 12 2000 "$LENS"; grid g_vanilla_deci5 deci ft_vanilla 5 2000 "$LENS"
    grid g_vanilla_deci12 deci ft_vanilla 12 2000 "$LENS"
    grid g512_vanilla vanilla ft512_vanilla 12 512 "$LENS512"; grid g512_deci12 deci ft512_deci12 12 512 "$LENS512"
    wait_until $(( END * 2 / 3 )) $GP; GP1=$GP; GP=""
    S=(--set eval_prefill_chunk_size=65536)
    grid g_vanilla_long vanilla ft_vanilla 12 2000 '[256000,512000,1000000]' "${S[@]}"
    grid g_deci12_long deci ft_deci12 12 2000 '[256000,512000,1000000]' "${S[@]}"
    grid g_deci5_long deci ft_deci5 5 2000 '[256000,512000,1000000]' "${S[@]}"
    wait_until $(( END - 30 )) $GP1 $GP; stop_all $GP1 $GP; ship ;;
  short)
    have_kernels || { echo "no kernels on this machine: run gpu_repro.sh here first"; exit 1; }
    : "${PRETRAINED:?the short stage needs PRETRAINED=<a gpu_repro.sh run name on this machine, or a carried export>}"
    [ -d "$RUNS/$PRETRAINED" ] || [ -f "$PRETRAINED/model.safetensors" ] ||
      { echo "PRETRAINED=$PRETRAINED: no run $RUNS/$PRETRAINED on this machine and no model.safetensors there"; exit 1; }
    take_pretrained; N=${FT_LEN:-512}; T=$(basename "$PRETRAINED")
    MDF="$RUNS/${T}_$(basename "$P")_mean_distance.json"; [ -f "$MDF" ] || MDF=$P/mean_distance.json  # gpu_repro.sh's, or carried
    MD=${MD_LAYER:-$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["first_global_layer"])' "$MDF" 2>/dev/null)}
    echo "Mean-Distance layer: ${MD:-unknown}" >> "$L/commands.txt"
    if [ "${PPL_ONLY:-0}" = 1 ]; then   # the pretrained model's perplexity by length alone
      ppl_pair; wait_until $(( END - 30 )) $GP; stop_all $GP; ship; echo "done at $(el) s"; exit 0; fi
    ARMS="${T}_s_vanilla:vanilla:12:$N ${T}_s_deci12:deci:12:$N"; [ -n "$MD" ] && [ "$MD" != 12 ] && ARMS="$ARMS ${T}_s_deci$MD:deci:$MD:$N"
    if [ "${FT_ONLY:-0}" = 1 ]; then   # the whole call for the fine-tunes (a later `short` call resumes them, then grids)
      ft_all $ARMS; wait_until $(( END - 40 )) $FTP; ft_stop; ship; echo "done at $(el) s"; exit 0; fi
    ft_all $ARMS; wait_until $(( END * 2 / 5 )) $FTP; ft_stop
    [ "${SKIP_PPL:-0}" = 1 ] || ppl_pair
    grid ${T}_gs_vanilla vanilla ${T}_s_vanilla 12 $N "$LENS512"; grid ${T}_gs_deci12 deci ${T}_s_deci12 12 $N "$LENS512"
    grid ${T}_gs_vanilla_deci12 deci ${T}_s_vanilla 12 $N "$LENS512"
    [ -n "$MD" ] && [ "$MD" != 12 ] && { grid ${T}_gs_deci$MD deci ${T}_s_deci$MD $MD $N "$LENS512"
                                         grid ${T}_gs_vanilla_deci$MD deci ${T}_s_vanilla $MD $N "$LENS512"; }
    wait_until $(( END * 7 / 10 )) $GP; GP1=$GP; GP=""
    S=(--set eval_prefill_chunk_size=65536)
    grid ${T}_gs_vanilla_long vanilla ${T}_s_vanilla 12 $N '[256000,512000,1000000]' "${S[@]}"
    grid ${T}_gs_deci12_long deci ${T}_s_deci12 12 $N '[256000,512000,1000000]' "${S[@]}"
    wait_until $(( END - 70 )) $GP1 $GP; stop_all $GP1 $GP; ship ;;
  ship) ship ;;                     # SHIP_WEIGHTS=<run> bash benchmarks/gpu_passkey.sh ship: weights only
  *) echo "usage: gpu_passkey.sh ft|grids|short|ship END_SECONDS"; exit 2 ;;
esac
echo "done at $(el) s"
