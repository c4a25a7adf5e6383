"""Does TF32 alone move the Mamba-2 test models' gradients by ~1%? On the CPU: our torch SSD path with every
matrix product of its chunked scan (forward, and both products of each backward) fed TF32-rounded inputs, as
Triton's tl.dot does to fp32 inputs by default, against the same path in plain fp32.

    python benchmarks/mamba2_tf32_emulation.py --out benchmarks/results/mamba2_tf32_emulation

Models: tests/test_gpu_mamba2.py's (4 × 256, ngroups 2, 4,096 tokens), vanilla and DeciMamba; for DeciMamba the
plain fp32 run replays the TF32 run's kept tokens, as the GPU test's torch run replays the kernel run's. Only the
SSD scan's products are rounded (the GPU kernels also round elsewhere in fp32 order): a model of one error source,
not of the kernels (benchmarks/mamba2_kernel_interpreter.py runs the kernels themselves).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402

COLS = ["model", "what", "rel_err"]


def tf32(t: torch.Tensor) -> torch.Tensor:
    """t (fp32) rounded to TF32's 10-bit mantissa, to nearest (ties away from zero, as cvt.rna.tf32.f32)."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


class TF32MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.matmul(tf32(a), tf32(b))

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g = tf32(g)
        return torch.matmul(g, tf32(b).transpose(-1, -2)), torch.matmul(tf32(a).transpose(-1, -2), g)


class _TF32:
    """Within: the `@` products of modules.ssd._chunk_block (the chunked scan) go through TF32MatMul; nothing else."""
    def __enter__(self):
        from modules import ssd

        self.ssd, self.block, self.matmul = ssd, ssd._chunk_block, torch.Tensor.__matmul__

        def block(*args):
            torch.Tensor.__matmul__ = lambda a, b: TF32MatMul.apply(a, b)
            try:
                return self.block(*args)
            finally:
                torch.Tensor.__matmul__ = self.matmul
        ssd._chunk_block = block

    def __exit__(self, *exc):
        self.ssd._chunk_block = self.block


def run(deci):
    from tests.helpers import fwd_bwd, replayed_grad_errors
    from tests.test_gpu_mamba2 import DECI, _model

    torch.manual_seed(0)
    model = _model(deci=DECI if deci else None, device="cpu")
    ids = torch.randint(0, 1000, (1, 4096), generator=torch.Generator().manual_seed(0))

    def emulated(m, i):
        with _TF32():
            return fwd_bwd(m, i, "torch")
    rows = replayed_grad_errors(model, ids, emulated, lambda m, i: fwd_bwd(m, i, "torch"))
    return [dict(model="deci" if deci else "vanilla", **r) for r in rows]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = []
    for deci in (False, True):
        rows += run(deci)
        for r in rows[-6:]:
            print(r, flush=True)
        write_results(args.out, rows, COLS, "Mamba-2 test models: gradients with TF32-rounded SSD products (CPU)",
                      "rel_err: relative norm error of the TF32-emulated run against plain fp32, same model, tokens "
                      "and kept tokens (the plain run replays the TF32 run's). The GPU test's budget is 1e-2; its "
                      "DeciMamba case measured 1.18-1.22e-2 on the H200 (kernel vs torch).")


if __name__ == "__main__":
    main()
