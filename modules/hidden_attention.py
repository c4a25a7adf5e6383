"""Mamba's implicit ("hidden") attention, computed from recorded SSM parameters.

Ali, Zimerman & Wolf, "The Hidden Attention of Mamba Models" (arXiv 2403.01590), as used by
DeciMamba (§3, Fig. 1) to show the limited effective receptive field past the training length.
Unrolling the selective scan of one channel c (ZOH for A, Euler for B, as the kernel):

    y_i = Σ_{j<=i} α[i, j] u_j + D u_i,
    α[i, j] = Σ_n C_i[n] · exp(A[n] · Σ_{k=j+1..i} Δ_k) · Δ_j · B_j[n]

The decay uses differences of one cumulative sum S of Δ (S_i − S_j >= 0 and A < 0), so every
exponential lies in (0, 1]: stable at any length. Rows are built in blocks, so memory is
O(n · block · l) instead of the original notebook's O(n · l²) (reference §6, L16).

Shapes: delta (e, l) after softplus · A (e, n) negative · B, C (n, l) · u (e, l).
"""
from __future__ import annotations

import torch


def hidden_attention(delta, A, B, C, channels, block_rows: int = 512, average: bool = False) -> torch.Tensor:
    """α for the given channels: (len(channels), l, l), or their mean (l, l) if ``average``.

    Entries above the diagonal are 0 (causal). Computed in fp32 on delta's device.
    """
    delta, A, B, C = (t.float() for t in (delta, A, B, C))
    length = delta.shape[-1]
    idx = torch.as_tensor(list(channels), device=delta.device, dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= delta.shape[0]:
        raise ValueError(f"channels must be non-empty indices in [0, {delta.shape[0]}), got {list(channels)[:8]}")
    out = torch.zeros(1 if average else len(idx), length, length, device=delta.device)
    causal = torch.ones(length, length, device=delta.device, dtype=torch.bool).tril()
    for k, c in enumerate(idx.tolist()):
        S = torch.cumsum(delta[c], 0)                                              # (l,)
        right = delta[c][None, :] * B                                              # (n, l): Δ_j B_j
        for r0 in range(0, length, block_rows):
            r1 = min(r0 + block_rows, length)
            gap = (S[r0:r1, None] - S[None, :]).clamp_min(0)                       # (r, l): Σ_{j<k<=i} Δ_k
            decay = torch.exp(A[c][:, None, None] * gap[None])                     # (n, r, l) in (0, 1]
            rows = torch.einsum("ni,nij,nj->ij", C[:, r0:r1], decay, right)        # (r, l)
            rows = rows * causal[r0:r1]
            if average:
                out[0, r0:r1] += rows / len(idx)
            else:
                out[k, r0:r1] = rows
    return out[0] if average else out


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
