"""Language-model pretraining on a tokenized corpus held as memory-mapped uint16 shards.

The corpus folder (``lm_corpus_dir``) is written by ``custom_datasets/tokenize_corpus.py``: for each
split, one or more shards ``<split>.<tag>.bin`` (raw little-endian uint16 token ids, books joined
by <|endoftext|>) each beside ``<split>.<tag>.json`` (token count, books with offsets, tokenizer
and source digests). Nothing is unpickled; no Python work per token.

Training samples are random windows of ``lm_context_len_train`` tokens: sample ``index`` of epoch
``e`` picks a shard (weighted by its size) and a start from a seed of (run seed, epoch, index), so
a sample is a pure function of its position and a resumed run draws the same windows. The loss is
next-token cross-entropy over every position. Evaluation: for each window length, the split's
tokens are cut into ``lm_eval_windows`` evenly spaced windows; the cell's score is the perplexity
over all predicted tokens (the task score: mean over lengths, lower is better). A length no shard
is longer than has no window: said up front, recorded as "no windows" and left out of the mean,
which the table then names (custom_datasets/base.py).
"""
from __future__ import annotations

import glob
import math
import os
import random

import numpy as np
import torch
import torch.nn.functional as F

from custom_datasets.base import (Task, TrainChunk, length_curve_summary, no_window_record, sample_seed,
                                  warn_no_windows)
from engine.errors import BadFileError, read_json

EVAL_BATCH = 8


class Shard:
    def __init__(self, bin_path: str):
        meta_path, redo = bin_path[:-4] + ".json", "rewrite it with custom_datasets/tokenize_corpus.py"
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"corpus shard {bin_path!r} has no {os.path.basename(meta_path)} beside it; {redo}")
        self.meta = meta = read_json(meta_path, redo)
        n = meta.get("tokens") if isinstance(meta, dict) else None
        if type(n) is not int or n < 0:                   # type(): a JSON true is no token count
            found = ("not a JSON object" if not isinstance(meta, dict) else
                     f"'tokens': {n!r}" if "tokens" in meta else "no 'tokens'")
            raise BadFileError(f"{meta_path}: {found}; a shard's .json is an object whose 'tokens' is its token "
                               f"count, an integer >= 0: {redo}")
        size = os.path.getsize(bin_path)
        if size != 2 * n:
            raise BadFileError(f"{bin_path}: {size} bytes but its .json says {n} uint16 tokens "
                               f"(truncated copy?); {redo}")
        self.path = bin_path
        # numpy cannot map an empty file: a shard of no books is an empty array
        self.tokens = np.memmap(bin_path, dtype="<u2", mode="r") if n else np.zeros(0, dtype="<u2")

    def __len__(self) -> int:
        return len(self.tokens)


def load_split(corpus_dir: str, split: str) -> list[Shard]:
    paths = sorted(glob.glob(os.path.join(corpus_dir, f"{split}.*.bin")))
    if not paths:
        raise FileNotFoundError(f"lm_corpus_dir={corpus_dir!r} holds no {split}.*.bin shards: tokenize a corpus first "
                                f"(python custom_datasets/tokenize_corpus.py --split {split} --out {corpus_dir} PARTS...)")
    return [Shard(p) for p in paths]


def split_tokens(corpus_dir: str, split: str) -> np.ndarray:
    """Every token of a split, its shards in name order, as one int64 array (tools read windows from it)."""
    return np.concatenate([np.asarray(s.tokens) for s in load_split(corpus_dir, split)]).astype(np.int64)


def window_starts(n_tokens: int, tokens: int, windows: int) -> list[int]:
    """Starts of ``windows`` windows of ``tokens`` + 1 tokens, evenly spaced over ``n_tokens``."""
    if n_tokens < tokens + 1:
        raise ValueError(f"the text has {n_tokens:,} tokens: --tokens {tokens} needs at least {tokens + 1:,}")
    return [int(s) for s in np.linspace(0, n_tokens - tokens - 1, windows).astype(np.int64)]


