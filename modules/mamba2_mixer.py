"""The Mamba-2 mixer with DeciMamba's Δ-based decimation between the selection and the SSD scan.

Official implementation: state-spaces/mamba ``mamba_ssm/modules/mamba2.py`` (mamba-ssm 2.3.2).
Parameter names and shapes equal it (in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj),
so ``ssm_cfg.layer: "Mamba2"`` checkpoints load as they are; transformers' Mamba2ForCausalLM uses
the same mixer names (see models/hf_mamba2.py for its config).

Glossary (shapes in comments use these):
    b batch · l tokens at this layer's input · l' tokens kept by decimation (= l when none)
    d d_model · e d_inner = expand·d_model · h heads = e / headdim · p headdim · g ngroups · n d_state
    in_proj output, in order: z (e) · xBC (e + 2gn, through the conv) · dt (h)
    Δ = softplus(dt + dt_bias) (b, l, h), clamped to dt_limit;  A = −exp(A_log) (h,);  D (h,) or (e,)
    keep (b, l') kept positions, ascending; the protected tail of resp_len tokens is always in it.

Steps (same numbering as modules/mamba_mixer.py):
    1 in-projection · 2 causal conv + SiLU on xBC · 3a split x, B, C · 3b Δ for scoring ·
    3c decimation · 3d SSD scan · 4 gated RMSNorm (or SiLU gate) and out-projection
Decimation (docs/MAMBA2.md): a token's score is ‖Δ‖₂ over heads; the kept set, k and the tail
rule are those of Mamba-1 (modules/decimation.py). The fused ``mamba_split_conv1d_scan_combined``
serves only calls in which this layer keeps every token and no cache or record is asked for.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import kernels
from modules.conv import causal_conv
from modules.decimation import DecimationConfig, gather_tokens, kept_from_scores, token_scores
from modules.ssd import INT32_MAX, conv_input, ssd_scan, ssd_step, step_size

NORM_EPS = 1e-5   # mamba-ssm's Mamba2 gated RMSNorm eps (and transformers' layer_norm_epsilon default)


class GatedRMSNorm(nn.Module):
    """mamba-ssm's RMSNormGated: RMSNorm over groups of e / g channels, gated by SiLU(z) before
    (norm_before_gate False, the Mamba-2 default) or after the norm. fp32 inside, x's dtype out."""

    def __init__(self, hidden_size, group_size, norm_before_gate=False, eps=NORM_EPS, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x, z=None):
        dtype = x.dtype
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        groups = xf.view(*xf.shape[:-1], -1, self.group_size)
        out = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(xf.shape)
        out = out * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)


