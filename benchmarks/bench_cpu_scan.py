"""CPU speed of the pure-PyTorch path: ours vs a per-token sequential scan vs transformers' slow path.

    python benchmarks/bench_cpu_scan.py [--lengths 2048 4096 8192 16384] [--budget-s 120]

Same random weights in all three (a 4-layer, d_model 256 Mamba; the 130m shape does not fit a
2-core budget at 16K with the baselines). "sequential" is our model with its scan swapped for the
per-token oracle; "transformers" is MambaForCausalLM without kernels (its slow forward, a
per-token loop). A configuration whose predicted time exceeds --budget-s is skipped and marked.
Writes benchmarks/results/cpu_scan.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import modules.mamba_mixer as mixer_mod  # noqa: E402
from benchmarks.common import timeit, write_results  # noqa: E402
from models import MambaConfig, MambaLMHeadModel  # noqa: E402
from modules.selective_scan import selective_scan_sequential  # noqa: E402


def build(d_model, n_layer):
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=1000)
    ours = MambaLMHeadModel(cfg)
    hf = MambaForCausalLM(HFConfig(vocab_size=cfg.padded_vocab_size, hidden_size=d_model, state_size=16,
                                   num_hidden_layers=n_layer, expand=2, conv_kernel=4, use_bias=False,
                                   use_conv_bias=True, time_step_rank=math.ceil(d_model / 16),
                                   residual_in_fp32=True, tie_word_embeddings=False))
    hf.load_state_dict({k.replace("backbone.embedding.", "backbone.embeddings."): v
                        for k, v in ours.state_dict().items()})
    return ours, hf


def run_case(model, ids, backward):
    def fwd():
        with torch.set_grad_enabled(backward):
            out = model(ids)
            logits = out.logits
            if backward:
                logits.float().pow(2).mean().backward()
    return timeit(fwd, repeats=1 if ids.shape[1] > 4096 else 2, warmup=1 if ids.shape[1] <= 4096 else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--loop-backward-max", type=int, default=1024,
                    help="longest length at which the per-token loops run forward+backward (their backward is O(L^2))")
    ap.add_argument("--out", default="benchmarks/results/cpu_scan")
    args = ap.parse_args()
    torch.manual_seed(0)
    ours, hf = build(args.d_model, args.n_layer)
    rows, last = [], {}
    for mode in ("forward", "forward+backward"):
        bw = mode != "forward"
        for length in args.lengths:
            ids = torch.randint(0, 1000, (1, length))
            row = {"mode": mode, "tokens": length}
            for impl in ("ours", "sequential", "transformers"):
                if bw and impl != "ours" and length > args.loop_backward_max:
                    row[impl + "_s"] = "skipped (O(L^2) backward)"
                    continue
                prev = last.get((mode, impl))
                # skip when the last measurement scaled (quadratically for loop backward) exceeds the budget
                if prev and prev[1] * (length / prev[0]) ** (2 if bw and impl != "ours" else 1) > args.budget_s:
                    row[impl + "_s"] = "skipped (> budget)"
                    continue
                model = hf if impl == "transformers" else ours
                orig = mixer_mod.selective_scan
                if impl == "sequential":
                    mixer_mod.selective_scan = lambda *a, backend="auto", **k: selective_scan_sequential(*a, **k)
                try:
                    t = run_case(model, ids, bw)
                finally:
                    mixer_mod.selective_scan = orig
                model.zero_grad(set_to_none=True)
                last[(mode, impl)] = (length, t)
                row[impl + "_s"] = round(t, 3)
                print(f"{mode:17s} {length:6d} {impl:12s} {t:8.2f} s", flush=True)
            for impl in ("sequential", "transformers"):
                if isinstance(row.get(impl + "_s"), float):
                    row[f"{impl}/ours"] = round(row[impl + "_s"] / row["ours_s"], 1)
            rows.append(row)
    write_results(args.out, rows,
                  ["mode", "tokens", "ours_s", "sequential_s", "transformers_s", "sequential/ours", "transformers/ours"],
                  "CPU: pure-PyTorch paths, seconds per call (lower is better)",
                  f"Model: {args.n_layer} layers, d_model {args.d_model}, d_state 16, batch 1, fp32, random weights. "
                  "Ratios > 1 mean ours is faster.")


if __name__ == "__main__":
    main()
