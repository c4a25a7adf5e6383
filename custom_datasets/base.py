"""The Task interface: what finetune_ssm.py needs from each task, so its loops never branch on names.

A task builds training items (token lists with the labels at the end), lists its evaluation
cells (one JSON record each in results.jsonl), runs a cell, and summarises records into a score,
a printed table and plots (drawn from the records only).
"""
from __future__ import annotations

import sys
import zlib
from dataclasses import dataclass


@dataclass
class TrainChunk:
    """One forward of a training sample: the labels are the last len(labels) tokens' successors;
    resp_len = len(labels) + 1 positions are protected from decimation and reach the head."""

    input_ids: list
    labels: list

    @property
    def resp_len(self) -> int:
        return len(self.labels) + 1


class Task:
    name = "base"
    version = "0"
    primary_metric = "score"
    higher_is_better = True
    axes: tuple = ()
    chunks = 1                    # forwards per training sample (PG-19 with decimation splits windows)

    def __init__(self, cfg: dict, tokenizer):
        self.cfg, self.tok = cfg, tokenizer

    # training
    def train_len(self) -> int:
        raise NotImplementedError

    def train_item(self, index: int, epoch: int) -> list[TrainChunk]:
        """The chunks of training sample ``index`` (deterministic given index, epoch and seed)."""
        raise NotImplementedError

    # evaluation
    def eval_cells(self) -> list[dict]:
        raise NotImplementedError

    def run_cell(self, model, cell: dict, device) -> dict:
        raise NotImplementedError

    def summarize(self, records: list[dict]) -> tuple[float, str]:
        """(score, printable table) from this evaluation's records."""
        raise NotImplementedError

    def plot(self, records: list[dict], path: str, train_len: int | None = None) -> None:
        raise NotImplementedError


def sample_seed(*parts) -> int:
    """A stable seed from (run seed, purpose, indices): samples are pure functions of their position."""
    return zlib.crc32(repr(parts).encode())


def length_label(n: int) -> str:
    """1000 -> '1K', 128000 -> '128K', 1048576 -> '1M' (the original's length//1000 'K' headers)."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1000:
        return f"{n // 1000}K"
    return str(n)


def warn_no_windows(lengths, longest: int, setting: str, what: str) -> None:
    """One warning line up front naming the window lengths no document is longer than: their cells
    are recorded with no windows (no_window_record) and left out of the score (length_curve_summary)."""
    short = sorted(w for w in lengths if w >= longest)
    if short:
        print(f"warning: {setting} {short}: no {what} is longer (longest: {longest:,} tokens); these lengths "
              f"are recorded with no windows and left out of the score", file=sys.stderr)


def no_window_record(w: int, longest: int, what: str) -> dict:
    """run_cell's record of a length no document is longer than: nothing measured, and it says so."""
    return {"score": float("nan"), "windows": 0, "scored_tokens": 0, "mean_nll": None,
            "note": f"no windows: no {what} is longer than {w:,} tokens (longest: {longest:,})"}


def length_curve_summary(records: list[dict], row_label: str) -> tuple[float, str]:
    """(mean score over the window lengths that had windows, one-row table by length) of a
    perplexity-by-length task. A length with no window shows "no windows" and a line under the
    table names the lengths the mean is over; a measured NaN (a diverged model) makes the mean NaN."""
    records = sorted(records, key=lambda r: r["ctx_len"])
    measured = [r.get("windows") != 0 for r in records]         # records before 'note' also hold windows: 0
    vals = [r["score"] for r, m in zip(records, measured) if m]
    cells = [f"{r['score']:.2f}" if m else "no windows" for r, m in zip(records, measured)]
    table = pretty_table(["ctx len"] + [length_label(r["ctx_len"]) for r in records], [[row_label] + cells])
    if not all(measured):
        skipped = ", ".join(length_label(r["ctx_len"]) for r, m in zip(records, measured) if not m)
        kept = ", ".join(length_label(r["ctx_len"]) for r, m in zip(records, measured) if m)
        table += (f"\nscore: mean over {kept} only (no windows at {skipped})" if vals else
                  f"\nscore: none (no windows at any length: {skipped})")
    return (sum(vals) / len(vals) if vals else float("nan")), table


def pretty_table(header: list[str], rows: list[list]) -> str:
    """A plain 'pretty' table as the original prints (tabulate's 'pretty' look, no dependency)."""
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "|" + "|".join(f" {c:^{w}} " for c, w in zip(r, widths)) + "|"  # noqa: E731
    return "\n".join([sep, fmt(header), sep] + [fmt(r) for r in cols[1:]] + [sep])
