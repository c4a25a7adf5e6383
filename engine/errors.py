"""One-line errors for damaged or hostile files and for a full disk, and the helpers that raise them.

Both error classes subclass what finetune_ssm.main() already reports as ``error: <message>``
(ValueError, OSError), so a bad file or a full disk ends the run with one line naming the file,
what is wrong and what to do, instead of a traceback.
"""
from __future__ import annotations

import errno
import json
import os
import sys

# Messages of library errors that wrap a failed write (safetensors and tokenizers print the
# OS error text; torch.save's C++ writer only reports a short write as "unexpected pos A vs B").
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122",
                   "unexpected pos", "file write failed")


class BadFileError(ValueError):
    """A file that exists but cannot be used: damaged, truncated, not the expected format."""


class DiskFullError(OSError):
    """A write failed because the filesystem is full (or over quota)."""

    def __init__(self, path: str, what_now: str = "free some space and run the command again"):
        super().__init__(f"no space left on device: {path} ({what_now})")
        self.errno = errno.ENOSPC
        self.filename = path

    def __str__(self) -> str:                    # the message, not OSError's "[Errno 28] ...: PATH"
        return self.args[0]


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or a torch/safetensors/tokenizers error wrapping one) is a full disk."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return isinstance(exc, Exception) and any(t in text for t in _DISK_FULL_TEXT)


def read_json(path: str, what: str):
    """json.load of ``path``; a damaged file raises BadFileError("PATH: not valid JSON (...); <what>").

    ``what`` says what to do about it (e.g. "restore it or pass another file with --set x=PATH").
    A missing file raises FileNotFoundError as open() does (its message names the path).
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise BadFileError(f"{path}: not valid JSON (not UTF-8 text at byte {exc.start}); {what}") from None
    if not text.strip():
        raise BadFileError(f"{path}: not valid JSON (the file is empty); {what}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadFileError(f"{path}: not valid JSON (line {exc.lineno} col {exc.colno}: {exc.msg}); {what}") from None
    except RecursionError:
        raise BadFileError(f"{path}: not valid JSON here (nested too deeply to read); {what}") from None


def discard_partial(tmp: str, path: str, exc: BaseException, what_now: str) -> None:
    """After a failed write of ``path`` through ``tmp``: remove the temp file; a full disk becomes
    DiskFullError(path, what_now). The caller re-raises any other error."""
    if os.path.exists(tmp):
        os.remove(tmp)
    if is_disk_full(exc):
        raise DiskFullError(path, what_now) from exc


def fsync_dir(directory: str) -> None:
    """Make a rename or new file in ``directory`` durable (no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flush a file another library wrote (and closed) to disk before it is renamed into place."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cli_main(fn, *args, usage_errors: tuple = (), errors: tuple = (OSError, ValueError, ImportError)) -> int:
    """Run a command-line entry point ``fn(*args)``: an exception of ``usage_errors`` (bad settings)
    ends as one 'error: ...' line and exit 2, one of ``errors`` (bad files, values, a missing
    package) as one line and exit 1 (DECIMAMBA_DEBUG=1 raises it instead, with its traceback),
    Ctrl-C as 'error: interrupted' and exit 130."""
    try:
        return fn(*args)
    except usage_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except errors as exc:
        if os.environ.get("DECIMAMBA_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
