"""Mamba-2 GPU prefill benchmark: our vanilla model, mamba-ssm's own MambaLMHeadModel with Mamba-2
layers (same random weights) and our DeciMamba, bf16, batch 1, one forward to the last token's logits.

    python benchmarks/bench_mamba2_gpu.py [--out benchmarks/results/gpu_h200_mamba2] [--max-seconds 170]

Shapes: mamba2-130m (d_model 768, 24 layers) and mamba2-370m (1024, 48); d_state 128, headdim 64,
ngroups 1, chunk 256 (mamba-ssm's Mamba2 defaults). Lengths 16K, 128K, 1M. DeciMamba decimates at
the middle layer (L_base 2000, beta 0.5, as the passkey preset). Rows: tokens/s and peak GPU memory;
at 16K also the relative difference of our vanilla logits from mamba-ssm's. mamba-ssm is not run
where its fused kernel would pass int32 offsets (tokens × in_proj rows > 2³¹: it would read out of
bounds); ours scans such lengths in segments (modules/ssd.py). Rows are written after each
measurement, and the run stops at --max-seconds (first-call Triton autotuning included).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import timeit, write_results  # noqa: E402
from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel  # noqa: E402

COLS = ["shape", "impl", "tokens", "seconds", "tok_per_s", "peak_GB", "ratio_vs_mamba_ssm", "rel_diff_vs_mamba_ssm", "note"]
SHAPES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48)}
VOCAB = 50277


def build(d_model, n_layer):
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba2"})
    torch.manual_seed(0)
    van = MambaLMHeadModel(cfg)
    deci = DecimatingMambaModel(cfg, decimation_config=dict(activate=True, beta=0.5, L_base=2000,
                                                            decimating_layers=[n_layer // 2], min_seq_len=20))
    deci.load_state_dict(van.state_dict())
    impls = {"ours_vanilla": van, "ours_deci": deci}
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as RefConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as Ref

        ref = Ref(RefConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg={"layer": "Mamba2"},
                            tie_embeddings=False))
        ref.load_state_dict(van.state_dict())
        impls["mamba_ssm"] = ref
    except Exception as exc:  # noqa: BLE001 - any import or build failure only drops the reference row
        print(f"mamba_ssm reference unavailable: {exc}", flush=True)
    return impls, van.backbone.layers[0].mixer.in_proj.out_features


def logits(model, ids):
    with torch.no_grad():
        out = model(ids, num_last_tokens=1)
    return out.logits if hasattr(out, "logits") else out[0]


def measure(model, ids, reps):
    torch.cuda.reset_peak_memory_stats()
    try:
        t = timeit(lambda: logits(model, ids), repeats=reps, warmup=1, sync=torch.cuda.synchronize)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return t, round(torch.cuda.max_memory_allocated() / 2**30, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_h200_mamba2")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072, 1048576])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--max-seconds", type=float, default=170)
    args = ap.parse_args(argv)
    deadline = time.time() + args.max_seconds
    rows = []
    for shape in args.shapes:
        impls, d_in_proj = build(*SHAPES[shape])
        for length in args.lengths:
            ids = torch.randint(0, VOCAB, (1, length), device="cuda")
            base, ref_logits = None, None
            for name in ("mamba_ssm", "ours_vanilla", "ours_deci"):
                if name not in impls:
                    continue
                row = {"shape": shape, "impl": name, "tokens": length}
                if time.time() > deadline:
                    row["note"] = "not run: --max-seconds reached"
                elif name == "mamba_ssm" and length * d_in_proj > 2**31 - 1:
                    row["note"] = "not run: fused kernel would pass int32 offsets"
                else:
                    impls[name].to("cuda", torch.bfloat16).eval()       # one model on the GPU: peak is its own
                    t, mem = measure(impls[name], ids, reps=1 if length > 131072 else 2)
                    row.update(seconds=t, peak_GB=mem, tok_per_s=None if t is None else round(length / t),
                               note="" if t is not None else "out of memory")
                    if name == "mamba_ssm":
                        base = t
                    if length == args.lengths[0] and name != "ours_deci" and t is not None:
                        lg = logits(impls[name], ids).float()
                        if name == "mamba_ssm":
                            ref_logits = lg
                        elif ref_logits is not None:
                            row["rel_diff_vs_mamba_ssm"] = round(((lg - ref_logits).norm() / ref_logits.norm()).item(), 5)
                    if base and t:
                        row["ratio_vs_mamba_ssm"] = round(base / t, 2)
                    impls[name].to("cpu")
                    torch.cuda.empty_cache()
                rows.append(row)
                print(row, flush=True)
                write_results(args.out, rows, COLS, "Mamba-2 GPU prefill (bf16, batch 1): tokens/s and peak memory",
                              notes="ratio_vs_mamba_ssm: mamba-ssm's seconds / this row's (> 1: faster than mamba-ssm).")
            del ids
    return 0


if __name__ == "__main__":
    sys.exit(main())
