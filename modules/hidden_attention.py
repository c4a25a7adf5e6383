"""Mamba's implicit ("hidden") attention, computed from recorded SSM parameters.

Ali, Zimerman & Wolf, "The Hidden Attention of Mamba Models" (arXiv 2403.01590), as used by
DeciMamba (§3, Fig. 1) to show the limited effective receptive field past the training length.
Unrolling the selective scan of one channel c (ZOH for A, Euler for B, as the kernel):

    y_i = Σ_{j<=i} α[i, j] u_j + D u_i,
    α[i, j] = Σ_n C_i[n] · exp(A[n] · (S_i − S_j)) · Δ_j · B_j[n],   S = cumsum(Δ)

Rows and columns are cut into blocks of b = block_rows. For row i in block [r0, r0 + b) and
column j in an earlier block [c1 − b, c1) (c1 <= r0), the gap splits at the two block starts,

    S_i − S_j = (S_i − S_r0) + (S_r0 − S_c1) + (S_c1 − S_j),   each term >= 0,

so α[r0:r0+b, :r0] = Lᵀ @ (mid · R) is one matmul, with L = C_i e^{A (S_i − S_r0)},
R = e^{A (S_c1 − S_j)} Δ_j B_j (both computed once per position) and mid = e^{A (S_r0 − S_c1)}
(one value per block pair). All factors are exponentials of non-positive numbers (A < 0), in (0, 1]:
nothing overflows at any length, and an underflow only drops values below fp32's smallest normal.
Columns inside the row's own block use e^{A (S_i − S_j)} directly on a (b, b, n) tile with the
causal mask; columns after it are 0. S and its differences are float64 (no cancellation in long
cumulative sums); the exponentials and products are fp32. Channels are batched, CHANNEL_GROUP at a
time. Work for c channels: c · n · l² / 2 multiply-adds in matmuls plus c · n · l · (b + l / 2b)
elementwise products and about c · n · l · b exponentials (the direct form takes c · n · l² exponentials);
memory besides the (c, l, l) output (or (l, l) when averaged) is O(group · (n · l + n · b² + b · l)),
against the original notebook's O(n · l²) (reference §6, L16).

Shapes: delta (e, l) after softplus · A (e, n) negative · B, C (n, l) · u (e, l).

Mamba-2 (``ssd_hidden_attention``): A is one scalar per head and B, C are shared by the heads of a group,
so a head's map is the formula above with A[n] = A_h for every n,

    α_h[i, j] = (C_i · B_j) · exp(A_h · (S_i − S_j)) · Δ_j,   y_i = Σ_{j<=i} α_h[i, j] x_j + D_h x_i

for each of the head's headdim channels x: the matrix the SSD paper calls L ∘ C Bᵀ, scaled by Δ_j.
"""
from __future__ import annotations

import torch

CHANNEL_GROUP = 16      # channels computed together (bounds the working memory when averaging many)


