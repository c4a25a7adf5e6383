"""Writes calculate_mamba_attn_maps.ipynb (kept as code so the notebook stays reviewable and output-free)."""
import os

import nbformat as nbf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLS = [
    ("md", """# Mamba hidden-attention maps

Mamba's selective scan is a causal linear operator: `y = α u + D u`, with
`α[i, j] = Σ_n C_i[n] · exp(A[n] · Σ_{k=j+1..i} Δ_k) · Δ_j · B_j[n]` per channel
(Ali et al. 2024; DeciMamba §3). Plotting `|α|` per layer shows how far back each layer can look; past
the training length, the effective receptive field stops growing (DeciMamba's Fig. 1).

**Input**: a `params_*.safetensors` file written by the passkey evaluation with `record_debug_params`
on — e.g. `python finetune_ssm.py --eval 6 --device 0 --set load_cp=<checkpoint>` writes one per example
under `<run folder>/artifacts/`. **Output**: PNGs in `OUT_DIR`. All model math is in
`modules/hidden_attention.py`; this notebook only loads, calls and plots."""),
    ("code", """# Parameters (environment variables override them, so the notebook also runs headless)
import os

PARAMS = os.environ.get("DECIMAMBA_ATTN_PARAMS")        # a params_*.safetensors; None: the newest under ./output
OUT_DIR = os.environ.get("DECIMAMBA_ATTN_OUT", "attn_maps")
LAYER = int(os.environ.get("DECIMAMBA_ATTN_LAYER", "-1"))  # the layer drawn large; -1: two thirds deep (17 of 24)
N_CHANNELS = 11                                          # channels averaged, evenly spaced over d_inner
TH_ALL, TH_ONE = -3, -2                                  # log10 clip of figure 1 and figure 2"""),
    ("code", """import glob
import math
import sys

import matplotlib
if not os.environ.get("DISPLAY") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, os.path.abspath("."))
from custom_datasets.debug_params import load_recorded
from modules.hidden_attention import default_channels, hidden_attention, log_normalized

device = "cuda" if torch.cuda.is_available() else "cpu"
if PARAMS is None:
    found = sorted(glob.glob("output/**/artifacts/params_*.safetensors", recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError("no params_*.safetensors under ./output: run the passkey eval with "
                                "record_debug_params (python finetune_ssm.py --eval 6 ...) or set DECIMAMBA_ATTN_PARAMS")
    PARAMS = found[-1]
layers, meta = load_recorded(PARAMS)
os.makedirs(OUT_DIR, exist_ok=True)
print(f"{PARAMS}: {len(layers)} layers, {meta['prompt_tokens']} tokens, needle at context position {meta['needle_position']}, device {device}")"""),
    ("code", """maps = []
for i, p in enumerate(layers):
    d_inner = p["delta"].shape[0]
    chans = default_channels(d_inner, N_CHANNELS)
    att = hidden_attention(p["delta"].to(device), p["A"].to(device), p["B"].to(device), p["C"].to(device),
                           chans, average=True)
    maps.append(att.cpu())
print(f"{len(maps)} maps of shape {tuple(maps[0].shape)}, channels {chans}")"""),
    ("code", """cols = min(6, len(maps))
rows = math.ceil(len(maps) / cols)
fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
for i, ax in enumerate(axes.flat):
    ax.axis("off")
    if i < len(maps):
        im = ax.imshow(log_normalized(maps[i], TH_ALL), cmap="turbo", interpolation="none", vmin=TH_ALL, vmax=0)
        ax.set_title(str(i + 1))
fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
fig.suptitle(f"normalized attention maps per layer [log scale], TH = 1e{TH_ALL}")
fig.savefig(os.path.join(OUT_DIR, "attn_maps_all_layers.png"), dpi=100, bbox_inches="tight")"""),
    ("code", """layer = LAYER if LAYER >= 0 else min(len(maps) - 1, round(len(maps) * 2 / 3))
fig, ax = plt.subplots(figsize=(8, 8))
im = ax.imshow(log_normalized(maps[layer], TH_ONE), cmap="turbo", interpolation="none", vmin=TH_ONE, vmax=0)
ax.set_title(f"layer {layer + 1} [log scale], TH = 1e{TH_ONE}, {meta['prompt_tokens']} tokens")
fig.colorbar(im, ax=ax, shrink=0.8)
fig.savefig(os.path.join(OUT_DIR, f"attn_map_layer{layer + 1}.png"), dpi=100, bbox_inches="tight")
print("wrote", sorted(os.listdir(OUT_DIR)))"""),
]


def main():
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for kind, src in CELLS:
        nb.cells.append(nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src))
    nb.cells[1].metadata["tags"] = ["parameters"]
    nbf.write(nb, os.path.join(REPO, "calculate_mamba_attn_maps.ipynb"))


if __name__ == "__main__":
    main()