class LMCorpusTask(Task):
    name = "lm_corpus"
    version = "1"
    primary_metric = "perplexity"
    higher_is_better = False
    axes = ("ctx_len",)

    def __init__(self, cfg, tokenizer, train: bool = True):
        super().__init__(cfg, tokenizer)
        self.ctx = cfg["lm_context_len_train"]
        self.eval_shards = load_split(cfg["lm_corpus_dir"], cfg["lm_eval_split"])
        self.longest = max(len(s) for s in self.eval_shards)
        self.doc = f"{cfg['lm_eval_split']} shard"        # what a window must fit in (windows cross books)
        warn_no_windows(cfg["lm_eval_context_lens"], self.longest, "lm_eval_context_lens", self.doc)
        self.train_shards = load_split(cfg["lm_corpus_dir"], "train") if train else []
        sizes = np.array([max(0, len(s) - self.ctx) for s in self.train_shards], dtype=np.float64)
        if train and sizes.sum() == 0:
            raise ValueError(f"lm_corpus_dir={cfg['lm_corpus_dir']!r}: no train shard is longer than "
                             f"lm_context_len_train={self.ctx}")
        self.cum = np.cumsum(sizes) / sizes.sum() if train else None
        n_tok = sum(len(s) for s in self.train_shards)
        print(f"lm_corpus: {len(self.train_shards)} train shard(s), {n_tok:,} tokens; "
              f"eval split {cfg['lm_eval_split']!r}: {sum(len(s) for s in self.eval_shards):,} tokens")

    def train_len(self) -> int:
        if self.cfg["lm_train_samples_per_epoch"]:
            return self.cfg["lm_train_samples_per_epoch"]
        return max(1, sum(len(s) for s in self.train_shards) // self.ctx)

    def train_item(self, index: int, epoch: int) -> list[TrainChunk]:
        rng = random.Random(sample_seed(self.cfg["seed"], "lm_corpus", epoch, index))
        shard = self.train_shards[int(np.searchsorted(self.cum, rng.random(), side="right").clip(0, len(self.cum) - 1))]
        start = rng.randrange(0, len(shard) - self.ctx + 1)
        window = shard.tokens[start:start + self.ctx].astype(np.int64).tolist()
        return [TrainChunk(window, window[1:])]

    def windows(self, w: int) -> list[np.ndarray]:
        n = self.cfg["lm_eval_windows"]
        out = []
        for shard in self.eval_shards:              # windows spread over the shards by their size
            if len(shard) <= w:
                continue                            # (also every empty shard: no division by a total of 0)
            share = max(1, round(n * len(shard) / sum(len(s) for s in self.eval_shards)))
            for s in np.linspace(0, len(shard) - w - 1, share).astype(np.int64):
                out.append(np.asarray(shard.tokens[s:s + w + 1], dtype=np.int64))
        return out

    def eval_cells(self):
        return [{"ctx_len": int(w)} for w in self.cfg["lm_eval_context_lens"]]

    def run_cell(self, model, cell, device):
        w = cell["ctx_len"]
        nll, count, wins = 0.0, 0, self.windows(w)
        if not wins:
            return no_window_record(w, self.longest, self.doc)
        for i in range(0, len(wins), EVAL_BATCH):
            x = torch.from_numpy(np.stack(wins[i:i + EVAL_BATCH])).to(device)
            logits = model(x[:, :-1], num_last_tokens=w).logits.float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x.shape[0] * w
        return {"score": math.exp(nll / count), "windows": len(wins), "scored_tokens": count, "mean_nll": nll / count}

    def summarize(self, records):
        return length_curve_summary(records, "perplexity")

    def plot(self, records, path, train_len=None):
        from custom_datasets.plots import line_plot

        records = sorted(records, key=lambda r: r["ctx_len"])
        line_plot([r["ctx_len"] for r in records], [r["score"] for r in records], path, "Window length [tokens]",
                  "Perplexity", f"{self.cfg['lm_eval_split']} perplexity", train_x=self.ctx, logy=True)
