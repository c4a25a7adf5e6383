"""Tokenize a book corpus into memory-mapped uint16 shards for the ``lm_corpus`` task.

    python custom_datasets/tokenize_corpus.py --split train --out artifacts/lm_corpus PART.tar.xz ...
    python custom_datasets/tokenize_corpus.py --split test --out artifacts/lm_corpus --pg19 test.tar.xz

Each input is a tar archive of ``<split>/<id>.txt`` books (``.tar.xz`` or plain ``.tar``; the
Gutenberg corpus's train parts are each a complete archive) or a folder of ``.txt`` files. Each
input becomes one shard ``<out>/<split>.<tag>.bin`` (uint16 ids, books in archive order, each
followed by <|endoftext|>) and ``<split>.<tag>.json`` (tokens, books with offset and length,
digests of the tokenizer and the input). Shards are written atomically; an existing shard whose
input and tokenizer digests match is kept (said so), a mismatching one is an error.
``--pg19`` also writes the ``ppl_test`` task's format (loaded with weights_only=True): for the train
split ``<out>/pg19_train/train_set.pt`` (its training books), for any other split
``<out>/pg19_<split>/test_set.pt`` (the books the perplexity-by-length evaluation reads). A
``pg19_dir`` for fine-tuning on ``ppl_test`` holds both files (links to the two).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from custom_datasets.sources import GPT_NEOX, load_tokenizer  # noqa: E402
from engine.errors import BadFileError, read_json  # noqa: E402

BATCH_BOOKS = 64


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_books(source: str):
    """(book id, text) pairs of a tar archive or a folder of .txt files, in their stored order."""
    if os.path.isdir(source):
        for name in sorted(os.listdir(source)):
            if name.endswith(".txt"):
                with open(os.path.join(source, name), encoding="utf-8") as f:
                    yield name[:-4], f.read()
        return
    try:
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    yield os.path.basename(member.name)[:-4], tar.extractfile(member).read().decode("utf-8")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{source}: not a readable tar archive ({exc})") from None


def shard_tag(source: str) -> str:
    base = os.path.basename(source.rstrip("/"))
    for suffix in (".tar.xz", ".tar", ".xz"):
        base = base.replace(suffix, "")
    return base.replace(".", "-") or "books"


def tokenize_source(source: str, tok, eos: int):
    books, pieces, offset = [], [], 0
    batch = []

    def flush():
        nonlocal offset
        for (book_id, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
            arr = np.asarray(ids + [eos], dtype=np.uint16)
            books.append({"id": book_id, "offset": offset, "tokens": len(ids)})
            pieces.append(arr)
            offset += len(arr)
        batch.clear()

    for item in read_books(source):
        batch.append(item)
        if len(batch) == BATCH_BOOKS:
            flush()
    flush()
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)), books


def write_atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def pg19_file(split: str) -> str:
    """The ppl_test file a split's books become: train_set.pt for training, test_set.pt for evaluation."""
    return "train_set.pt" if split == "train" else "test_set.pt"


def write_pg19(out: str, split: str, tokens: np.ndarray, books: list[dict]) -> str:
    import torch

    items = [{"short_book_title": b["id"], "input_tokens": torch.from_numpy(
        tokens[b["offset"]:b["offset"] + b["tokens"]].astype(np.int64)).view(1, -1)} for b in books]
    folder = os.path.join(out, f"pg19_{split}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, pg19_file(split))
    write_atomic(path, lambda p: torch.save(items, p))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="tar archives of <split>/<id>.txt books, or folders of .txt books")
    ap.add_argument("--split", required=True, help="split name of the shards (train, validation, test)")
    ap.add_argument("--out", required=True, help="corpus folder (lm_corpus_dir)")
    ap.add_argument("--tokenizer", default=GPT_NEOX)
    ap.add_argument("--pg19", action="store_true", help="also write pg19_<split>/{train,test}_set.pt for the ppl_test task")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer)
        if tok.vocab_size > 1 << 16:
            raise ValueError(f"tokenizer {args.tokenizer!r} has {tok.vocab_size} tokens: more than uint16 holds")
        tok_sha = sha256_file(tok.path)
        os.makedirs(args.out, exist_ok=True)
        all_tokens, all_books = [], []
        for src in args.sources:
            if not os.path.exists(src):
                raise FileNotFoundError(f"{src!r} does not exist")
            t0 = time.time()
            src_sha = sha256_file(src) if os.path.isfile(src) else None
            base = os.path.join(args.out, f"{args.split}.{shard_tag(src)}")
            if os.path.isfile(base + ".json"):
                old = read_json(base + ".json", "remove it (and its .bin) and run again")
                if not isinstance(old, dict):
                    raise BadFileError(f"{base}.json: not a JSON object (a shard description); remove it (and "
                                       f"its .bin) and run again")
                if (old.get("source_sha256"), old.get("tokenizer_sha256")) != (src_sha, tok_sha):
                    raise ValueError(f"{base}.json exists for another input or tokenizer; remove it or choose another --out")
                print(f"{base}.bin: already tokenized from this input ({old['tokens']:,} tokens), kept")
                tokens = np.memmap(base + ".bin", dtype="<u2", mode="r")
                books = old["books"]
            else:
                tokens, books = tokenize_source(src, tok, tok.eos_token_id)
                write_atomic(base + ".bin", lambda p: tokens.astype("<u2").tofile(p))
                meta = {"split": args.split, "source": os.path.basename(src), "source_sha256": src_sha,
                        "tokenizer_sha256": tok_sha, "tokens": int(len(tokens)), "books": books}
                write_atomic(base + ".json", lambda p: write_json(p, meta))
                print(f"{base}.bin: {len(books)} books, {len(tokens):,} tokens in {time.time() - t0:.0f} s")
            off = sum(len(t) for t in all_tokens)
            all_books += [{**b, "offset": b["offset"] + off} for b in books]
            all_tokens.append(np.asarray(tokens))
        if args.pg19:
            print(f"ppl_test books: {write_pg19(args.out, args.split, np.concatenate(all_tokens), all_books)}")
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
