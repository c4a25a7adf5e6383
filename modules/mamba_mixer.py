"""The Mamba-1 mixer with DeciMamba's Δ-based decimation between the selection and the scan.

Official implementation: state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py`` (v1.1.1) and
the DeciMamba patch of it (assafbk/DeciMamba ``mamba_ssm/modules/mamba_simple.py``).

Glossary (shapes in comments use these):
    b batch · l tokens at this layer's input · l' tokens kept by decimation (= l when none)
    d d_model · e d_inner = expand·d_model · n d_state · r dt_rank
    Δ = softplus(dt + dt_bias) (b, e, l) step size;  A = −exp(A_log) (e, n);  B, C (b, n, l);  D (e,)
    keep (b, l') kept positions, ascending; the protected tail of resp_len tokens is always in it.

Both paths (torch reference / CUDA kernels) follow the same numbered steps:
    1 in-projection · 2 causal conv + SiLU · 3a selection (dt, B, C) · 3b Δ for scoring ·
    3c decimation · 3d selective scan · 4 gate and out-projection
Decimation needs the post-conv activations gathered before the scan, so the fused
``mamba_inner_fn`` serves only calls in which this layer keeps every token (and never under
DECIMAMBA_SCAN=triton, where every scan is the Triton one, modules/selective_scan.py).

Falcon-Mamba (``b_c_dt_rms``): step 3a ends with weightless RMS norms (eps ``mixer_rms_eps``) of
B, C and the low-rank dt before dt_proj, as transformers' FalconMambaMixer. mamba-ssm's
``mamba_inner_fn`` has no such norms, so on the kernel path a Falcon layer runs the conv and the
scan as kernels with the norms in PyTorch between them (never the fused inner function). The
decimation score is ‖Δ‖₂ of the Δ the scan uses: softplus(dt_proj(rms(dt)) + dt_bias).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import kernels
from modules.conv import causal_conv
from modules.decimation import DecimationConfig, gather_tokens, kept_from_scores, kept_indices, token_scores
from modules.selective_scan import cuda_scan, selective_scan

SCORE_BLOCK = 1 << 16   # tokens per block when scoring by ‖Δ‖ (bounds the fp32 Δ held at once)


class MambaMixer(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, b_c_dt_rms=False, mixer_rms_eps=1e-6, layer_idx=None, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path   # allow mamba_inner_fn on layers that keep every token
        self.b_c_dt_rms, self.mixer_rms_eps = b_c_dt_rms, mixer_rms_eps   # Falcon-Mamba's B/C/dt norms
        self.layer_idx = layer_idx
        self.backend = "auto"                # "auto" | "torch" | "kernel", set by the model
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)
        # Initialisation as upstream: dt_proj keeps Δ in [dt_min, dt_max] at start (S4D-Lin A).
        std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init={dt_init!r} is not valid; choose 'random' or 'constant'")
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))   # inverse softplus
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))        # fp32 at creation: A spans 1..n, log keeps it stable
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

    # ------------------------------------------------------------------ full-sequence forward
    def forward(self, hidden, resp_len=0, decimation: DecimationConfig | None = None, cache=None, record=False):
        """hidden (b, l, d) -> (out (b, l', d), keep (b, l') or None, debug dict or None).

        cache: a LayerCache. Fresh (states None): filled with the conv state and the final SSM state
        (prefill). Holding states: the sequence continues from them (chunked prefill).
        """
        decimation = decimation or DecimationConfig()
        on_kernels = kernels.use_kernels(self.backend, hidden)
        if (on_kernels and self.use_fast_path and cache is None and not record and not self.b_c_dt_rms
                and not decimation.decimates(self.layer_idx)
                and cuda_scan(self.backend) != "triton"):        # routed to Triton: its scan, unfused
            return kernels.mamba_inner_fn(
                self._in_proj(hidden), self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, -torch.exp(self.A_log.float()),
                None, None, self.D.float(), delta_bias=self.dt_proj.bias.float(), delta_softplus=True), None, None
        x, dt, B, C, z = self.project(hidden, cache)                                        # steps 1-3a
        keep = delta = None
        if record:
            delta = self.delta(dt)                                                          # 3b: (b, e, l)
            keep = kept_indices(delta, resp_len, self.layer_idx, decimation)                # 3c: (b, l')
        elif decimation.decimates(self.layer_idx):                                          # 3b-3c, Δ by blocks
            keep = kept_from_scores(self.delta_scores(dt), resp_len, self.layer_idx, decimation)
        if keep is not None and keep.shape[1] < hidden.shape[1]:
            x, dt, z = (gather_tokens(t, keep, 2) for t in (x, dt, z))                      # (b, e, l')
            B, C = gather_tokens(B, keep, 2), gather_tokens(C, keep, 2)                     # (b, n, l')
            delta = None if delta is None else gather_tokens(delta, keep, 2)
        out = self.scan(x, dt, B, C, z, cache)                                              # steps 3d-4
        debug = None
        if record:
            debug = {"A": -torch.exp(self.A_log.float()).detach().cpu(), "B": B.detach().float().cpu(),
                     "C": C.detach().float().cpu(), "delta": delta.detach().cpu()}
        return out, keep, debug

    def _in_proj(self, hidden):
        # 1: (b, 2e, l). As upstream, W @ hᵀ gives a layout contiguous along l (for batch 1), so
        # the conv and scan kernels need no transposed copy of the largest activation.
        bsz, length, _ = hidden.shape
        xz = (self.in_proj.weight @ hidden.reshape(-1, self.d_model).t()).view(-1, bsz, length).transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        return xz

    def project(self, hidden, cache=None):
        """Steps 1-3a: hidden (b, l, d) -> x (b, e, l) after conv + SiLU, dt (b, e, l) before its
        bias, B and C (b, n, l), gate z (b, e, l). Updates cache.conv_state if a cache is given."""
        length = hidden.shape[1]
        x, z = self._in_proj(hidden).chunk(2, dim=1)                                        # (b, e, l) each
        x, prev = cache.extend_conv_input(x, self.d_conv) if cache is not None else (x, 0)
        if kernels.use_kernels(self.backend, hidden):                                       # 2: (b, e, l)
            x = kernels.causal_conv1d_fn(x.contiguous(), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                         activation="silu")[..., prev:]
        else:
            x = F.silu(causal_conv(x, self.conv1d, prev, length))
        x_dbl = self.x_proj(x.transpose(1, 2))                                              # 3a: (b, l, r + 2n)
        dt, B, C = self._select_norms(torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1))
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)                                 # (b, e, l), no bias yet
        return x, dt, B.transpose(1, 2), C.transpose(1, 2), z

    def _select_norms(self, dt_b_c):
        """Falcon-Mamba: x / sqrt(mean(x²) + eps) over the last axis of dt (rank r), B and C (n),
        in fp32, returned in the input dtype; the identity for Mamba."""
        if not self.b_c_dt_rms:
            return dt_b_c
        return tuple((t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + self.mixer_rms_eps)
                      ).to(t.dtype) for t in dt_b_c)

    def delta(self, dt):
        """3b: Δ = softplus(dt + dt_bias) in fp32, (b, e, l): the step size and the decimation score."""
        return F.softplus(dt.float() + self.dt_proj.bias.float()[:, None])

    def delta_scores(self, dt):
        """‖Δ‖₂ over channels per token, (b, l) fp32, one block of SCORE_BLOCK tokens at a time: the
        fp32 Δ of a whole 1M-token prompt would be 6 GB (d_inner 1536) for a (b, l) result."""
        return torch.cat([token_scores(self.delta(dt[:, :, s:s + SCORE_BLOCK]))
                          for s in range(0, dt.shape[2], SCORE_BLOCK)], dim=1)

    def scan(self, x, dt, B, C, z, cache=None):
        """Steps 3d-4: selective scan (continuing from cache.ssm_state if set) and out-projection."""
        init = None if cache is None else cache.ssm_state
        y = selective_scan(x, dt, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           return_last_state=cache is not None, initial_state=init,
                           backend=self.backend)                                            # 3d: (b, e, l')
        if cache is not None:
            y, cache.ssm_state = y
        return self.out_proj(y.transpose(1, 2))                                             # 4: (b, l', d)

    # ------------------------------------------------------------------ one recurrent step
    def step(self, hidden, cache):
        """hidden (b, 1, d) -> (b, 1, d); updates cache.conv_state and cache.ssm_state in place.

        Decoding never decimates: a generated token only reads the state the prompt left.
        """
        dtype = hidden.dtype
        x, z = self.in_proj(hidden.squeeze(1)).chunk(2, dim=-1)                             # 1: (b, e)
        conv_state = torch.roll(cache.conv_state, shifts=-1, dims=-1)                       # (b, e, d_conv)
        conv_state[:, :, -1] = x
        cache.conv_state = conv_state
        x = (conv_state * self.conv1d.weight.squeeze(1)).sum(-1)                            # 2: (b, e)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x).to(dtype)
        dt, B, C = self._select_norms(torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1))  # 3a
        dt = F.softplus((dt @ self.dt_proj.weight.t()).float() + self.dt_proj.bias.float())       # 3b: (b, e)
        A = -torch.exp(self.A_log.float())                                                  # (e, n)
        dA = torch.exp(dt[..., None] * A)                                                   # (b, e, n)
        dBx = (dt * x.float())[..., None] * B.float()[:, None, :]                           # 3d: (b, e, n)
        cache.ssm_state = cache.ssm_state * dA + dBx
        y = torch.einsum("ben,bn->be", cache.ssm_state, C.float()) + self.D.float() * x.float()
        y = (y * F.silu(z.float())).to(dtype)                                               # 4
        return self.out_proj(y).unsqueeze(1)
