"""State horizon per layer: how many tokens each SSM channel of a Mamba-1 model can hold information.

    python tools/state_horizon.py --model DIR --text data/wikitext-2-raw/wiki.valid.raw --out sh.json
    python tools/state_horizon.py --model DIR --corpus artifacts/lm_corpus --split validation

Windows of ``--tokens`` tokens of natural text (``--windows`` of them, evenly spaced over the text,
as tools/mean_distance.py takes them) run through the model with the SSM parameters recorded
(``model(ids, record=True)``: per layer A = −exp(A_log) (e, n) and the step size the scan uses,
Δ = softplus(dt_proj(dt) + dt_proj.bias) (e, l), modules/mamba_mixer.py step 3b).

Channel d's state n evolves as h_t = exp(Δ_t,d · A_dn) h_{t−1} + Δ_t,d B_t,n x_t,d, so what token s
wrote is scaled by exp(−|A_dn| · Σ_{s<τ≤t} Δ_τ,d) at token t: over k tokens at a step size Δ it keeps
exp(−k Δ |A_dn|). The slowest of the channel's n states has the smallest |A_dn|, and its half-life is

    h_d = ln 2 / (Δ_d · min_n |A_dn|)  tokens.

Two step sizes per channel, each over every token of every window:

* ``mean`` — Δ_d = mean_t Δ_t,d: the channel's average rate on natural text. Σ Δ over k tokens is
  k · mean Δ, so this half-life is exact for the typical text the windows hold.
* ``p1`` — Δ_d = the 1st percentile of Δ_t,d over tokens: the channel's "ignore" regime. A token with a
  small Δ is neither written into the state (Δ B x ≈ 0) nor lets the state decay (exp(Δ A) ≈ 1): the
  channel skips it. The p1 half-life is how long the channel would hold what it has if it stayed in
  the regime it reaches on its 1% most-ignored tokens for a whole stretch of filler (a passkey's
  haystack): an optimistic horizon, reachable only if the input keeps Δ that low.

Reported per layer: the median, 90th percentile and largest h_d over its channels, and the fraction
of channels with h_d ≥ 2,048 (the pretraining length), ≥ 131,072 and ≥ 1,048,576 tokens; the same
fractions over every channel of the model. Prints a table; ``--out`` writes JSON with the command,
machine, date, git revision, settings, the model's digest and one row per layer (no machine paths:
paths outside the repository are written as <model>, <text>, ...); an existing ``--out`` is refused
before any work unless ``--overwrite``.
Memory: Δ of every layer, window and token is kept to take percentiles (4·layers·d_inner·windows·tokens
bytes: 176 MB for 24 layers × 448 channels × 2 × 2,048).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks.common import git_rev, machine  # noqa: E402
from custom_datasets.lm_corpus import split_tokens, window_starts  # noqa: E402  (as tools/mean_distance.py)
from custom_datasets.sources import GPT_NEOX, load_tokenizer  # noqa: E402
from engine.errors import BadFileError  # noqa: E402
from engine.results import weights_digest  # noqa: E402
from models import MambaLMHeadModel  # noqa: E402  (as tools/mean_distance.py loads --model)
from tools.cli import (OneLineParser, add_out, check_out, checked_device, positive_int, run_cli,  # noqa: E402
                       write_new_file)
from tools.provenance import public_command, public_path  # noqa: E402

THRESHOLDS = (2048, 131072, 1048576)          # tokens: the 2K pretraining length, 128K, 1M
REGIMES = ("mean", "p1")
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------- the measurement
def half_lives(step: np.ndarray, a_min: np.ndarray) -> np.ndarray:
    """h_d = ln 2 / (Δ_d · min_n |A_dn|) in tokens, float64; inf where Δ_d · |A| underflows to 0."""
    rate = step.astype(np.float64) * a_min.astype(np.float64)
    with np.errstate(divide="ignore"):
        return np.where(rate > 0, LN2 / np.maximum(rate, 1e-300), np.inf)


def channel_steps(delta: np.ndarray) -> dict:
    """delta (e, tokens) -> {"mean": mean_t Δ (e,), "p1": 1st percentile over tokens (e,)}, float64."""
    delta = delta.astype(np.float64)
    return {"mean": delta.mean(axis=1), "p1": np.percentile(delta, 1.0, axis=1)}


def summarize(h: np.ndarray) -> dict:
    """Median / 90th percentile / largest half-life and the fraction of channels at each threshold."""
    out = {"median_half_life": float(np.median(h)), "p90_half_life": float(np.percentile(h, 90)),
           "max_half_life": float(h.max())}
    out.update({f"frac_ge_{t}": float((h >= t).mean()) for t in THRESHOLDS})
    return out


def measure(model, windows: list[torch.Tensor]) -> list[dict]:
    """Per layer: {"a_min" (e,), "delta" (e, W·T) float32, "h": {regime: (e,)}} from recorded forwards."""
    deltas, a_min = None, None
    with torch.no_grad():
        for ids in windows:
            out = model(ids, num_last_tokens=1, record=True)
            if deltas is None:
                deltas = [[] for _ in out.debug_params]
                a_min = [(-layer["A"].double()).abs().min(dim=-1).values.numpy() for layer in out.debug_params]
            for i, layer in enumerate(out.debug_params):
                deltas[i].append(layer["delta"][0].float().numpy())          # (e, T)
    layers = []
    for i, parts in enumerate(deltas):
        delta = np.concatenate(parts, axis=1)
        steps = channel_steps(delta)
        layers.append({"a_min": a_min[i], "steps": steps,
                       "h": {r: half_lives(steps[r], a_min[i]) for r in REGIMES}})
    return layers


def layer_rows(layers: list[dict]) -> tuple[list[dict], dict]:
    rows = []
    for i, layer in enumerate(layers):
        row = {"layer": i, "channels": int(layer["a_min"].shape[0]),
               "median_min_abs_A": float(np.median(layer["a_min"]))}
        for r in REGIMES:
            row[f"median_{r}_delta"] = float(np.median(layer["steps"][r]))
            row[r] = summarize(layer["h"][r])
        rows.append(row)
    whole = {r: summarize(np.concatenate([layer["h"][r] for layer in layers])) for r in REGIMES}
    return rows, whole


# ---------------------------------------------------------------------------- inputs
def load_model(path: str, device: str, mamba1_only: bool = True):
    """The model in fp32, eval mode; mamba1_only refuses other mixers (this tool reads per-channel A)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: no such folder (pass a folder holding config.json and "
                                f"model.safetensors)")
    model = MambaLMHeadModel.from_pretrained(path, device=device, dtype=torch.float32)
    if mamba1_only and model.config.layer != "Mamba1":
        raise ValueError(f"--model {path}: a {model.config.layer} model; this measurement is for "
                         f"Mamba-1 (per-channel A of shape (d_inner, d_state))")
    return model.eval()