class Mamba2Mixer(nn.Module):
    token_dim = 1   # token axis of what project() returns (Mamba-1: 2); read by models/streaming.py

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None,
                 ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, math.inf), bias=False,
                 conv_bias=True, chunk_size=256, use_mem_eff_path=True, layer_idx=None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        if d_ssm is not None and d_ssm != self.d_inner:
            raise ValueError(f"d_ssm={d_ssm} (a gated MLP beside the SSM) is not supported; leave it unset")
        if self.d_inner % headdim or (self.d_inner // headdim) % ngroups:
            raise ValueError(f"d_inner={self.d_inner} must be heads × headdim={headdim} with heads a multiple "
                             f"of ngroups={ngroups}")
        self.headdim, self.ngroups = headdim, ngroups
        self.nheads = self.d_inner // headdim
        self.D_has_hdim, self.rmsnorm = D_has_hdim, rmsnorm
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.chunk_size, self.use_mem_eff_path = chunk_size, use_mem_eff_path
        self.layer_idx = layer_idx
        self.backend = "auto"                # "auto" | "torch" | "kernel", set by the model
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        # Initialisation as upstream: Δ in [dt_min, dt_max] at start, A uniform in A_init_range.
        dt = torch.exp(torch.rand(self.nheads, device=device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(dtype))   # inverse softplus
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = GatedRMSNorm(self.d_inner, self.d_inner // ngroups, norm_before_gate, **fk)
        self.norm_before_gate = norm_before_gate
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)

    def _A(self):
        return -torch.exp(self.A_log.float())                                              # (h,)

    def _D(self):
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D      # (h, p) or (h,)

    # ------------------------------------------------------------------ full-sequence forward
    def forward(self, hidden, resp_len=0, decimation: DecimationConfig | None = None, cache=None, record=False):
        """hidden (b, l, d) -> (out (b, l', d), keep (b, l') or None, debug dict or None).

        cache: a LayerCache. Fresh (states None): filled with the conv state and the final SSM state
        (prefill). Holding states: the sequence continues from them (chunked prefill).
        """
        decimation = decimation or DecimationConfig()
        decimates = decimation.decimates(self.layer_idx)
        if (self.use_mem_eff_path and cache is None and not record and not decimates
                and self.conv_dim % 8 == 0 and hidden.shape[1] > 1       # the fused kernel's layout rules
                and kernels.has_conv_kernel() and kernels.use_ssd_kernels(self.backend, hidden)
                and hidden.shape[0] * hidden.shape[1] * self.in_proj.out_features <= INT32_MAX):
            return self._fused(hidden), None, None      # (longer: int32 offsets; the segmented path below)
        x, dt, B, C, z = self.project(hidden, cache)                                        # steps 1-3a
        keep = None
        if decimates:                                                                       # 3b-3c
            keep = kept_from_scores(self.delta_scores(dt), resp_len, self.layer_idx, decimation)
        if keep is not None and keep.shape[1] < hidden.shape[1]:
            x, dt, B, C, z = (gather_tokens(t, keep, 1) for t in (x, dt, B, C, z))           # (b, l', ...)
        out = self.scan(x, dt, B, C, z, cache)                                              # steps 3d-4
        debug = None
        if record:   # channels before tokens, as Mamba-1's: A (h,), B, C (b, g, n, l'), Δ (b, h, l')
            delta = step_size(dt, self.dt_bias, True, self.dt_limit)
            debug = {"A": self._A().detach().cpu(), "B": B.detach().float().permute(0, 2, 3, 1).cpu(),
                     "C": C.detach().float().permute(0, 2, 3, 1).cpu(), "delta": delta.detach().transpose(1, 2).cpu()}
        return out, keep, debug

    def _fused(self, hidden):
        """mamba-ssm's own fast path (conv, scan, gated norm and out-projection in one kernel)."""
        limit = {} if self.dt_limit == (0.0, math.inf) else {"dt_limit": self.dt_limit}
        return kernels.mamba_split_conv1d_scan_combined(
            self.in_proj(hidden), self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, self._A(),
            D=self._D(), chunk_size=self.chunk_size, activation="silu",
            rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
            rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6, outproj_weight=self.out_proj.weight,
            outproj_bias=self.out_proj.bias, headdim=None if self.D_has_hdim else self.headdim,
            ngroups=self.ngroups, norm_before_gate=self.norm_before_gate, **limit)

    def project(self, hidden, cache=None):
        """Steps 1-3a: hidden (b, l, d) -> x (b, l, h, p) after conv + SiLU, dt (b, l, h) before its
        bias, B and C (b, l, g, n), gate z (b, l, e). Updates cache.conv_state if a cache is given."""
        bsz, length, _ = hidden.shape
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.conv_dim, self.nheads], dim=-1)  # 1
        xBC = xBC.transpose(1, 2)                                                           # (b, e + 2gn, l)
        xBC, prev = cache.extend_conv_input(xBC, self.d_conv) if cache is not None else (xBC, 0)
        use_conv = kernels.has_conv_kernel() and kernels.use_ssd_kernels(self.backend, hidden)
        xk = conv_input(xBC) if use_conv else None
        if xk is not None:                                                                  # 2
            xBC = kernels.causal_conv1d_fn(xk, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                           activation="silu")[..., prev:]
        else:
            xBC = F.silu(causal_conv(xBC, self.conv1d, prev, length))
        x, B, C = torch.split(xBC.transpose(1, 2), [self.d_inner, self.ngroups * self.d_state,
                                                    self.ngroups * self.d_state], dim=-1)   # 3a
        return (x.reshape(bsz, length, self.nheads, self.headdim), dt,
                B.reshape(bsz, length, self.ngroups, self.d_state),
                C.reshape(bsz, length, self.ngroups, self.d_state), z)

    def delta_scores(self, dt):
        """3b: the decimation score ‖Δ‖₂ over heads per token, (b, l) fp32 (Δ as the scan uses it)."""
        return token_scores(step_size(dt, self.dt_bias, True, self.dt_limit).transpose(1, 2))

    def scan(self, x, dt, B, C, z, cache=None):
        """Steps 3d-4: SSD scan (continuing from cache.ssm_state if set), gate, out-projection."""
        bsz, length = x.shape[:2]
        init = None if cache is None else cache.ssm_state
        gate = None if self.rmsnorm else z.reshape(bsz, length, self.nheads, self.headdim)
        y = ssd_scan(x, dt, self._A(), B, C, self.chunk_size, D=self._D(), z=gate, dt_bias=self.dt_bias,
                     initial_states=init, dt_softplus=True, dt_limit=self.dt_limit,
                     return_final_states=cache is not None, backend=self.backend)           # 3d: (b, l', h, p)
        if cache is not None:
            y, cache.ssm_state = y
        y = y.reshape(bsz, length, self.d_inner)
        if self.rmsnorm:
            y = self.norm(y, z)                                                             # 4
        return self.out_proj(y)                                                             # (b, l', d)

    # ------------------------------------------------------------------ one recurrent step
    def step(self, hidden, cache):
        """hidden (b, 1, d) -> (b, 1, d); updates cache.conv_state and cache.ssm_state in place.

        Decoding never decimates: a generated token only reads the state the prompt left.
        """
        dtype, bsz = hidden.dtype, hidden.shape[0]
        z, xBC, dt = torch.split(self.in_proj(hidden.squeeze(1)), [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_state = torch.roll(cache.conv_state, shifts=-1, dims=-1)                       # (b, e + 2gn, d_conv)
        conv_state[:, :, -1] = xBC
        cache.conv_state = conv_state
        xBC = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)                          # 2
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC).to(dtype)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = ssd_step(cache.ssm_state, x.view(bsz, self.nheads, self.headdim), dt, self._A(),
                     B.view(bsz, self.ngroups, self.d_state), C.view(bsz, self.ngroups, self.d_state),
                     self._D(), self.dt_bias, True, self.dt_limit).reshape(bsz, self.d_inner)   # 3d
        if self.rmsnorm:
            y = self.norm(y.to(dtype), z)                                                   # 4
        else:
            y = (y * F.silu(z.float())).to(dtype)
        return self.out_proj(y).unsqueeze(1)
