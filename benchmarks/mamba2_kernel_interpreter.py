"""mamba-ssm's SSD kernels against our torch path on tests/test_gpu_mamba2.py's models, on the CPU: the kernels run in
Triton's interpreter, whose tl.dot multiplies in full fp32, or with its fp32 dot inputs rounded to TF32, to nearest
(--tf32), as the GPU's tl.dot uses TF32 by default. It asks whether TF32 explains the GPU test's 1.18-1.22% on the DeciMamba model's gradients.

    python benchmarks/mamba2_kernel_interpreter.py --tokens 4096 --l-base 1000 --models deci [--tf32] --out <stem>

mamba-ssm's sources come from its source archive (--sdist; default ../shared/device/, as tests/test_ssd_interpreter.py
finds it). The models are the GPU test's (4 x 256, ngroups 2, d_state 128, decimation at layers 1 and 2 with
β 0.5), on random tokens. The torch run replays the kernel run's kept tokens. Rows: the logits' error and the five
parameters with the largest gradient error (relative norm). The kernel path takes minutes per model here
(4,096 tokens: ~15 minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["TRITON_INTERPRET"] = "1"          # before Triton defines any kernel
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import write_results  # noqa: E402

COLS = ["model", "tokens", "dots", "what", "rel_err"]


def load_sources(sdist):
    """mamba-ssm's Python package from its archive into a temporary folder on sys.path."""
    from tests.helpers import extract_mamba_ssm

    if not os.path.exists(sdist):
        sys.exit(f"mamba2_kernel_interpreter.py: no mamba-ssm source archive at {sdist} (pass --sdist)")
    sys.path.insert(0, extract_mamba_ssm(sdist, tempfile.mkdtemp(prefix="mamba_ssm_src.")))


def round_dots_to_tf32():
    """The interpreter's tl.dot with fp32 inputs rounded to TF32 first (its own rounding helper), unless the
    kernel asked for IEEE precision."""
    from triton.runtime import interpreter as itp

    exact = itp.InterpreterBuilder.create_dot

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and "ieee" not in str(input_precision).lower():
            a = itp.TensorHandle(itp._round_f32_to_tf32(a.data), a.dtype.scalar)
            b = itp.TensorHandle(itp._round_f32_to_tf32(b.data), b.dtype.scalar)
        return exact(self, a, b, d, input_precision, max_num_imprecise_acc)
    itp.InterpreterBuilder.create_dot = dot


def run(name, tokens, l_base):
    from tests.helpers import fwd_bwd, replayed_grad_errors
    from tests.test_gpu_mamba2 import _model

    deci = None if name == "vanilla" else dict(activate=True, beta=0.5, L_base=l_base, decimating_layers=[1, 2],
                                                 min_seq_len=20)
    torch.manual_seed(0)
    model = _model(deci=deci, device="cpu")
    ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    return replayed_grad_errors(model, ids, lambda m, i: fwd_bwd(m, i, "kernel"), lambda m, i: fwd_bwd(m, i, "torch"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--l-base", type=int, default=1000)
    p.add_argument("--models", nargs="+", choices=["vanilla", "deci"], default=["vanilla", "deci"])
    p.add_argument("--tf32", action="store_true", help="round the dots' fp32 inputs to TF32 (the GPU's default)")
    p.add_argument("--sdist", default=os.environ.get("DECIMAMBA_MAMBA_SSM_SDIST") or
                   os.path.join(ROOT, "..", "shared", "device", "mamba_ssm-2.3.2.post1.tar.gz"))
    args = p.parse_args()
    load_sources(args.sdist)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_ssd_interpreter import _interpreter_shims

    _interpreter_shims()
    if args.tf32:
        round_dots_to_tf32()
    rows = []
    for name in args.models:
        rows += [dict(model=name, tokens=args.tokens, dots="tf32" if args.tf32 else "fp32", **r)
                 for r in run(name, args.tokens, args.l_base)]
        for r in rows[-6:]:
            print(r, flush=True)
        write_results(args.out, rows, COLS,
                      "Mamba-2: mamba-ssm's SSD kernels (Triton interpreter, CPU) vs the torch path",
                      "rel_err: relative norm error, kernel path against torch path, same model, tokens and kept "
                      "tokens. dots: the interpreter's tl.dot exact (fp32) or with TF32-rounded inputs (tf32).")


if __name__ == "__main__":
    main()