def text_tokens(args) -> tuple[np.ndarray, str | None]:
    """-> (token ids, the tokenizer.json used: None for a tokenized corpus)."""
    if args.corpus:
        return split_tokens(args.corpus, args.split), None
    if not os.path.isfile(args.text):
        raise FileNotFoundError(f"--text {args.text}: no such file")
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise BadFileError(f"--text {args.text}: not UTF-8 text (byte {exc.start})") from None
    tok = load_tokenizer(tokenizer_source(args))
    return np.asarray(tok.encode(text), dtype=np.int64), tok.path


def tokenizer_source(args) -> str:
    if args.tokenizer:
        return args.tokenizer
    own = os.path.join(args.model, "tokenizer.json")
    return own if os.path.isfile(own) else GPT_NEOX            # GPT-NeoX-20B is bundled (data/)


# ---------------------------------------------------------------------------- provenance
PATH_OPTIONS = {"--model": "<model>", "--corpus": "<corpus>", "--text": "<text>", "--tokenizer": "<tokenizer>",
                "--out": "<out>"}


def provenance(script: str, args, argv, tok_path: str | None) -> dict:
    """The fields a measurement file of these tools starts with: command, machine, date, code, model and its
    digest, the text it read (no machine paths)."""
    return {
        "command": public_command(script, argv, PATH_OPTIONS), "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git": git_rev(),
        "model": public_path(args.model, "<model>"), "model_digest": weights_digest(args.model),
        "text": ({"corpus": public_path(args.corpus, "<corpus>"), "split": args.split} if args.corpus else
                 {"file": public_path(args.text, "<text>"), "tokenizer": public_path(tok_path, "<tokenizer>")}),
    }


def check_vocab(model, toks: np.ndarray, source: str) -> None:
    """ValueError naming ``source`` (the text) and its largest token id if that id has no embedding row."""
    vocab = model.backbone.embedding.weight.shape[0]
    if toks.size and int(toks.max()) >= vocab:
        raise ValueError(f"{source}: holds token id {int(toks.max())} but the model has {vocab} embeddings "
                         f"(ids 0..{vocab - 1}): tokenized with another vocabulary?")


