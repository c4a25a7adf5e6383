"""SQuAD v2 multi-document retrieval: find the document that answers the question, by its id.

Reference spec §3.1 and results-and-conventions §5.7. Each document is emitted as
" <|Query|> {question} <|Document {id}|> {paragraph}" (the question repeated before every
document, ids distinct in 0..999); the golden paragraph sits at slot R[i] mod (n+1) of the
original index arrays; the prompt ends " <|Answer|> <|Document" and the answer is " {id}|>".
Score(n) = exact-match rate over the eval questions; the task score is the mean over n.

Fixes of the original (reference §8): the label is the tail of the full sequence, so training and
evaluation see the same tokens (B5: the original tokenised the label without the space the
sequence has, and ended the eval prompt with a lone space token); the golden slot of a training
sample comes from its dataset index, not its position in the batch (B4); noise never repeats a
paragraph or the golden one (L6, ``multidoc_dedup_noise``); every sample is deterministic, so
evaluations are comparable and resumable. ``multidoc_original_format`` restores the original
prompt end and labels (B5) for reproducing the released checkpoints' numbers.

Data: the hub's ``rajpurkar/squad_v2`` splits with the original index arrays, or a local
SQuAD-format JSON (e.g. the stand-in dev file), for which the same kinds of arrays are drawn from
fixed seeds (the original arrays index hub rows only). One local file can serve both: with
``squad_heldout_titles`` = N, N of its titles (a fixed-seed choice) hold the evaluation questions and
the others the training ones, so no question or paragraph is in both; the schema refuses one file as
both sources without it, since training would see the evaluation questions.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from custom_datasets.base import Task, TrainChunk, pretty_table, sample_seed
from custom_datasets.sources import REPO, load_hf_dataset
from engine.errors import BadFileError, read_json

DOC = " <|Query|> {q} <|Document {i}|> {doc}"
PROMPT_END = " <|Answer|> <|Document"
ANSWER = " {i}|>"
# multidoc_original_format (reproducing the released checkpoints' numbers): the original eval
# prompt ends with a lone space token and training labels are "{id}|>" tokenised on their own
ORIGINAL_PROMPT_END = " <|Answer|> <|Document "
ORIGINAL_LABEL = "{i}|>"
EVAL_SPLIT_SEED = 111            # the original's train_test_split seed for the eval questions


def load_squad_rows(source: str, cache_dir=None) -> list[dict]:
    """Rows in the HF squad_v2 order: {title, question, context, has_answer}."""
    if source.endswith(".json"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"SQuAD file {source!r} does not exist")
        what = "pass a SQuAD v2-format .json (--set squad_eval_source=PATH / squad_train_source=PATH)"
        data = read_json(source, what)
        if not isinstance(data, dict) or "data" not in data:
            raise BadFileError(f"{source}: not in SQuAD format (no top-level 'data'); {what}")
        try:
            return [{"title": str(art.get("title", "")), "question": str(qa["question"]), "context": str(p["context"]),
                     "has_answer": bool(qa["answers"])}
                    for art in data["data"] for p in art["paragraphs"] for qa in p["qas"]]
        except (KeyError, TypeError) as exc:
            raise BadFileError(f"{source}: not in SQuAD format (data -> paragraphs -> context, qas -> question, "
                               f"answers; {type(exc).__name__}: {exc}); {what}") from None
    repo, _, split = source.rpartition(":")
    if not repo or split not in ("train", "validation"):
        raise ValueError(f"SQuAD source {source!r}: expected '<hub id>:<train|validation>' or a local .json file")
    ds = load_hf_dataset(repo, None, split, cache_dir, hint="a local SQuAD-format .json (--set squad_eval_source=PATH)")
    return [{"title": t, "question": q, "context": c, "has_answer": bool(a["text"])}
            for t, q, c, a in zip(ds["title"], ds["question"], ds["context"], ds["answers"])]


def split_by_title(rows: list[dict], n_heldout: int, source: str) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows): the rows of n_heldout titles, chosen by a fixed seed, are held out."""
    titles = list(dict.fromkeys(r["title"] for r in rows))            # file order, each once
    if len(titles) < 2:
        raise ValueError(f"squad_heldout_titles={n_heldout}: {source!r} has {len(titles)} title(s); a split by title "
                         f"needs at least 2")
    if not 0 < n_heldout < len(titles):
        raise ValueError(f"squad_heldout_titles={n_heldout}: {source!r} has {len(titles)} titles, "
                         f"so hold out 1 to {len(titles) - 1}")
    held = {titles[i] for i in np.random.default_rng(EVAL_SPLIT_SEED).permutation(len(titles))[:n_heldout]}
    return [r for r in rows if r["title"] not in held], [r for r in rows if r["title"] in held]


