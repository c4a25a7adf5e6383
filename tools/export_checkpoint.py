"""Copy a checkpoint with its weights cast (bf16 by default) to make a small shippable model.

    python tools/export_checkpoint.py SRC_DIR DEST_DIR [--dtype bfloat16] [--overwrite]

A_log, D and Δ's bias (Mamba-1 dt_proj.bias, Mamba-2 dt_bias) stay float32, as in upstream mamba-ssm (they
set the SSM's decay and step size, where bf16 rounding changes the dynamics); every other weight gets --dtype. The result
loads with from_pretrained like any checkpoint.

DEST_DIR must be new or empty. --overwrite replaces a checkpoint folder: the export's config.json
and model.safetensors replace its checkpoint files (config, weights in any format, tokenizer, run
config, training state: every one describes the old model), other files (a README) are kept; a
folder holding folders (a run folder) is refused. The folder is built beside DEST_DIR and swapped
in, so DEST_DIR is either the old folder or the whole export, never a mix.
"""
from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.checkpoint import LEGACY_STATE, RUN_CONFIG, STATE_INDEX, STATE_TENSORS  # noqa: E402
from engine.errors import DiskFullError, fsync_dir, is_disk_full  # noqa: E402
from models import MambaLMHeadModel  # noqa: E402
from models.mamba_lm import KEEP_FP32, keeps_fp32  # noqa: E402  (what from_pretrained keeps in fp32: one list)
from tools.cli import OneLineParser, run_cli  # noqa: E402

# files of a checkpoint (what from_pretrained, the tools and --resume read), replaced by an --overwrite export
CHECKPOINT_NAMES = {"config.json", "tokenizer.json", RUN_CONFIG, STATE_INDEX, STATE_TENSORS, LEGACY_STATE}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".index.json", ".pt")


def cast_for_export(model, dtype: torch.dtype) -> None:
    """Cast ``model``'s parameters to ``dtype`` in place, except KEEP_FP32 (float32)."""
    for name, p in model.named_parameters():          # a tied weight appears once
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)


def kept_files(src: str, dest: str, overwrite: bool) -> list[str]:
    """The files of ``dest`` the export keeps ([] for a new or empty folder); ValueError, one line, for a
    destination that may not be written."""
    if os.path.isdir(src) and os.path.exists(dest) and os.path.samefile(src, dest):
        raise ValueError(f"{dest}: is the source checkpoint; export to another folder")
    if os.path.islink(dest):
        raise ValueError(f"{dest}: a symbolic link; pass the folder it points to ({os.path.realpath(dest)})")
    if not os.path.exists(dest):
        return []
    if not os.path.isdir(dest):
        raise ValueError(f"{dest}: exists and is not a folder; pass a new or empty folder")
    names = sorted(os.listdir(dest))
    if not names:
        return []
    if not overwrite:
        raise ValueError(f"{dest}: not empty ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); pass a "
                         f"new or empty folder, or --overwrite to replace the checkpoint there")
    folders = [n for n in names if not os.path.isfile(os.path.join(dest, n))]
    if folders:
        raise ValueError(f"{dest}: holds folders ({', '.join(folders[:5])}), not a checkpoint folder; "
                         f"--overwrite replaces only a folder of files")
    return [n for n in names if n not in CHECKPOINT_NAMES and not n.endswith(WEIGHT_SUFFIXES)]


def write_export(model, dest: str, keep: list[str]) -> None:
    """save_pretrained into a new folder beside ``dest`` with ``keep`` (dest's files) linked in, then swapped in."""
    dest = os.path.abspath(dest)
    parent, name = os.path.split(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp_{name}.", dir=parent)
    old = None
    try:
        os.chmod(tmp, _folder_mode(dest))             # mkdtemp makes 0700 folders; checkpoints are shared
        model.save_pretrained(tmp)
        for n in keep:
            try:
                os.link(os.path.join(dest, n), os.path.join(tmp, n))
            except OSError:                           # no hard links here: a copy
                shutil.copy2(os.path.join(dest, n), os.path.join(tmp, n))
        fsync_dir(tmp)
        if os.path.isdir(dest) and os.listdir(dest):
            old = tempfile.mkdtemp(prefix=f".old_{name}.", dir=parent)
            os.replace(dest, old)                     # a kill before the next line leaves dest in ``old``
        os.replace(tmp, dest)                         # onto an empty folder or none
        fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(dest):
            os.replace(old, dest)                     # put the old checkpoint back
        if is_disk_full(exc):
            raise DiskFullError(dest, "not exported; the folder is as it was") from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _folder_mode(dest: str) -> int:
    """dest's permissions where it exists, else what a new folder gets (0777 less the umask)."""
    if os.path.isdir(dest):
        return stat.S_IMODE(os.stat(dest).st_mode)
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="checkpoint folder or hub id")
    ap.add_argument("dest", help="new or empty folder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--overwrite", action="store_true", help="replace the checkpoint in a non-empty DEST")
    return ap.parse_args(argv)


def run(args, argv) -> int:
    kept_files(args.src, args.dest, args.overwrite)              # refused before the (slow) load
    model = MambaLMHeadModel.from_pretrained(args.src, dtype=torch.float32)
    cast_for_export(model, getattr(torch, args.dtype))
    keep = kept_files(args.src, args.dest, args.overwrite)       # again: DEST may have changed meanwhile
    write_export(model, args.dest, keep)
    size = os.path.getsize(os.path.join(args.dest, "model.safetensors")) / 2**20
    print(f"{args.dest}: {model.num_parameters() / 1e6:.2f}M parameters, {size:.1f} MiB "
          f"({args.dtype}; {', '.join(KEEP_FP32)} float32)" + (f"; kept {', '.join(keep)}" if keep else ""))
    return 0


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
