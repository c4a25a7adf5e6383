"""Training throughput on 1 GPU vs N GPUs (torchrun DDP), same config and global batch.

    python benchmarks/bench_ddp.py --config configs/passkey_small_deci.json --steps 60 --gpus 2 \\
        --out benchmarks/results/ddp_h200x2

Each run trains ``--steps`` optimizer steps (global batch = grad_accum_steps samples) with the
initial evaluation cut to one cell; throughput is measured from the run's train_log.jsonl between
step --warmup and the last step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(n_gpus, args, out_dir):
    name = f"gpus{n_gpus}"
    sets = ["--set", f"max_step={args.steps}", "--set", "eval_steps=1000000", "--set", "save_steps=1000000",
            "--set", "niah_context_lens_eval=[1000]", "--set", "niah_needle_depths_eval=[0.5]",
            "--set", f"output_dir={out_dir}", "--set", "activate_logging=false"]
    cmd = [sys.executable, os.path.join(REPO, "finetune_ssm.py"), "--config", args.config, "--run-name", name, *sets]
    if n_gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}", *cmd[1:]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n_gpus))}
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    rows = [json.loads(x) for x in open(os.path.join(out_dir, name, "train_log.jsonl")) if '"wall_s"' in x]
    a, b = rows[args.warmup - 1], rows[-1]
    steps = b["step"] - a["step"]
    secs = b["wall_s"] - a["wall_s"]
    toks = steps * args.tokens_per_step
    return {"gpus": n_gpus, "steps_timed": steps, "seconds": round(secs, 2), "steps_per_s": round(steps / secs, 3),
            "tokens_per_s": round(toks / secs), "final_loss": round(b["loss"], 4)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/passkey_small_deci.json")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/ddp_h200x2")
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    args.tokens_per_step = cfg["grad_accum_steps"] * (cfg["niah_context_len_train"] + 29)   # +question, sep, answer
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(1, args, tmp), run(args.gpus, args, tmp)]
    rows[1]["speedup"] = round(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
    write_results(args.out, rows, ["gpus", "steps_timed", "seconds", "steps_per_s", "tokens_per_s", "speedup", "final_loss"],
                  "DDP training throughput (same global batch)",
                  f"Config {args.config}: global batch {cfg['grad_accum_steps']} samples of ~{cfg['niah_context_len_train']} "
                  f"tokens; {args.steps} steps, timed after step {args.warmup}.")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
