"""Writes calculate_mamba_attn_maps.ipynb (kept as code so the notebook stays reviewable and output-free)."""
import os

import nbformat as nbf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLS = [
    ("md", """# Mamba hidden-attention maps

Mamba's selective scan is a causal linear operator: `y = α u + D u`, with
`α[i, j] = Σ_n C_i[n] · exp(A[n] · Σ_{k=j+1..i} Δ_k) · Δ_j · B_j[n]` per channel
(Ali et al. 2024; DeciMamba §3); for a Mamba-2 recording, per head (one A and one Δ per head, docs/MAMBA2.md). Plotting `|α|` per layer shows how far back each layer can look; past
the training length, the effective receptive field stops growing (DeciMamba's Fig. 1).

**Input**: a `params_*.safetensors` file written by the passkey evaluation with `record_debug_params`
on — e.g. `python finetune_ssm.py --eval 6 --device 0 --set load_cp=<checkpoint>` writes one per example
under `<run folder>/artifacts/` — named by `DECIMAMBA_ATTN_PARAMS`. Without one, the notebook records an
example itself: one ~1K-token passkey prompt (depth 0.25) read by the shipped checkpoint
`checkpoints/passkey_small_deci` with decimation off, as eval 6 records (CPU, seconds).
**Output**: PNGs in `OUT_DIR`. All model math is in `modules/hidden_attention.py`; this notebook only
loads, calls and plots."""),
    ("code", """# Parameters (environment variables override them, so the notebook also runs headless)
import os

PARAMS = os.environ.get("DECIMAMBA_ATTN_PARAMS")        # a params_*.safetensors; None: record an example
EXAMPLE_TOKENS = int(os.environ.get("DECIMAMBA_ATTN_EXAMPLE_TOKENS", "1000"))  # the example's haystack length
OUT_DIR = os.environ.get("DECIMAMBA_ATTN_OUT", "attn_maps")
LAYER = int(os.environ.get("DECIMAMBA_ATTN_LAYER", "-1"))  # the layer drawn large; -1: two thirds deep (17 of 24)
N_CHANNELS = 11                                          # channels (Mamba-2: heads) averaged, evenly spaced
TH_ALL, TH_ONE = -3, -2                                  # log10 clip of figure 1 and figure 2"""),
    ("code", """import math
import sys

import matplotlib
if not os.environ.get("DISPLAY") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, os.path.abspath("."))
from custom_datasets.debug_params import load_recorded
from modules.hidden_attention import default_channels, log_normalized, recorded_hidden_attention

device = "cuda" if torch.cuda.is_available() else "cpu"
os.makedirs(OUT_DIR, exist_ok=True)
if PARAMS is None:   # the eval-6 recording, on the shipped checkpoint, for one short prompt
    import finetune_ssm

    runs = os.path.abspath(os.path.join(OUT_DIR, "recording"))
    rc = finetune_ssm.main(["--config", "configs/demo_checkpoint.json", "--device", "cpu", "--run-name", "example",
                            "--set", f"output_dir={runs}", "--set", "record_debug_params=true",
                            "--set", "activate_decimation=false", "--set", "niah_needle_depths_eval=[0.25]",
                            "--set", f"niah_context_lens_eval=[{EXAMPLE_TOKENS}]", "--set", "niah_samples_per_cell=1"])
    if rc != 0:
        raise RuntimeError(f"recording the example failed (exit code {rc}); set DECIMAMBA_ATTN_PARAMS to a recording")
    PARAMS = os.path.join(runs, "example", "artifacts", f"params_d0.25_L{EXAMPLE_TOKENS}_s0.safetensors")
layers, meta = load_recorded(PARAMS)
print(f"{PARAMS}: {len(layers)} layers, {meta['prompt_tokens']} tokens, needle at context position {meta['needle_position']}, device {device}")"""),
    ("code", """maps = []
for i, p in enumerate(layers):
    mamba2 = p["A"].dim() == 1                 # Mamba-2 records one A per head: its maps are per head
    chans = default_channels(p["delta"].shape[0], N_CHANNELS)
    att = recorded_hidden_attention({k: v.to(device) for k, v in p.items()}, chans, average=True)
    maps.append(att.cpu())
print(f"{len(maps)} maps of shape {tuple(maps[0].shape)}, {'heads' if mamba2 else 'channels'} {chans}")"""),
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
    for i, (kind, src) in enumerate(CELLS):
        cell = nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src)
        cell.id = f"cell-{i}"                       # fixed ids: regenerating changes only what changed
        nb.cells.append(cell)
    nb.cells[1].metadata["tags"] = ["parameters"]
    nbf.write(nb, os.path.join(REPO, "calculate_mamba_attn_maps.ipynb"))


if __name__ == "__main__":
    main()
