"""The mixers' causal depthwise convolution on the pure-PyTorch path (Mamba-1 and Mamba-2 alike)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, prev: int, length: int) -> torch.Tensor:
    """``conv(x)[..., prev:prev + length]`` for the mixers' depthwise ``conv`` (padding d_conv - 1):
    outputs at positions prev … prev + length - 1 of x (b, e, prev + length), each from itself and
    the d_conv - 1 positions before it (zeros before the start), before the SiLU.

    On CPU as d_conv shifted multiply-adds: PyTorch's CPU depthwise-convolution backward took 0.56 s a
    call at (8, 256, 512) on 2 cores, 18% of a small model's training step (torch 2.13, profiled), where
    these take milliseconds. Elsewhere the convolution itself (cuDNN)."""
    if x.device.type != "cpu":
        return conv(x)[..., prev:prev + length]
    k = conv.kernel_size[0]
    f = torch.promote_types(x.dtype, torch.float32)                    # bf16/fp16: sums in fp32, rounded once
    w = conv.weight.squeeze(1).to(f)                                   # (e, k)
    xl = F.pad(x, (k - 1, 0)).to(f)                                    # xl[i] = x[i - (k - 1)]
    out = xl[..., prev:prev + length] * w[:, 0, None]
    for j in range(1, k):
        out = torch.addcmul(out, xl[..., prev + j:prev + j + length], w[:, j, None])
    out = out if conv.bias is None else out + conv.bias.to(f)[:, None]
    return out.to(x.dtype)
