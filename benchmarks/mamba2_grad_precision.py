"""Mamba-2 gradients, mamba-ssm's SSD kernels against our torch path in fp32, on tests/test_gpu_mamba2.py's
models (vanilla, and DeciMamba with the torch run replaying the kernel run's kept tokens).

    [TRITON_F32_DEFAULT=ieee TRITON_CACHE_DIR=<fresh>] python3 benchmarks/mamba2_grad_precision.py --out <stem>
        [--models vanilla deci]

The GPU test's DeciMamba case failed its 1% gradient budget twice on the H200 (1.22%, then 1.18% with the
selections replayed). Triton multiplies fp32 tl.dot inputs in TF32 unless TRITON_F32_DEFAULT=ieee; run once each
way, this says whether TF32 alone explains the gap. Rows: the five parameters with the largest relative-norm
gradient error per model, and the logits' error; the precision and commit are in the results file.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402

COLS = ["model", "dot_precision", "what", "rel_err"]


def run(deci, precision):
    from modules import mamba2_mixer
    from tests.helpers import fwd_bwd, rel_err
    from tests.test_gpu_mamba2 import DECI, _model

    torch.manual_seed(0)
    model = _model(deci=DECI if deci else None)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    o_k, _, g_k = fwd_bwd(model, ids, "kernel")
    saved = mamba2_mixer.kept_from_scores
    if deci:                                   # the torch run keeps the tokens the kernel run kept
        replay = iter([keep.unsqueeze(0) for _, keep in o_k.kept_indices])
        mamba2_mixer.kept_from_scores = lambda *args: next(replay)
    try:
        o_t, _, g_t = fwd_bwd(model, ids, "torch")
    finally:
        mamba2_mixer.kept_from_scores = saved
    name = "deci" if deci else "vanilla"
    rows = [dict(model=name, dot_precision=precision, what="logits", rel_err=rel_err(o_k.logits, o_t.logits))]
    errs = sorted(((rel_err(g_k[n], g_t[n]), n) for n in g_t), reverse=True)[:5]
    rows += [dict(model=name, dot_precision=precision, what=f"grad {n}", rel_err=e) for e, n in errs]
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", choices=["vanilla", "deci"], default=["vanilla", "deci"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mamba2_grad_precision.py: needs a CUDA GPU and mamba-ssm's SSD kernels")
    precision = os.environ.get("TRITON_F32_DEFAULT") or "tf32 (Triton's default)"
    rows = []
    for name in args.models:
        rows += run(name == "deci", precision)
        for r in rows[-6:]:
            print(r, flush=True)
        write_results(args.out, rows, COLS, "Mamba-2 fp32 gradients: SSD kernels vs the torch path (H200)",
                      "rel_err: relative norm error, kernel run against torch run, same model and tokens.")


if __name__ == "__main__":
    main()