def index_arrays(source: str, rows: list[dict], index_dir: str) -> dict:
    """has_answer, noise order and golden-slot arrays: the original .npy files for hub splits."""
    split = source.rpartition(":")[2]
    if not source.endswith(".json"):
        tag = "train" if split == "train" else "val"
        d = index_dir if os.path.isabs(index_dir) else os.path.join(REPO, index_dir)
        arr = {k: np.load(os.path.join(d, f"{f}_{tag}.npy"), allow_pickle=False) for k, f in
               (("has_answer", "has_answer_indices"), ("noise", "noise_docs_indices"),
                ("golden", "random_indices_for_num_docs_before_golden"))}
        if len(arr["noise"]) != len(rows):
            raise ValueError(f"index arrays in {d!r} are for {len(arr['noise'])} rows but {source!r} has {len(rows)}")
        return arr
    n = len(rows)
    return {"has_answer": np.array([i for i, r in enumerate(rows) if r["has_answer"]], dtype=np.int64),
            "noise": np.random.default_rng(1).permutation(n), "golden": np.random.default_rng(2).permutation(n)}


class SquadRetrieveTask(Task):
    name = "squad_retrieve"
    version = "1"
    primary_metric = "accuracy"
    higher_is_better = True
    axes = ("num_docs",)

    def __init__(self, cfg, tokenizer, train: bool = True):
        super().__init__(cfg, tokenizer)
        self.eval_rows = load_squad_rows(cfg["squad_eval_source"], cfg["cache_dir"])
        held_train = None
        if cfg["squad_heldout_titles"]:
            held_train, self.eval_rows = split_by_title(self.eval_rows, cfg["squad_heldout_titles"], cfg["squad_eval_source"])
            sides = [("held-out", self.eval_rows, "multidoc_num_noise_docs_eval")]
            if train:
                sides.append(("training", held_train, "multidoc_num_noise_docs_train"))
            for side, side_rows, key in sides:
                need = (max(cfg[key]) if isinstance(cfg[key], list) else cfg[key]) + 1
                paragraphs = len({r["context"] for r in side_rows})
                if cfg["multidoc_dedup_noise"] and paragraphs < need:
                    raise ValueError(f"squad_heldout_titles={cfg['squad_heldout_titles']}: the {side} titles have {paragraphs} "
                                     f"distinct paragraphs, fewer than the {need} documents of {key}'s largest sample; "
                                     f"change squad_heldout_titles or use fewer documents")
        self.eval_idx = index_arrays(cfg["squad_eval_source"], self.eval_rows, cfg["squad_index_dir"])
        pool = self.eval_idx["has_answer"]
        n_eval = cfg["eval_set_size"]
        if n_eval > len(pool):
            where = (f"the {cfg['squad_heldout_titles']} held-out titles of {cfg['squad_eval_source']!r} have"
                     if cfg["squad_heldout_titles"] else f"{cfg['squad_eval_source']!r} has")
            raise ValueError(f"eval_set_size={n_eval} but {where} {len(pool)} answerable questions")
        self.eval_questions = pool[np.random.default_rng(EVAL_SPLIT_SEED).permutation(len(pool))[:n_eval]]
        if train:
            self.train_rows = held_train if held_train is not None else load_squad_rows(cfg["squad_train_source"], cfg["cache_dir"])
            self.train_idx = index_arrays(cfg["squad_train_source"], self.train_rows, cfg["squad_index_dir"])

    def build_docs(self, rows, arrays, q_row: int, slot_index: int, n: int, noise_start: int, rng):
        """(text, golden id): n noise paragraphs read from noise_start on, golden at its slot."""
        golden = rows[q_row]["context"]
        before = int(arrays["golden"][slot_index % len(arrays["golden"])]) % (n + 1) \
            if self.cfg["multidoc_noise_injection_policy"] == "random_loc" else 0
        noise, seen, pos = [], {golden}, noise_start
        order = arrays["noise"]
        while len(noise) < n:
            para = rows[int(order[pos % len(order)])]["context"]
            pos += 1
            if self.cfg["multidoc_dedup_noise"]:
                if para in seen:
                    if pos - noise_start > 4 * len(order):
                        raise ValueError(f"not enough distinct paragraphs for {n} noise documents")
                    continue
                seen.add(para)
            noise.append(para)
        docs = noise[:before] + [golden] + noise[before:]
        ids = rng.sample(range(1000), n + 1)
        text = "".join(DOC.format(q=rows[q_row]["question"], i=i, doc=d) for i, d in zip(ids, docs))
        return text, ids[before]

    # ------------------------------------------------------------------ training
    def train_len(self) -> int:
        return len(self.train_idx["has_answer"])

    def train_item(self, index: int, epoch: int) -> list[TrainChunk]:
        n = self.cfg["multidoc_num_noise_docs_train"]
        rng = random.Random(sample_seed(self.cfg["seed"], "squad-train", epoch, index))
        text, gid = self.build_docs(self.train_rows, self.train_idx, int(self.train_idx["has_answer"][index]),
                                    index, n, index * n, rng)
        if self.cfg["multidoc_original_format"]:     # B5 as published: sequence and label tokenised apart
            full = self.tok.encode(text + ORIGINAL_PROMPT_END + ORIGINAL_LABEL.format(i=gid))
            return [TrainChunk(full, self.tok.encode(ORIGINAL_LABEL.format(i=gid)))]
        label = self.tok.encode(ANSWER.format(i=gid))
        return [TrainChunk(self.tok.encode(text + PROMPT_END) + label, label)]

    # ------------------------------------------------------------------ evaluation
    def eval_prompt(self, n: int, i: int):
        rng = random.Random(sample_seed(self.cfg["seed"], "squad-eval", n, i))
        text, gid = self.build_docs(self.eval_rows, self.eval_idx, int(self.eval_questions[i]), i, n, i * n, rng)
        end = ORIGINAL_PROMPT_END if self.cfg["multidoc_original_format"] else PROMPT_END
        return self.tok.encode(text + end), gid

    def score_response(self, text: str, gid: int) -> bool:
        """Cut at the first "|>", re-append it, compare with "{id}|>" (the original rule); our
        format's answer starts with a space, which is stripped; the original format's is not."""
        head = text.split("|>")[0]
        return (head if self.cfg["multidoc_original_format"] else head.strip()) + "|>" == f"{gid}|>"

    def eval_cells(self):
        return [{"num_docs": int(n)} for n in self.cfg["multidoc_num_noise_docs_eval"]]

    def run_cell(self, model, cell, device):
        n = cell["num_docs"]
        correct, lens, rows = 0, [], []
        for i in range(len(self.eval_questions)):
            ids, gid = self.eval_prompt(n, i)
            x = torch.tensor([ids], device=device)
            seq = model.generate(x, max_length=x.shape[1] + self.cfg["eval_max_len"], eos_token_id=self.tok.eos_token_id,
                                 prefill_chunk_size=self.cfg["eval_prefill_chunk_size"])
            resp = self.tok.decode(seq[0, x.shape[1]:].tolist())
            ok = self.score_response(resp, gid)
            correct += ok
            lens.append(len(ids))
            if i < self.cfg["eval_samples_to_log"]:
                rows.append({"response": resp, "gt": f"{gid}|>", "correct": ok})
        total = len(self.eval_questions)
        return {"score": correct / total, "correct": correct, "samples": total,
                "mean_prompt_tokens": float(np.mean(lens)), "logged": rows}

    def summarize(self, records):
        records = sorted(records, key=lambda r: r["num_docs"])
        score = float(np.mean([r["score"] for r in records])) if records else float("nan")
        table = pretty_table(["num noise docs"] + [str(r["num_docs"]) for r in records],
                             [["score"] + [f"{r['score']:.2f}" for r in records]])
        return score, table

    def plot(self, records, path, train_len=None):
        from custom_datasets.plots import line_plot

        records = sorted(records, key=lambda r: r["num_docs"])
        line_plot([r["num_docs"] + 1 for r in records], [r["score"] for r in records], path, "Number of documents",
                  "Success rate", "SQuAD multi-document retrieval", train_x=self.cfg["multidoc_num_noise_docs_train"] + 1)
