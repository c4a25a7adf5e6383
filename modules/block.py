"""Pre-norm residual block ("add → norm → mixer") and RMSNorm, in plain PyTorch.

Official implementation: state-spaces/mamba ``mamba_ssm/modules/block.py`` and
``mamba_ssm/ops/triton/layer_norm.py`` (Triton there; the fused add+norm is mathematically the
same as the explicit add used here, which is what DeciMamba's deci model forces anyway).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import kernels


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in fp32, returned in x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def make_norm(d_model: int, rms_norm: bool, eps: float = 1e-5, device=None, dtype=None) -> nn.Module:
    if rms_norm:
        return RMSNorm(d_model, eps=eps, device=device, dtype=dtype)
    return nn.LayerNorm(d_model, eps=eps, device=device, dtype=dtype)


def norm_fp32(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a norm to x cast to the norm's weight dtype (the original's convention)."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x.to(norm.weight.dtype), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return norm(x.to(norm.weight.dtype))


def add_norm(norm: nn.Module, hidden, residual, residual_in_fp32: bool, backend: str, prenorm: bool = True):
    """residual ← hidden + residual; out ← norm(residual). Returns (out, residual) if prenorm else out.

    On CUDA with mamba-ssm importable, one fused Triton kernel does both (as upstream's
    fused_add_norm); elsewhere plain PyTorch. Same math either way.
    """
    if kernels.layer_norm_fn is not None and kernels.use_kernels(backend, hidden):
        return kernels.layer_norm_fn(hidden, norm.weight, getattr(norm, "bias", None), residual=residual,
                                     eps=norm.eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                                     is_rms_norm=isinstance(norm, RMSNorm))
    residual = hidden if residual is None else hidden + residual
    out = norm_fp32(norm, residual)
    if residual_in_fp32:
        residual = residual.float()
    return (out, residual) if prenorm else out


class Block(nn.Module):
    """residual ← hidden + residual;  hidden ← mixer(norm(residual)).

    Returns (mixer output, residual, kept indices or None, debug dict or None). The caller
    subsamples the residual at the kept indices so it lines up with the shortened output.
    """

    def __init__(self, d_model: int, mixer: nn.Module, rms_norm: bool, residual_in_fp32: bool,
                 device=None, dtype=None, norm_eps: float = 1e-5):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.mixer = mixer
        self.norm = make_norm(d_model, rms_norm, eps=norm_eps, device=device, dtype=dtype)

    def forward(self, hidden, residual, **mixer_kwargs):
        hidden, residual = add_norm(self.norm, hidden, residual, self.residual_in_fp32, self.mixer.backend)
        out, keep, debug = self.mixer(hidden, **mixer_kwargs)
        return out, residual, keep, debug

    def step(self, hidden, residual, cache):
        hidden, residual = add_norm(self.norm, hidden, residual, self.residual_in_fp32, self.mixer.backend)
        return self.mixer.step(hidden, cache), residual
