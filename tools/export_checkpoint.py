"""Copy a checkpoint with its weights cast (bf16 by default) to make a small shippable model.

    python tools/export_checkpoint.py SRC_DIR DEST_DIR [--dtype bfloat16]

The result loads with from_pretrained like any checkpoint (weights are cast back to the dtype the
model is built in, fp32 by default).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import MambaLMHeadModel  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    model = MambaLMHeadModel.from_pretrained(args.src, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.dest)
    size = os.path.getsize(os.path.join(args.dest, "model.safetensors")) / 2**20
    print(f"{args.dest}: {model.num_parameters() / 1e6:.2f}M parameters, {size:.1f} MiB ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
