"""PG-19 language modelling: training windows and the sliding-window perplexity evaluation.

Reference spec §3.3 and results-and-conventions §5.6. Books come pre-tokenised by
custom_datasets/tokenize_pg19.py ({train,test}_set.pt in ``pg19_dir``; evaluation uses the test
split, as the original does under the name "validation"). For each window length w and each book
with T > w tokens: stride = max((T - w) // n_windows, 10), windows start at 0, stride, ... < T - w;
the loss is scored on the last ``ppl_test_pred_len`` tokens of each window; PPL(w) = exp(mean NLL
over all windows); the task score is the mean of PPL(w) over the lengths (lower is better). A length
no book is longer than has no window: said up front, recorded as "no windows" (score NaN, windows 0,
a note) and left out of the mean, which the table then names.

Fixes of the original: window starts include T - W (a book of exactly W tokens crashed, B9);
short books are really skipped (B10); with decimating chunks (deci_num_chunks), every target token
is trained once (the original never trained the token at a chunk boundary, L12).
"""
from __future__ import annotations

import math
import os
import pickle
import random

import torch
import torch.nn.functional as F

from custom_datasets.base import (Task, TrainChunk, length_curve_summary, no_window_record, sample_seed,
                                  warn_no_windows)
from engine.errors import BadFileError

EVAL_BATCH = 8


def load_split(pg19_dir: str, split: str) -> list[dict]:
    path = os.path.join(pg19_dir, f"{split}_set.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} does not exist: pre-tokenise PG-19 first (python custom_datasets/tokenize_pg19.py --eval_only, "
            f"or --books_dir DIR for local books), or set pg19_dir")
    what = (f"expected a list of {{short_book_title, input_tokens: LongTensor (1, T)}} as "
            f"custom_datasets/tokenize_pg19.py writes: tokenise the books again")
    try:
        books = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run the file's code: not offered here
        raise BadFileError(f"{path}: refused by the safe loader (weights_only=True): damaged, or holds Python "
                           f"objects besides tensors; {what}") from None
    except (RuntimeError, EOFError, ValueError, LookupError) as exc:   # what damaged bytes raise (tests: test_tasks)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadFileError(f"{path}: not a readable PyTorch file ({first}); {what}") from None
    if not isinstance(books, list):
        raise BadFileError(f"{path}: holds a {type(books).__name__}, not a list of books; {what}")
    for i, book in enumerate(books):
        t = book.get("input_tokens") if isinstance(book, dict) else None
        if not (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == 1 and not t.is_floating_point()
                and not t.is_complex() and t.dtype != torch.bool):
            raise BadFileError(f"{path}: book {i} has no input_tokens of integer shape (1, T); {what}")
    return books


class PG19Task(Task):
    name = "ppl_test"
    version = "1"
    primary_metric = "perplexity"
    higher_is_better = False
    axes = ("ctx_len",)

    def __init__(self, cfg, tokenizer, train: bool = True):
        super().__init__(cfg, tokenizer)
        books = load_split(cfg["pg19_dir"], "test")
        self.eval_books = books[: cfg["ppl_test_max_books"]] if cfg["ppl_test_max_books"] else books
        self.longest = max((b["input_tokens"].shape[1] for b in self.eval_books), default=0)
        warn_no_windows(cfg["ppl_test_context_lens_eval"], self.longest, "ppl_test_context_lens_eval", "test book")
        self.train_books = load_split(cfg["pg19_dir"], "train") if train else None
        self.chunks = cfg["deci_num_chunks"] if cfg["mamba_arch"] == "deci" else 1

    def train_len(self) -> int:
        return len(self.train_books)

    def train_item(self, index: int, epoch: int) -> list[TrainChunk]:
        tokens = self.train_books[index]["input_tokens"][0].tolist()
        w = self.cfg["ppl_test_context_len_train"]
        start = random.Random(sample_seed(self.cfg["seed"], "pg19", epoch, index)).randint(0, max(0, len(tokens) - w))
        window = tokens[start:start + w]
        c_len = len(window) // self.chunks
        out = []
        for c in range(self.chunks):
            end = len(window) if c == self.chunks - 1 else (c + 1) * c_len
            out.append(TrainChunk(window[:end], window[max(1, c * c_len):end]))
        return out

    def windows(self, w: int):
        n_win = self.cfg["ppl_test_num_windows_per_context_len_eval"]
        for book in self.eval_books:
            t = book["input_tokens"].shape[1]
            if t <= w:
                continue                      # too short for this window length: skipped
            stride = max((t - w) // n_win, 10)
            for s in range(0, t - w, stride):
                yield book["input_tokens"][0, s:s + w]

    def eval_cells(self):
        return [{"ctx_len": int(w)} for w in self.cfg["ppl_test_context_lens_eval"]]

    def run_cell(self, model, cell, device):
        w, p = cell["ctx_len"], self.cfg["ppl_test_pred_len"]
        if p >= w:
            raise ValueError(f"ppl_test_pred_len={p} must be smaller than the window length {w}")
        nll, count, wins = 0.0, 0, list(self.windows(w))
        if not wins:
            return no_window_record(w, self.longest, "test book")
        for i in range(0, len(wins), EVAL_BATCH):
            x = torch.stack(wins[i:i + EVAL_BATCH]).to(device)
            logits = model(x, num_last_tokens=p + 1).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, -p:].reshape(-1), reduction="sum").item()
            count += x.shape[0] * p
        return {"score": math.exp(nll / count), "windows": len(wins), "scored_tokens": count, "mean_nll": nll / count}

    def summarize(self, records):
        return length_curve_summary(records, "score")

    def plot(self, records, path, train_len=None):
        from custom_datasets.plots import line_plot

        records = sorted(records, key=lambda r: r["ctx_len"])
        line_plot([r["ctx_len"] for r in records], [r["score"] for r in records], path, "Context length [tokens]",
                  "Perplexity", "PG-19 perplexity", train_x=self.cfg["ppl_test_context_len_train"], logy=True)
