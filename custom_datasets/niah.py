"""Passkey retrieval ("needle in a haystack"), as DeciMamba's babilong fork builds it.

Reference spec §3.2 and results-and-conventions §5.1. Prompt = question + haystack + "\\nAnswer: ";
the haystack is WikiText-2 sentences (train split for training, test split for evaluation) with
the fact "The pass key is K. Remember it. K is the pass key. " inserted at a sentence boundary
(uniform over boundaries in training; within depth ± 0.1 of the haystack in evaluation). Greedy
answer of at most eval_max_len tokens; correct iff K is one of its space-separated pieces.

Changes from the original, each a fix: every sample is a deterministic function of (seed, cell or
index, epoch), so evaluations are comparable across steps and resumable (the original shared one
running sampler, L5); a cell may hold several samples; no allowed slot falls back to the boundary
nearest the depth instead of IndexError (B16); needle_position is right when the fact comes last
(B15). The original's passkey lists (babilong codes_{train,test}.txt) are not available here; ours
are drawn the same way (uniform integers 0..99999, no zero padding) from fixed seeds.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from custom_datasets.base import Task, TrainChunk, length_label, pretty_table, sample_seed
from custom_datasets.sources import wikitext_rows

QUESTION = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it:\n"
FACT = "The pass key is {k}. Remember it. {k} is the pass key. "
ANSWER_PREFIX = "\nAnswer: "
KEY_OFFSET_IN_FACT = 4           # 'The', ' pass', ' key', ' is', then the key's first token
MIN_SENTENCE_TOKENS = 10
N_CODES = 10_000


def passkey_codes(split: str) -> list[str]:
    rng = random.Random(f"decimamba-passkey-codes-{split}")
    return [str(rng.randint(0, 99_999)) for _ in range(N_CODES)]


class SentenceCorpus:
    """Rows of a text split, split into sentences (untrained Punkt) and tokenised once, lazily."""

    def __init__(self, rows: list[str], tokenizer, min_len: int = MIN_SENTENCE_TOKENS):
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        self.rows, self.tok, self.min_len = rows, tokenizer, min_len
        self._punkt = PunktSentenceTokenizer()
        self._cache: dict[int, list[list[int]]] = {}
        if not any(r.strip() for r in rows):
            raise ValueError("the haystack text has no non-empty rows")

    def row_sentences(self, i: int) -> list[list[int]]:
        if i not in self._cache:
            text = self.rows[i]
            sents = self._punkt.tokenize(text) if text.strip() else []
            ids = self.tok.encode_batch(sents) if sents else []
            self._cache[i] = [s for s in ids if len(s) >= self.min_len]   # short sentences are skipped
        return self._cache[i]

    def haystack(self, size: int, start_row: int) -> list[list[int]]:
        """Sentences read from ``start_row`` on (wrapping) until ``size`` tokens; the last one cut."""
        out, total, row = [], 0, start_row % len(self.rows)
        for _ in range(len(self.rows) * (1 + size // 1000)):
            for s in self.row_sentences(row):
                out.append(s)
                total += len(s)
                if total >= size:
                    out[-1] = s[: len(s) - (total - size)]
                    return out
            row = (row + 1) % len(self.rows)
        raise ValueError(f"the haystack text has no sentence of >= {self.min_len} tokens")


def choose_slot(sent_lens: list[int], size: int, fact_len: int, depth: float | None, window: float, rng) -> int:
    """Sentence boundary for the fact: uniform over all (training, depth None) or within depth ± window."""
    cum = np.concatenate([[0], np.cumsum(sent_lens)])                    # tokens before boundary i
    if depth is None:
        return int(rng.integers(0, len(sent_lens) + 1))
    start, end = int(size * max(0.0, depth - window)), int(size * min(1.0, depth + window))
    allowed = np.nonzero((cum >= start) & (cum < end - fact_len))[0]
    if len(allowed) == 0:                                                # original: IndexError (B16)
        return int(np.argmin(np.abs(cum - depth * (size - fact_len))))
    return int(rng.choice(allowed))


class NiahTask(Task):
    name = "niah_custom"
    version = "1"
    primary_metric = "accuracy"
    higher_is_better = True
    axes = ("depth", "ctx_len")

    def __init__(self, cfg, tokenizer, train: bool = True):
        super().__init__(cfg, tokenizer)
        self.q_ids = tokenizer.encode(QUESTION)
        self.sep_ids = tokenizer.encode(ANSWER_PREFIX)
        self.eval_corpus = SentenceCorpus(wikitext_rows(cfg["niah_noise_dataset"], cfg["niah_noise_split_eval"],
                                                        cfg["cache_dir"], "niah_noise_split_eval"), tokenizer)
        self.train_corpus = None
        if train:
            self.train_corpus = SentenceCorpus(wikitext_rows(cfg["niah_noise_dataset"], cfg["niah_noise_split_train"],
                                                             cfg["cache_dir"], "niah_noise_split_train"), tokenizer)
            codes = passkey_codes("train")
            random.Random(cfg["seed"]).shuffle(codes)
            self.train_codes = codes[: cfg["niah_train_set_size"]]
        self.test_codes = passkey_codes("test")
        self.artifact_dir = None       # set by the evaluator when record_debug_params is on

    # ------------------------------------------------------------------ samples
    def make_sample(self, corpus, code: str, size: int, depth, rng):
        fact = self.tok.encode(FACT.format(k=code))
        sents = corpus.haystack(size - len(fact), int(rng.integers(0, len(corpus.rows))))
        slot = choose_slot([len(s) for s in sents], size, len(fact), depth, self.cfg["niah_depth_window"], rng)
        before = [t for s in sents[:slot] for t in s]
        context = before + fact + [t for s in sents[slot:] for t in s]
        return context, len(before) + KEY_OFFSET_IN_FACT

    def train_len(self) -> int:
        return len(self.train_codes)

    def train_item(self, index: int, epoch: int) -> list[TrainChunk]:
        rng = np.random.default_rng(sample_seed(self.cfg["seed"], "train", epoch, index))
        code = self.train_codes[index]
        context, _ = self.make_sample(self.train_corpus, code, self.train_context_len(epoch), None, rng)
        target = self.answer_tokens(code) + [self.tok.eos_token_id]
        return [TrainChunk(self.q_ids + context + self.sep_ids + target, target)]

    def answer_tokens(self, code: str) -> list[int]:
        """The original trains on encode(code): '71432' -> '714','32', while the haystack holds
        ' 7','14','32' (BPE segments digits differently after a space). A pretrained model knows
        both; a model trained from scratch must also learn to re-segment numbers. With
        ``niah_answer_as_in_context`` it trains on the haystack's tokens instead (a pure copy;
        decoded, ' 71432' still scores as correct): on 128-token haystacks it learned the task in
        ~1.6x fewer steps (docs/RESULTS.md, passkey section)."""
        return self.tok.encode(" " + code) if self.cfg["niah_answer_as_in_context"] else self.tok.encode(code)

    def train_context_len(self, epoch: int) -> int:
        """niah_context_len_train, after an optional curriculum of shorter haystacks (one per epoch)."""
        curriculum = self.cfg["niah_context_len_train_curriculum"] or []
        return curriculum[epoch] if epoch < len(curriculum) else self.cfg["niah_context_len_train"]

    def eval_prompts(self, depth: float, length: int):
        """The cell's prompts (all of equal length), answers and needle positions."""
        prompts, answers, needles = [], [], []
        for k in range(self.cfg["niah_samples_per_cell"]):
            rng = np.random.default_rng(sample_seed(self.cfg["seed"], "eval", float(depth), int(length), k))
            code = self.test_codes[int(rng.integers(0, len(self.test_codes)))]
            context, needle = self.make_sample(self.eval_corpus, code, length, depth, rng)
            prompts.append(self.q_ids + context + self.sep_ids)
            answers.append(code)
            needles.append(needle)
        return prompts, answers, needles

    # ------------------------------------------------------------------ evaluation
    def eval_cells(self) -> list[dict]:
        return [{"depth": float(d), "ctx_len": int(n)}
                for d in self.cfg["niah_needle_depths_eval"] for n in self.cfg["niah_context_lens_eval"]]

    def score_response(self, text: str, answer: str) -> bool:
        text = text.split(self.tok.eos_token)[0]
        return answer in text.split(" ")

    def group_key(self, cell):
        """Cells of one length have prompts of one length: the evaluator batches them together."""
        return cell["ctx_len"]

    def run_cells(self, model, cells, device):
        """All samples of cells of equal length in batches of <= eval_batch_tokens prompt tokens
        (per-row decimation makes a batched row equal to running it alone)."""
        built = [self.eval_prompts(c["depth"], c["ctx_len"]) for c in cells]
        flat = [p for prompts, _, _ in built for p in prompts]
        per_batch = max(1, self.cfg["eval_batch_tokens"] // len(flat[0]))
        responses = []
        for i in range(0, len(flat), per_batch):
            ids = torch.tensor(flat[i:i + per_batch], device=device)
            seq = model.generate(ids, max_length=ids.shape[1] + self.cfg["eval_max_len"], eos_token_id=self.tok.eos_token_id,
                                 prefill_chunk_size=self.cfg["eval_prefill_chunk_size"])
            responses += [self.tok.decode(row[ids.shape[1]:].tolist()) for row in seq]
        results, k = [], 0
        for cell, (prompts, answers, needles) in zip(cells, built):
            resp = responses[k:k + len(prompts)]
            k += len(prompts)
            correct = [self.score_response(r, a) for r, a in zip(resp, answers)]
            if self.cfg["record_debug_params"] and self.artifact_dir:
                self._record(model, cell, prompts, needles, device)
            results.append({"score": sum(correct) / len(correct), "correct": sum(correct), "samples": len(correct),
                            "answers": answers, "responses": resp, "needle_positions": needles,
                            "prompt_tokens": len(prompts[0])})
        return results

    def run_cell(self, model, cell, device):
        return self.run_cells(model, [cell], device)[0]

    def _record(self, model, cell, prompts, needles, device):
        from custom_datasets.debug_params import record_prompt_params

        for k, (p, needle) in enumerate(zip(prompts, needles)):
            record_prompt_params(model, torch.tensor([p], device=device), self.artifact_dir,
                                 f"d{cell['depth']}_L{cell['ctx_len']}_s{k}",
                                 {"needle_position": needle, "ctx_len": cell["ctx_len"], "depth": cell["depth"],
                                  "prompt_prefix_len": len(self.q_ids)})

    def summarize(self, records):
        depths = sorted({r["depth"] for r in records})
        lens = sorted({r["ctx_len"] for r in records})
        by = {(r["depth"], r["ctx_len"]): r for r in records}
        one = all(r["samples"] == 1 for r in records)
        rows = []
        for d in depths:
            row = [d]
            for n in lens:
                r = by.get((d, n))
                row.append("" if r is None else ("v" if r["score"] == 1 else "-") if one else f"{100 * r['score']:.0f}")
            rows.append(row)
        score = float(np.mean([r["score"] for r in records])) if records else float("nan")
        return score, pretty_table(["depth"] + [length_label(n) for n in lens], rows)

    def plot(self, records, path, train_len=None):
        from custom_datasets.plots import passkey_heatmap

        passkey_heatmap(records, path, train_len if train_len is not None else self.cfg["niah_context_len_train"])
