"""Argument parsing shared by the tools: a bad argument is one line on stderr (exit 2), not usage + error;
an existing --out is refused unless --overwrite, and written atomically."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

from engine.errors import cli_main, discard_partial, fsync_dir


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):          # one line, not usage + error
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def checked_device(name: str) -> torch.device:
    """--device as a torch.device, or ValueError naming it: 'cpu', 'cuda', 'cuda:<n>' where a GPU is."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected 'cpu', 'cuda' or 'cuda:<n>'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU here; use --device cpu")
    return device


def run_cli(parse_args, run, argv=None) -> int:
    """A tool's main(): argv (default sys.argv[1:]) through parse_args, then run(args, argv) under cli_main
    (a bad input ends as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli_main(run, parse_args(argv), argv)


# ---------------------------------------------------------------------------- --out: never replaced silently
def add_out(ap, help_text: str = "JSON file to write (refused if it exists, unless --overwrite)") -> None:
    """--out FILE and --overwrite, as the measurement tools take them."""
    ap.add_argument("--out", default=None, help=help_text)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def check_out(path: str | None, overwrite: bool) -> None:
    """Before any work: FileExistsError naming an existing --out (without --overwrite), or one that is a folder."""
    if path is None:
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path}: a folder; pass a file name")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"--out {path} already exists; pass another --out, or --overwrite to replace it")


def write_new_file(path: str, text: str, overwrite: bool) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, fsynced, then renamed
    (overwrite) or hard-linked into place (never replacing a file that appeared meanwhile; that case
    keeps this run's result in the temp file and names it). Prints 'wrote PATH'."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)                    # mkstemp makes 0600 files; results are shared
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"--out {path} was created by something else during this run and is kept; "
                              f"this run's result is in {tmp}") from None
    except BaseException as exc:
        discard_partial(tmp, path, exc, "not written; free some space and run again")
        raise
    fsync_dir(folder)
    print(f"wrote {path}")


def _link_new(tmp: str, path: str) -> None:
    """tmp -> path, FileExistsError if path exists (a hard link: atomic, never replaces)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:                                     # a filesystem without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)
