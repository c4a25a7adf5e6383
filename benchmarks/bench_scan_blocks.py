"""The Triton scan's channels per program (block_d), in one run on one GPU; needs no mamba-ssm.

    GIT_REV=$(git rev-parse --short HEAD) python benchmarks/bench_scan_blocks.py [--out benchmarks/results/scan_blocks_h200]

bench_scan.py's inputs (mamba-130m shape, bf16, D, z, delta_bias, softplus) at 16K, 128K and 1M tokens,
in the model's strides and contiguous, for block_d 128 (the first default), 64 and 32: CUDA-event
median ms, the ratio to block_d 128 in the same run, and the output's error against block_d 128's
(the same arithmetic in another order: they differ by fp32 rounding only). Ratios against mamba-ssm
are bench_scan.py's (it needs the compiled kernels).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_scan import cuda_ms, errors, scan_inputs  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from modules.triton_scan import selective_scan_fwd  # noqa: E402

COLS = ["layout", "tokens", "block_d", "ms", "ratio_vs_block_128", "rel_err_vs_block_128"]
NOTES = ("Scan: batch 1, d_inner 1536, d_state 16, bf16, D, z, delta_bias, softplus; CUDA events, median. "
         "ratio_vs_block_128 = block-128 ms / this row's ms (same run).")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/scan_blocks_h200")
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072, 1 << 20])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scan_blocks.py: needs a CUDA GPU")
    rows, reps = [], {16384: 30, 131072: 10, 1 << 20: 3}
    for length in args.lengths:
        x = scan_inputs(length)
        contig = dict(x, delta=x["delta"].contiguous(), B=x["B"].contiguous(), C=x["C"].contiguous())
        for layout, inp in (("model strides", x), ("contiguous", contig)):
            ref = base = None
            for block in (128, 64, 32):
                y = selective_scan_fwd(**inp, delta_softplus=True, block_d=block)
                t = cuda_ms(lambda: selective_scan_fwd(**inp, delta_softplus=True, block_d=block), reps.get(length, 5))
                ref, base = (y, t) if ref is None else (ref, base)
                rows.append(dict(layout=layout, tokens=length, block_d=block, ms=round(t, 4),
                                 ratio_vs_block_128=round(base / t, 2), rel_err_vs_block_128=errors(y, ref)[0]))
                print(rows[-1], flush=True)
        del x, contig, ref
        torch.cuda.empty_cache()
        write_results(args.out, rows, COLS, "Triton selective scan: channels per program (H200)", NOTES)


if __name__ == "__main__":
    main()