def _finite(obj):
    """JSON has no Infinity: an infinite half-life (Δ underflowed to 0) is written as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, result: dict, overwrite: bool) -> None:
    """Atomically, never replacing an existing file unless ``overwrite`` (tools/cli.write_new_file)."""
    write_new_file(path, json.dumps(_finite(result), indent=1) + "\n", overwrite)


# ---------------------------------------------------------------------------- command line
def _fmt_h(h: float) -> str:
    if not math.isfinite(h):
        return "inf"
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if h >= scale:
            v = h / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{h:.0f}"


def print_table(rows: list[dict], whole: dict) -> None:
    head = " ".join(f"{'>=' + _fmt_h(t):>6}" for t in THRESHOLDS)
    print(f"half-life h_d = ln2 / (Δ_d · min_n |A_dn|) tokens; fractions of channels with h_d >= 2K / 128K / 1M")
    print(f"{'layer':>5} | {'median h':>8} {'p90 h':>7} {head} | {'median h':>8} {'p90 h':>7} {head}")
    width = 8 + 1 + 7 + 7 * len(THRESHOLDS)
    print(f"{'':>5} | {'Δ = mean over tokens':<{width}} | Δ = 1st percentile over tokens (ignore regime)")

    def cells(s):
        fr = " ".join(f"{s[f'frac_ge_{t}']:6.3f}" for t in THRESHOLDS)
        return f"{_fmt_h(s['median_half_life']):>8} {_fmt_h(s['p90_half_life']):>7} {fr}"

    for row in rows:
        print(f"{row['layer']:>5} | {cells(row['mean'])} | {cells(row['p1'])}")
    print(f"{'all':>5} | {cells(whole['mean'])} | {cells(whole['p1'])}")


def add_model_and_text(ap) -> None:
    """--model and the text it reads (--corpus/--split or --text/--tokenizer), as tools/state_growth.py takes them."""
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", help="lm_corpus_dir of tokenized shards (custom_datasets/tokenize_corpus.py)")
    src.add_argument("--text", help="a UTF-8 text file, e.g. data/wikitext-2-raw/wiki.valid.raw")
    ap.add_argument("--split", default="validation", help="corpus split (with --corpus)")
    ap.add_argument("--tokenizer", default=None,
                    help="for --text: tokenizer.json or a folder holding one; default: the model folder's, "
                         "else the bundled GPT-NeoX-20B")


def load_inputs(args, mamba1_only: bool = True):
    """-> (model, token ids, tokenizer path) after the --out, device, model and vocabulary checks (one-line
    errors, before any work)."""
    check_out(args.out, args.overwrite)
    checked_device(args.device)
    model = load_model(args.model, args.device, mamba1_only)
    toks, tok_path = text_tokens(args)
    source = f"--corpus {args.corpus} --split {args.split}" if args.corpus else f"--text {args.text}"
    check_vocab(model, toks, source)
    return model, toks, tok_path


def parse_args(argv):
    ap = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_text(ap)
    ap.add_argument("--tokens", type=positive_int, default=2048, help="tokens per window")
    ap.add_argument("--windows", type=positive_int, default=2, help="windows, evenly spaced over the text")
    ap.add_argument("--device", default="cpu")
    add_out(ap)
    return ap.parse_args(argv)


def run(args, argv) -> int:
    model, toks, tok_path = load_inputs(args)
    starts = window_starts(len(toks), args.tokens, args.windows)
    windows = [torch.from_numpy(toks[s:s + args.tokens])[None].to(args.device) for s in starts]
    rows, whole = layer_rows(measure(model, windows))
    print_table(rows, whole)
    if args.out:
        mixer = model.backbone.layers[0].mixer
        result = {
            **provenance("tools/state_horizon.py", args, argv, tok_path),
            "architecture": {"n_layer": model.config.n_layer, "d_model": model.config.d_model,
                             "d_inner": mixer.d_inner, "d_state": mixer.d_state, "dt_rank": mixer.dt_rank},
            "text_tokens": int(len(toks)), "tokens": args.tokens, "windows": args.windows, "window_starts": starts,
            "device": args.device, "dtype": "float32", "thresholds": list(THRESHOLDS),
            "definitions": {
                "half_life": "h_d = ln2 / (delta_d * min_n |A_dn|) tokens, A = -exp(A_log): the slowest state of channel d",
                "mean": "delta_d = mean over every token of every window of softplus(dt_proj(dt) + bias)",
                "p1": "delta_d = 1st percentile of that delta over tokens: the channel's ignore regime "
                      "(small delta: the token is neither written nor lets the state decay)",
                "frac_ge_N": "fraction of the layer's channels with h_d >= N tokens",
            },
            "rows": rows, "model_fractions": whole,
        }
        write_json(args.out, result, args.overwrite)
    return 0


def main(argv=None) -> int:
    return run_cli(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
