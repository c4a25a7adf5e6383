"""Paths and command lines as a results file may show them: no machine paths.

A path inside the repository is written relative to it (data/wikitext-2-raw/wiki.valid.raw); any
other path becomes a placeholder (<model>, <corpus>, ...), so a JSON written on one machine names
nothing of that machine's file system.
"""
from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def public_path(value: str | None, placeholder: str) -> str | None:
    """``value`` relative to the repository when it lies inside it, else ``placeholder``. A word that
    is no path (not absolute, not on disk, no separator: a hub id like 'gpt2') is kept as it is."""
    if value is None:
        return None
    full = os.path.abspath(value)
    if full == REPO or full.startswith(REPO + os.sep):
        return os.path.relpath(full, REPO)
    return placeholder if os.path.isabs(value) or os.path.exists(value) or os.sep in value else value


def public_command(script: str, argv: list[str], path_options: dict[str, str]) -> str:
    """'python <script> <argv>' with the value of every option in ``path_options`` (option ->
    placeholder) made public, in both forms: ``--opt value`` and ``--opt=value``."""
    words, pending = ["python", script], None
    for word in argv:
        if pending:
            words.append(public_path(word, pending))
            pending = None
            continue
        opt, eq, val = word.partition("=")
        if opt in path_options and eq:
            words.append(f"{opt}={public_path(val, path_options[opt])}")
        else:
            words.append(word)
            pending = path_options.get(word)
    return " ".join(words)
