"""Pre-tokenise PG-19 books with the GPT-NeoX tokenizer into <out_dir>/{split}_set.pt.

    python custom_datasets/tokenize_pg19.py --eval_only                    # hub: test + validation
    python custom_datasets/tokenize_pg19.py                                # hub: + train (28,602 books)
    python custom_datasets/tokenize_pg19.py --books_dir DIR [--split test] # local .txt books

Each file is a list of {short_book_title: str, input_tokens: LongTensor (1, T)}, loadable with
torch.load(weights_only=True). Fixes of the original (B17): the output folder is created, and
each split is written once, atomically, at the end (not re-saved every 1,000 books). Local
Project Gutenberg files have their licence header and footer removed (the text between the
'*** START OF' and '*** END OF' lines is kept).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from custom_datasets.sources import GPT_NEOX, load_hf_dataset, load_tokenizer  # noqa: E402


def strip_gutenberg(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    lines = text.split("\n")
    start = next((i + 1 for i, ln in enumerate(lines) if ln.startswith("*** START OF")), 0)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("*** END OF")), len(lines))
    return "\n".join(lines[start:end]).strip("\n")


def tokenize_books(books, tokenizer) -> list[dict]:
    out = []
    for title, text in books:
        ids = tokenizer.encode(text)
        out.append({"short_book_title": title, "input_tokens": torch.tensor([ids], dtype=torch.long)})
    return out


def save_split(items, out_dir: str, split: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}_set.pt")
    torch.save(items, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def local_books(books_dir: str):
    files = sorted(glob.glob(os.path.join(books_dir, "*.txt")))
    if not files:
        raise FileNotFoundError(f"--books_dir {books_dir!r} holds no .txt files")
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            yield os.path.splitext(os.path.basename(f))[0], strip_gutenberg(fh.read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval_only", action="store_true", help="only the test and validation splits")
    ap.add_argument("--books_dir", default=None, help="a folder of local .txt books instead of the hub")
    ap.add_argument("--split", default="test", help="split name to write for --books_dir (default: test)")
    ap.add_argument("--out_dir", default="artifacts/ppl_test/pg19")
    ap.add_argument("--tokenizer", default=GPT_NEOX)
    ap.add_argument("--cache_dir", default="./hf_cache")
    args = ap.parse_args(argv)
    try:
        tok = load_tokenizer(args.tokenizer, args.cache_dir)
        if args.books_dir:
            items = tokenize_books(local_books(args.books_dir), tok)
            print(f"{args.split}: {len(items)} books -> {save_split(items, args.out_dir, args.split)}")
            return 0
        for split in (["test", "validation"] if args.eval_only else ["test", "validation", "train"]):
            ds = load_hf_dataset("deepmind/pg19", None, split, args.cache_dir, hint="--books_dir DIR (local .txt books)")
            items = tokenize_books(zip(ds["short_book_title"], ds["text"]), tok)
            print(f"{split}: {len(items)} books -> {save_split(items, args.out_dir, split)}")
    except (OSError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
