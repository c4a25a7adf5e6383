"""Does ‖Δ‖ ranking keep the passkey? For a trained passkey model, at each layer, how often would a
single decimating layer there keep the key's tokens among its top-k (k from L_base, as the model
would), and where do they rank?

One forward per prompt without decimation gives every layer's ‖Δ‖ scores exactly as a single
decimating layer ℓ would see them (the layers before ℓ run at full length either way), so one pass
answers for every layer and L_base. The key appears twice in the needle sentence ("The pass key is
K. Remember it. K is the pass key."); a copy counts as kept when all its tokens are.

    python benchmarks/needle_retention.py --checkpoint checkpoints/passkey_small_deci \
        --lengths 16000 64000 --samples 2 --L-base 500 2000 --out benchmarks/results/needle_retention
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from configs import schema  # noqa: E402
from custom_datasets.niah import FACT, NiahTask  # noqa: E402
from custom_datasets.sources import load_tokenizer  # noqa: E402
from models.mamba_lm import MambaLMHeadModel  # noqa: E402
from modules.decimation import num_kept, token_scores  # noqa: E402

COLS = ["layer", "L_base", "tokens", "samples", "key_kept_pct", "median_key_rank_pct", "k"]


def key_copies(prompt: list[int], needle: int, key: list[int], span: int) -> list[list[int]]:
    """Positions of each copy of the key's tokens inside the needle sentence."""
    out = []
    for p in range(needle, min(len(prompt) - len(key) + 1, needle + span)):
        if prompt[p:p + len(key)] == key:
            out.append(list(range(p, p + len(key))))
    return out


def layer_scores(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """‖Δ‖ per token (l,) at every layer, from one recorded forward without decimation."""
    with torch.no_grad():
        debug = model(ids, num_last_tokens=1, record=True).debug_params
    return [token_scores(layer["delta"])[0] for layer in debug]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a trained passkey model (folder with model.safetensors)")
    ap.add_argument("--config", default="configs/passkey_small_deci.json", help="its training config (task settings)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[16000, 64000])
    ap.add_argument("--depths", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1])
    ap.add_argument("--samples", type=int, default=2, help="prompts per (depth, length)")
    ap.add_argument("--L-base", type=float, nargs="+", default=[500, 2000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/needle_retention")
    args = ap.parse_args()
    cfg, _ = schema.load(args.config, device=args.device)
    cfg.update(niah_samples_per_cell=args.samples)
    tok = load_tokenizer(cfg["tokenizer"])
    task = NiahTask(cfg, tok, train=False)
    model = MambaLMHeadModel.from_pretrained(args.checkpoint, device=args.device,   # records Δ of every layer
                                             decimation_config=dict(activate=False)).eval()
    span = len(tok.encode(FACT.format(k="00000")))
    hits = {}      # (layer, L_base, length) -> list of (kept?, best key rank percentile)
    rows, t0 = [], time.time()
    for length in args.lengths:
        for depth in args.depths:
            prompts, answers, needles = task.eval_prompts(depth, length)
            for prompt, code, needle in zip(prompts, answers, needles):
                needle += len(task.q_ids)
                copies = key_copies(prompt, needle, task.answer_tokens(code), span)
                if not copies:
                    raise RuntimeError(f"key {code!r} not found near position {needle}: tokenization changed?")
                scores = layer_scores(model, torch.tensor([prompt], device=args.device))
                for layer, s in enumerate(scores):
                    s = s[:-1]                                 # the last token is always kept (protected)
                    order = torch.argsort(s, descending=True)
                    rank = torch.empty_like(order)
                    rank[order] = torch.arange(len(s))
                    best = min(max(int(rank[p]) for p in copy) for copy in copies)
                    for L_base in args.L_base:
                        k = num_kept(len(s), 0, cfg["decimation_beta"], L_base, cfg["decimation_min_seq_len"])
                        hits.setdefault((layer, L_base, length), []).append((best < k, 100 * best / len(s), k))
    for (layer, L_base, length), v in sorted(hits.items()):
        rows.append({"layer": layer, "L_base": L_base, "tokens": length, "samples": len(v),
                     "key_kept_pct": round(100 * float(np.mean([h for h, _, _ in v])), 1),
                     "median_key_rank_pct": round(float(np.median([r for _, r, _ in v])), 2), "k": v[0][2]})
    note = (f"Checkpoint {args.checkpoint}; {len(args.depths)} depths x {args.samples} samples per length; "
            f"{time.time() - t0:.0f} s on {args.device}. "
            "key_kept_pct: prompts where a single decimating layer here with this L_base keeps every token of a "
            "copy of the key; median_key_rank_pct: the best copy's worst token rank among all tokens by ‖Δ‖ "
            "(0 = highest), as a percentage of the prompt.")
    write_results(args.out, rows, COLS, "Needle retention under ‖Δ‖-ranked decimation", note)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
