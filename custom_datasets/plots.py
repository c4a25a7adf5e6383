"""Plots drawn from result records only (results.jsonl), never from live state."""
from __future__ import annotations

import math

import numpy as np

from custom_datasets.base import length_label


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    import os

    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def passkey_heatmap(records, path, train_len=None, title="Passkey retrieval"):
    """x = context length (ascending), y = needle depth (0 at the top); red -> yellow -> green."""
    from matplotlib.colors import LinearSegmentedColormap

    plt = _plt()
    depths = sorted({r["depth"] for r in records})
    lens = sorted({r["ctx_len"] for r in records})
    grid = np.full((len(depths), len(lens)), np.nan)
    for r in records:
        grid[depths.index(r["depth"]), lens.index(r["ctx_len"])] = r["score"]
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])
    fig, ax = plt.subplots(figsize=(1.1 * len(lens) + 2.5, 0.6 * len(depths) + 1.8))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lens)), [length_label(n) for n in lens])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xlabel("Context Length [Tokens]")
    ax.set_ylabel("Passkey Depth")
    for i in range(len(depths)):
        for j in range(len(lens)):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
    if train_len and lens:
        # place the marker on the log-length axis between the neighbouring columns
        x = float(np.interp(math.log(train_len), [math.log(n) for n in lens], range(len(lens))))
        ax.axvline(x, color="purple", linewidth=2, label="Train Length")
        ax.legend(loc="upper left", bbox_to_anchor=(1.15, 1.0))
    score = np.nanmean(grid) if np.isfinite(grid).any() else float("nan")
    ax.set_title(f"{title}: {100 * score:.1f}%")
    fig.colorbar(im, ax=ax, fraction=0.04)
    _save(fig, path)
    plt.close(fig)


def line_plot(xs, ys, path, xlabel, ylabel, title, train_x=None, logy=False):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o")
    if train_x is not None:
        ax.axvline(train_x, color="purple", linestyle="--", label="Train Length")
        ax.legend()
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
