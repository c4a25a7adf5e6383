"""Argument parsing shared by the tools: a bad argument is one line on stderr (exit 2), not usage + error."""
from __future__ import annotations

import argparse
import sys

import torch

from engine.errors import cli_main


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
