"""State growth with length: how large each layer's SSM state gets past the training length.

    python tools/state_growth.py --model DIR --corpus artifacts/lm_corpus --train-len 2048 --lengths 8192 32768
    python tools/state_growth.py --model DIR --text data/wikitext-2-raw/wiki.valid.raw --train-len 512

A state that has not reached its steady-state size within the training length keeps growing past it and
hands the next layers values they never saw in training: the "state collapse" of Stuffed Mamba (arXiv
2410.07145), a candidate cause of failure beyond the training length. Windows of natural text (evenly spaced,
as tools/state_horizon.py takes them) are streamed through the model in chunks of ``--chunk`` tokens
(chunked prefill: each chunk continues from the states the last one left, models/mamba_lm.py caches); after
the chunk that ends at the training length and at each of ``--lengths`` the state h of every layer is read
((b, d_inner, d_state) in Mamba-1, (b, nheads, headdim, d_state) in Mamba-2). Reported per layer, the mean
over windows of max|h| and of the RMS of h, and their ratios to the values at the training length (1 at
the training length by definition; > 1: the state grew beyond anything the training length produced).
``--out`` writes JSON with the command, machine, date, git revision, the model's digest and one row per
layer (no machine paths).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_datasets.lm_corpus import window_starts  # noqa: E402
from tools.cli import OneLineParser, add_out, positive_int, run_cli  # noqa: E402
from tools.state_horizon import add_model_and_text, load_inputs, provenance, write_json  # noqa: E402


@torch.no_grad()
def measure(model, window: torch.Tensor, points: list[int], chunk: int) -> dict[int, list[tuple[float, float]]]:
    """{position: [(max|h|, rms h) per layer]} after streaming window (1, L) in chunks up to each position."""
    caches = model.allocate_inference_cache()
    out = {}
    for c0 in range(0, max(points), chunk):
        model(window[:, c0:c0 + chunk], num_last_tokens=1, caches=caches)
        if c0 + chunk in points:
            out[c0 + chunk] = [(c.ssm_state.abs().max().item(), c.ssm_state.pow(2).mean().sqrt().item())
                               for c in caches]
    return out


def layer_rows(per_window: list[dict], train_len: int, lengths: list[int]) -> list[dict]:
    n_layer = len(per_window[0][train_len])
    rows = []
    for i in range(n_layer):
        row = {"layer": i}
        for k, name in ((0, "max_abs"), (1, "rms")):
            at = {p: sum(w[p][i][k] for w in per_window) / len(per_window) for p in [train_len, *lengths]}
            row[name] = {str(p): v for p, v in at.items()}
            row[f"{name}_ratio"] = {str(p): at[p] / at[train_len] if at[train_len] > 0 else None for p in lengths}
        rows.append(row)
    return rows


def print_table(rows: list[dict], train_len: int, lengths: list[int]) -> None:
    print(f"max|h| at each length / max|h| at the training length ({train_len}); RMS ratio in brackets")
    print(f"{'layer':>5} " + " ".join(f"{p:>16}" for p in lengths))
    for row in rows:
        cells = [f"{row['max_abs_ratio'][str(p)] or 0:7.2f} ({row['rms_ratio'][str(p)] or 0:5.2f})" for p in lengths]
        print(f"{row['layer']:>5} " + " ".join(f"{c:>16}" for c in cells))


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_text(ap)
    ap.add_argument("--train-len", type=positive_int, required=True, help="the model's training length")
    ap.add_argument("--lengths", type=positive_int, nargs="+", default=[8192, 32768], help="longer lengths")
    ap.add_argument("--chunk", type=positive_int, default=512, help="tokens per streamed chunk")
    ap.add_argument("--windows", type=positive_int, default=2, help="windows, evenly spaced over the text")
    ap.add_argument("--device", default="cpu")
    add_out(ap)
    return ap.parse_args(argv)


def run(args, argv) -> int:
    lengths = sorted(set(args.lengths))
    bad = [p for p in [args.train_len, *lengths] if p % args.chunk]
    if bad:
        raise ValueError(f"--train-len / --lengths {bad}: not multiples of --chunk {args.chunk}")
    if lengths[0] <= args.train_len:
        raise ValueError(f"--lengths {lengths}: each must exceed --train-len {args.train_len}")
    model, toks, tok_path = load_inputs(args, mamba1_only=False)   # any mixer: it reads the cache's states
    starts = window_starts(len(toks), lengths[-1], args.windows)
    points = [args.train_len, *lengths]
    per_window = [measure(model, torch.from_numpy(toks[s:s + lengths[-1]])[None].to(args.device), points, args.chunk)
                  for s in starts]
    rows = layer_rows(per_window, args.train_len, lengths)
    print_table(rows, args.train_len, lengths)
    if args.out:
        write_json(args.out, {
            **provenance("tools/state_growth.py", args, argv, tok_path),
            "train_len": args.train_len, "lengths": lengths, "chunk": args.chunk, "windows": args.windows,
            "window_starts": starts, "device": args.device, "dtype": "float32",
            "definitions": {"max_abs": "max over channels and states of |h| after that many tokens, mean over windows",
                            "rms": "root mean square of h over channels and states, mean over windows",
                            "ratio": "the value at a length over the value at train_len"},
            "rows": rows}, args.overwrite)
    return 0


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
