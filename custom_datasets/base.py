"""The Task interface: what finetune_ssm.py needs from each task, so its loops never branch on names.

A task builds training items (token lists with the labels at the end), lists its evaluation
cells (one JSON record each in results.jsonl), runs a cell, and summarises records into a score,
a printed table and plots (drawn from the records only).
"""
from __future__ import annotations

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


def length_curve_summary(records: list[dict], row_label: str) -> tuple[float, str]:
    """(mean score over the window lengths, one-row table by length) of a perplexity-by-length task."""
    records = sorted(records, key=lambda r: r["ctx_len"])
    vals = [r["score"] for r in records if r["score"] == r["score"]]
    table = pretty_table(["ctx len"] + [length_label(r["ctx_len"]) for r in records],
                         [[row_label] + [f"{r['score']:.2f}" for r in records]])
    return (sum(vals) / len(vals) if vals else float("nan")), table


def pretty_table(header: list[str], rows: list[list]) -> str:
    """A plain 'pretty' table as the original prints (tabulate's 'pretty' look, no dependency)."""
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    fmt = lambda r: "|" + "|".join(f" {c:^{w}} " for c, w in zip(r, widths)) + "|"  # noqa: E731
    return "\n".join([sep, fmt(header), sep] + [fmt(r) for r in cols[1:]] + [sep])
