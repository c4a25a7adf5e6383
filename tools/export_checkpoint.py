"""Copy a checkpoint with its weights cast (bf16 by default) to make a small shippable model.

    python tools/export_checkpoint.py SRC_DIR DEST_DIR [--dtype bfloat16]

A_log, D and dt_proj.bias stay float32, as in upstream mamba-ssm (they set the SSM's decay and
step size, where bf16 rounding changes the dynamics); every other weight gets --dtype. The result
loads with from_pretrained like any checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MambaLMHeadModel  # noqa: E402

KEEP_FP32 = (".A_log", ".D", ".dt_proj.bias")


def cast_for_export(model, dtype: torch.dtype) -> None:
    """Cast ``model``'s parameters to ``dtype`` in place, except KEEP_FP32 (float32)."""
    for name, p in model.named_parameters():          # a tied weight appears once
        p.data = p.data.to(torch.float32 if name.endswith(KEEP_FP32) else dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    model = MambaLMHeadModel.from_pretrained(args.src, dtype=torch.float32)
    cast_for_export(model, getattr(torch, args.dtype))
    model.save_pretrained(args.dest)
    size = os.path.getsize(os.path.join(args.dest, "model.safetensors")) / 2**20
    print(f"{args.dest}: {model.num_parameters() / 1e6:.2f}M parameters, {size:.1f} MiB "
          f"({args.dtype}; A_log, D, dt_proj.bias float32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
