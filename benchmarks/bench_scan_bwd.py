"""Training step of the selective scan: the Triton forward + backward against mamba-ssm's, one GPU, one run.

    GIT_REV=$(git rev-parse --short HEAD) python benchmarks/bench_scan_bwd.py [--out benchmarks/results/scan_bwd_h200]

Forward and backward of one layer's scan (`selective_scan_fn`'s signature: D, z gating, delta_bias,
softplus; bf16 inputs with the model's strides; a random upstream gradient), CUDA-event time of the
pair after warm-up, median of the repetitions, at two training shapes: our pretraining LM's
(micro-batch 32 × 2,048 tokens, d_inner 448) and mamba-130m's (8 × 2,048, d_inner 1536); d_state 16.
Rows: mamba-ssm's `selective_scan_fn` (where it is installed: the device scripts can run this file
before or without the kernel build), ours through `DECIMAMBA_SCAN=triton`'s route
(`selective_scan_triton`) with the planned chunks, with one chunk (the backward before chunks), and
with fixed chunk sizes; the pure-PyTorch scan as a floor. Each row's gradients are compared with the
first row's (relative error in norm, worst input). Writes <out>.md and <out>.json after every shape.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_scan import cuda_ms  # noqa: E402
from benchmarks.common import write_results  # noqa: E402
from modules import kernels, triton_scan_bwd  # noqa: E402
from modules.selective_scan import selective_scan_ref, selective_scan_triton  # noqa: E402

COLS = ["shape", "impl", "chunks", "ms", "ratio_vs_mamba_ssm", "ratio_vs_one_chunk", "grad_rel_err"]
SHAPES = {"lm_24x224": (32, 448, 2048), "mamba_130m": (8, 1536, 2048)}


def inputs(b, d, length, n=16, dt_rank=14, seed=0):
    """bf16 leaves in the model's layouts (Δ channel-contiguous, B, C views into x_proj's output, z a
    slice of in_proj's), A as the S4D-real init, Δ's bias as dt_proj's initialisation."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16

    def leaf(t):
        return t.detach().requires_grad_()

    x_dbl = leaf(torch.randn(b, length, dt_rank + 2 * n, device="cuda", generator=g).to(bf))
    xz = leaf(torch.randn(b, 2 * d, length, device="cuda", generator=g).to(bf))
    dt = leaf((torch.randn(b, length, d, device="cuda", generator=g) * 0.5).to(bf))
    dt0 = torch.exp(torch.rand(d, device="cuda", generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    leaves = dict(x_dbl=x_dbl, xz=xz, dt=dt)
    args = dict(u=xz[:, :d], delta=dt.transpose(1, 2), A=-torch.arange(1, n + 1, device="cuda").float().repeat(d, 1),
                B=x_dbl[..., dt_rank:dt_rank + n].transpose(1, 2), C=x_dbl[..., dt_rank + n:].transpose(1, 2),
                D=torch.ones(d, device="cuda"), z=xz[:, d:], delta_bias=dt0 + torch.log(-torch.expm1(-dt0)))
    return leaves, args


def step(fn, leaves, args, gout, chunk=None):
    """One forward + backward (with the Triton backward's chunk size fixed if given); the leaves' gradients."""
    for t in leaves.values():
        t.grad = None
    saved = triton_scan_bwd.scan_backward
    if chunk:
        triton_scan_bwd.scan_backward = functools.partial(saved, chunk=chunk)
    try:
        fn(**args, delta_softplus=True).backward(gout)
    finally:
        triton_scan_bwd.scan_backward = saved
    return {k: t.grad for k, t in leaves.items()}


def rel_err(got, ref):
    return max(((got[k].float() - ref[k].float()).norm() / ref[k].float().norm()).item() for k in ref)


def shape_rows(name, shape, rows, args):
    b, d, length = shape
    leaves, inp = inputs(b, d, length)
    gout = torch.randn(b, d, length, device="cuda", dtype=torch.bfloat16)
    dev = inp["u"].device
    planned = triton_scan_bwd.plan_chunk(b * triton.cdiv(d, triton_scan_bwd._block_d(b, d, dev)), length,
                                         triton_scan_bwd._slots(dev))
    impls = []                                          # (name, scan, the backward's chunk size or None)
    if kernels.HAS_KERNELS:
        impls.append(("mamba_ssm selective_scan_fn", kernels.selective_scan_fn, None))
    impls.append(("triton, planned chunks", selective_scan_triton, planned))
    impls.append(("triton, one chunk", selective_scan_triton, length))
    impls += [(f"triton, chunk {c}", selective_scan_triton, c) for c in args.chunks]
    impls.append(("torch path (selective_scan_ref)", selective_scan_ref, None))
    ref = base = one = None
    for impl, fn, chunk in impls:
        if time.time() > args.deadline:
            break
        grads = {k: v.clone() for k, v in step(fn, leaves, inp, gout, chunk).items()}
        ref = grads if ref is None else ref
        t = cuda_ms(lambda: step(fn, leaves, inp, gout, chunk), args.reps)
        chunks = math.ceil(length / chunk) if chunk else 1
        base = t if base is None and impl.startswith("mamba_ssm") else base
        one = t if impl == "triton, one chunk" else one
        rows.append(dict(shape=f"{name} {b}x{d}x{length}", impl=impl, chunks=chunks, ms=round(t, 3),
                         ratio_vs_mamba_ssm=round(base / t, 2) if base else "",
                         ratio_vs_one_chunk=round(one / t, 2) if one else "", grad_rel_err=round(rel_err(grads, ref), 6)))
        print(rows[-1], flush=True)
    del leaves, inp, gout
    torch.cuda.empty_cache()


NOTES = ("One layer's scan, forward + backward (autograd), bf16 inputs in the model's strides, d_state 16, "
         "D, z, delta_bias, softplus; CUDA events, median. ratio = that row's ms / this row's (same run). "
         "grad_rel_err: the worst input's relative error in norm against the first row's gradients "
         "(mamba-ssm's where installed); bf16 gradients round at 2^-9.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scan_bwd_h200"))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--chunks", type=int, nargs="*", default=[128, 256, 512])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=120)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scan_bwd: needs a CUDA GPU (the Triton kernels compile for it)")
    args.deadline = time.time() + args.max_seconds
    rows = []
    for name in args.shapes:
        shape_rows(name, SHAPES[name], rows, args)
        write_results(args.out, rows, COLS, "Selective scan, forward + backward (training step)", NOTES)
    print(f"wrote {args.out}.md / .json", flush=True)


if __name__ == "__main__":
    main()
