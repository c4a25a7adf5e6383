"""One selective-scan call for Nsight Compute to profile (the rest of the process is not profiled).

    ncu --clock-control none --profile-from-start off --section ... \
        python3 benchmarks/profile_scan.py --impl triton [--tokens 131072] [--prefetch 1 1] [--block-d 64]

mamba-130m's scan shape, batch 1, bf16, D, z, delta_bias, softplus, in the model's strides for ours and
contiguous for mamba-ssm's selective_scan_fn (as benchmarks/bench_scan.py times them). Two warm-up calls
compile and plan; the third runs between cudaProfilerStart and cudaProfilerStop. benchmarks/gpu_scan.sh
runs it under ncu and keeps the report's text.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_scan import scan_inputs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=["triton", "mamba_ssm"], required=True)
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--prefetch", type=int, nargs=2, default=None, metavar=("PASS1", "PASS3"))
    p.add_argument("--block-d", type=int, default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_scan.py: needs a CUDA GPU (ncu profiles GPU kernels)")
    x = scan_inputs(args.tokens)
    if args.impl == "mamba_ssm":
        from modules import kernels
        if not kernels.HAS_KERNELS:
            sys.exit(f"profile_scan.py --impl mamba_ssm: mamba-ssm does not import ({kernels.KERNEL_IMPORT_ERROR})")
        x = dict(x, delta=x["delta"].contiguous(), B=x["B"].contiguous(), C=x["C"].contiguous())
        call = lambda: kernels.selective_scan_fn(**x, delta_softplus=True)  # noqa: E731
    else:
        from modules.triton_scan import selective_scan_fwd
        kw = dict(block_d=args.block_d, prefetch=None if args.prefetch is None else tuple(args.prefetch))
        call = lambda: selective_scan_fwd(**x, delta_softplus=True, **kw)  # noqa: E731
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one {args.impl} scan of {args.tokens} tokens", flush=True)


if __name__ == "__main__":
    main()