def hidden_attention(delta, A, B, C, channels, block_rows: int = 32, average: bool = False) -> torch.Tensor:
    """α for the given channels: (len(channels), l, l), or their mean (l, l) if ``average``.

    Entries above the diagonal are 0 (causal). Computed in fp32 on delta's device.
    """
    length = delta.shape[-1]
    idx = torch.as_tensor(list(channels), device=delta.device, dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= delta.shape[0]:
        raise ValueError(f"channels must be non-empty indices in [0, {delta.shape[0]}), got {list(channels)[:8]}")
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: must be >= 1")
    out = torch.zeros(1 if average else len(idx), length, length, device=delta.device)
    for g0 in range(0, len(idx), CHANNEL_GROUP):
        group = idx[g0:g0 + CHANNEL_GROUP]
        for r0, r1, rows in _row_blocks(delta[group], A[group], B, C, block_rows):    # rows (g, r, r1)
            if average:
                out[0, r0:r1, :r1] += rows.sum(0) / len(idx)
            else:
                out[g0:g0 + len(group), r0:r1, :r1] = rows
    return out[0] if average else out


def ssd_hidden_attention(delta, A, B, C, heads, block_rows: int = 32, average: bool = False) -> torch.Tensor:
    """Mamba-2's α for the given heads: (len(heads), l, l), or their mean (l, l) if ``average``.
    delta (h, l) after softplus · A (h,) negative · B, C (g, n, l), heads h in group h // (h_total / g)."""
    nheads, groups = delta.shape[0], B.shape[0]
    idx = [int(h) for h in heads]
    if not idx or min(idx) < 0 or max(idx) >= nheads:
        raise ValueError(f"heads must be non-empty indices in [0, {nheads}), got {idx[:8]}")
    if nheads % groups:
        raise ValueError(f"{nheads} heads do not split into {groups} groups")
    per_group, n = nheads // groups, B.shape[1]
    out = torch.zeros(len(idx), delta.shape[-1], delta.shape[-1], device=delta.device)
    for g in range(groups):
        pos = [k for k, h in enumerate(idx) if h // per_group == g]
        if pos:
            hs = [idx[k] for k in pos]
            out[pos] = hidden_attention(delta[hs], A[hs, None].expand(len(hs), n), B[g], C[g],
                                        range(len(hs)), block_rows)
    return out.mean(0) if average else out


def recorded_hidden_attention(layer: dict, units, block_rows: int = 32, average: bool = False) -> torch.Tensor:
    """α of one recorded layer (custom_datasets/debug_params.py: delta, A, B, C) for the given units: Mamba-1
    channels, or Mamba-2 heads where the recording holds one A per head."""
    attention = ssd_hidden_attention if layer["A"].dim() == 1 else hidden_attention
    return attention(layer["delta"], layer["A"], layer["B"], layer["C"], units, block_rows, average)


def _row_blocks(delta, A, B, C, block_rows: int):
    """Yield (r0, r1, α[:, r0:r1, :r1]) for the channels whose Δ (g, l) and A (g, n) are given."""
    A, B, C = A.float(), B.float(), C.float()
    (g, length), b = delta.shape, block_rows
    S = torch.cumsum(delta.double(), -1)                                           # (g, l), float64
    right = delta.float()[:, None, :] * B                                          # (g, n, l): Δ_j B_j
    pos = torch.arange(length, device=delta.device)
    start, nxt = (pos // b) * b, ((pos // b + 1) * b).clamp_max(length - 1)        # own / next block start
    # i in block [r0, r1), j < c1 <= r0 in block [c1 - b, c1): S_i − S_j = (S_i − S_r0) + (S_r0 − S_c1) + (S_c1 − S_j)
    L = _decay(A[:, :, None], (S - S[:, start])[:, None]).mul_(C)                 # (g, n, l): C_i e^{A (S_i − S_r0)}
    R = _decay(A[:, :, None], (S[:, nxt] - S)[:, None]).mul_(right)               # (g, n, l): e^{A (S_c1 − S_j)} Δ_j B_j
    for r0 in range(0, length, b):
        r1 = min(r0 + b, length)
        rows = torch.empty(g, r1 - r0, r1, device=delta.device)
        if r0 > 0:                                                                 # columns j < r0: one matmul
            mid = _decay(A[:, :, None], S[:, None, r0:r0 + 1] - S[:, None, b:r0 + 1:b])        # (g, n, r0 / b)
            far = (R[:, :, :r0].view(g, -1, r0 // b, b) * mid[..., None]).view(g, -1, r0)
            rows[:, :, :r0] = torch.bmm(L[:, :, r0:r1].transpose(1, 2), far)
        # columns r0 <= j < r1: (g, r, r, n) tile of e^{A (S_i − S_j)}; above the diagonal: gap clamped to 0, masked
        gap = S[:, r0:r1, None, None] - S[:, None, r0:r1, None]                    # (g, r, r, 1)
        tile = _decay(A[:, None, None, :], gap).mul_(right[:, None, :, r0:r1].transpose(2, 3))
        rows[:, :, r0:] = (tile @ C[:, r0:r1].T[:, :, None]).squeeze(-1).tril()
        yield r0, r1, rows


def _decay(A: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """exp(A · gap) in fp32 for broadcastable A < 0 and float64 gaps (clamped at 0: rounding): in (0, 1]."""
    return (A * gap.clamp_min(0).float()).exp_()


def default_channels(d_inner: int, count: int = 11) -> list[int]:
    """Evenly spaced channels (the original averaged 0, 150, ..., 1500 of 1536: 11 channels)."""
    if count >= d_inner:
        return list(range(d_inner))
    return [round(i * (d_inner - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def log_normalized(att: torch.Tensor, threshold_exp: float = -3.0) -> torch.Tensor:
    """|α| divided by its maximum, as log10, clipped below at 10**threshold_exp (the original's plot scale)."""
    a = att.abs()
    a = a / a.max().clamp_min(1e-30)
    return torch.log10(a.clamp_min(10.0**threshold_exp))


def scan_from_attention(att: torch.Tensor, u: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """y = α u + D u per channel: att (c, l, l), u (c, l), D (c,) -> (c, l)."""
    return torch.einsum("cij,cj->ci", att, u.float()) + D.float()[:, None] * u.float()
