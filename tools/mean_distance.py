"""Mamba Mean Distance per layer: how far back each layer's hidden attention reaches.

    python tools/mean_distance.py --model DIR --corpus artifacts/lm_corpus --split validation --out md.json

DeciMamba (§4) decimates at the first "global" layer, found from the hidden-attention maps. For
each layer, windows of ``--tokens`` tokens from the corpus split run through the model with the
SSM parameters recorded (custom_datasets/debug_params.py); for ``--channels`` evenly spaced
channels (Mamba-2: heads, whose channels share one map), α = hidden_attention(Δ, A, B, C)
(modules/hidden_attention.recorded_hidden_attention); each row's |α| is
normalised to sum 1 and its mean distance is Σ_j p_ij (i − j); the layer's value is the mean over
channels, windows and the rows of the second half (rows with at least l/2 tokens behind them).
Rule used here (ours; the paper reads the maps by eye): the first global layer is the first whose
mean distance is at least ``--global-frac`` of the largest layer's. Prints a table and the layer;
``--out`` writes JSON with every value, the command, the model and its digest, the machine and the
code's commit (no machine paths: paths outside the repository are written as <model>, <corpus>, <out>;
the commit honours DECIMAMBA_COMMIT, engine/results.code_commit); an existing ``--out`` is refused
before any work unless ``--overwrite``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import machine  # noqa: E402
from custom_datasets.debug_params import load_recorded, record_prompt_params  # noqa: E402
from custom_datasets.lm_corpus import split_tokens, window_starts  # noqa: E402
from engine.results import code_commit, weights_digest  # noqa: E402
from models import MambaLMHeadModel  # noqa: E402
from modules.hidden_attention import default_channels, recorded_hidden_attention  # noqa: E402
from tools.cli import (OneLineParser, add_out, check_out, checked_device, positive_int, run_cli,  # noqa: E402
                       write_new_file)
from tools.provenance import public_command, public_path  # noqa: E402

PATH_OPTIONS = {"--model": "<model>", "--corpus": "<corpus>", "--out": "<out>"}


def layer_mean_distance(layer: dict, channels: list[int]) -> float:
    """channels: Mamba-1 channels, or Mamba-2 heads (a recorded A of one value per head)."""
    att = recorded_hidden_attention(layer, channels).abs()                                   # (c, l, l)
    length = att.shape[-1]
    p = att / att.sum(-1, keepdim=True).clamp_min(1e-30)
    pos = torch.arange(length, dtype=torch.float32, device=att.device)
    dist = pos[:, None] - pos[None, :]
    md = (p * dist.clamp_min(0)).sum(-1)                                                      # (c, l)
    return float(md[:, length // 2:].mean())


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    ap.add_argument("--corpus", required=True,
                    help="lm_corpus_dir of tokenized shards (custom_datasets/tokenize_corpus.py)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--tokens", type=positive_int, default=2048)
    ap.add_argument("--windows", type=positive_int, default=4)
    ap.add_argument("--channels", type=positive_int, default=16, help="channels per layer (Mamba-2: heads)")
    ap.add_argument("--global-frac", type=float, default=0.5, help="in (0, 1]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_out(ap)
    return ap.parse_args(argv)


def check_inputs(args) -> None:
    """Bad settings, an existing --out and missing folders end as one line naming them (cli_main), before
    any work."""
    if not 0 < args.global_frac <= 1:
        raise ValueError(f"--global-frac {args.global_frac}: must be in (0, 1]")
    check_out(args.out, args.overwrite)
    checked_device(args.device)
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model}: no such folder (pass a folder holding config.json and "
                                f"model.safetensors)")
    if not os.path.isdir(args.corpus):
        raise FileNotFoundError(f"--corpus {args.corpus}: no such folder (pass an lm_corpus_dir written by "
                                f"custom_datasets/tokenize_corpus.py)")
    if not glob.glob(os.path.join(args.corpus, f"{args.split}.*.bin")):
        have = sorted({name.split(".")[0] for name in os.listdir(args.corpus) if name.endswith(".bin")})
        raise FileNotFoundError(f"--corpus {args.corpus} has no shards of --split {args.split} "
                                f"(splits there: {', '.join(have) or 'none'})")


def run(args, argv) -> int:
    check_inputs(args)
    model = MambaLMHeadModel.from_pretrained(args.model, device=args.device, dtype=torch.float32)
    toks = split_tokens(args.corpus, args.split)
    vocab = model.backbone.embedding.weight.shape[0]
    if toks.size and int(toks.max()) >= vocab:
        raise ValueError(f"--corpus {args.corpus}: token id {int(toks.max())} but the model has {vocab} "
                         f"embeddings (tokenized with another vocabulary?)")
    starts = window_starts(len(toks), args.tokens, args.windows)
    mamba2 = model.config.layer == "Mamba2"
    mixer = model.backbone.layers[0].mixer
    channels = default_channels(mixer.nheads if mamba2 else mixer.d_inner, args.channels)
    per_layer = np.zeros((args.windows, model.config.n_layer))
    with tempfile.TemporaryDirectory() as tmp:
        for w, s in enumerate(starts):
            ids = torch.from_numpy(toks[s:s + args.tokens])[None].to(args.device)
            layers, _ = load_recorded(record_prompt_params(model, ids, tmp, f"w{w}", {}))
            per_layer[w] = [layer_mean_distance({k: v.to(args.device) for k, v in layer.items()}, channels)
                            for layer in layers]          # the maps on --device (the recording is on the CPU)
    md = per_layer.mean(0)
    first = int(np.argmax(md >= args.global_frac * md.max()))
    for i, v in enumerate(md):
        print(f"layer {i:2d}: mean distance {v:8.1f} tokens ({v / args.tokens:.3f} of the window)"
              + ("   <- first global layer" if i == first else ""))
    result = {"command": public_command("tools/mean_distance.py", argv, PATH_OPTIONS),
              "model": public_path(args.model, "<model>"), "model_digest": weights_digest(args.model),
              "machine": machine(), "commit": code_commit(), "tokens": args.tokens,
              "windows": args.windows, "channels": channels, "channel_unit": "head" if mamba2 else "channel",
              "global_frac": args.global_frac,
              "mean_distance": md.round(2).tolist(), "per_window": per_layer.round(2).tolist(),
              "first_global_layer": first}
    if args.out:
        write_new_file(args.out, json.dumps(result, indent=1) + "\n", args.overwrite)
    print(f"first_global_layer={first}")
    return 0


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
