"""Backward of the Mamba-1 selective scan in Triton, so that training on a GPU needs no compiled
mamba-ssm (GPU; CPU through Triton's interpreter for tests).

The core scan of ``modules.selective_scan._ScanFn``, with Δ already through bias and softplus:

    h_t = a_t ⊙ h_{t-1} + Δ_t u_t B_t,   a_t = exp(Δ_t A),   y_t = <C_t, h_t>

Forward: ``modules.triton_scan.selective_scan_fwd`` (y and the last state). Backward, two launches
per slice of channels, one program per (batch row, BLOCK_D channels), every state of a channel in
the program's registers:
  1. the states again, from the initial state, written to a scratch tensor (b, l, d, n) in fp32;
  2. the reverse scan of the adjoint G_t = dL/dh_t = C_t gy_t + a_{t+1} G_{t+1}, from dL/dh_last, and
     gu_t = Δ_t Σ_n G_t B_t,  gΔ_t = u_t Σ_n G_t B_t + Σ_n A G_t a_t h_{t-1},  gA = Σ_t Δ_t G_t a_t h_{t-1},
     gB_t = Σ_d G_t Δ_t u_t,  gC_t = Σ_d gy_t h_t,  dL/dh_0 = a_0 G_0 (the formulas of _ScanFn.backward).
B, C are shared by all channels: each program writes its partial sums over its channels, (b, blocks,
n, l), and torch adds them. The scratch is bounded (SCRATCH_BYTES) by taking the channels in slices.
All arithmetic fp32; inputs of any strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 32                 # channels per one-warp program (a tile of BLOCK_D × n states), at most; fewer
                             # when batch × blocks would leave SM sub-partitions idle (_block_d)
SCRATCH_BYTES = 1 << 31      # at most 2 GiB of saved states per launch pair: channels are taken in slices


@triton.jit
def _states_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, h0_ptr, hs_ptr, DIM, L,
                   s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl, s_hb, s_hd, s_hn,
                   N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr):
    """hs[b, t, d, :] = h_t for every token (fp32, (b, l, DIM, NP) contiguous)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)   # d · l may pass 2^31
    offs_n = tl.arange(0, NP)
    md, mn = offs_d < DIM, offs_n < N
    m2 = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    if HAS_H0:      # fp32 as the loop's state (a bf16 initial value would not compile as a loop-carried fp32)
        h = tl.load(h0_ptr + pid_b * s_hb + offs_d[:, None] * s_hd + offs_n[None, :] * s_hn, mask=m2,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    tile = offs_d[:, None] * NP + offs_n[None, :]
    for t in range(L):
        tt = t + pid_b * 0                                                     # int64 offsets
        u = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + tt * s_ul, mask=md, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td + tt * s_tl, mask=md, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + pid_b * s_bb + offs_n * s_bn + tt * s_bl, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * bt[None, :]
        tl.store(hs_ptr + (pid_b * L + tt) * DIM * NP + tile, h, mask=m2)


@triton.jit
def _reverse_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, hs_ptr, gy_ptr, gl_ptr,
                    gu_ptr, gdt_ptr, ga_ptr, gb_ptr, gc_ptr, gh0_ptr, DIM, L, NBLK, s_ob, s_sb,
                    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
                    s_hb, s_hd, s_hn, s_gb, s_gd, s_gl, s_lb, s_ld, s_ln,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr,
                    HAS_GLAST: tl.constexpr):
    """The adjoint scan from the last token to the first; gradients as in the module docstring.
    Outputs: gu, gdt (b, DIM, l) with batch stride s_ob, contiguous below it (a slice of channels of the
    whole gradient); ga, gh0 (b, DIM, N) likewise with s_sb (ga per batch row); gb, gc (b, NBLK, N, l)
    partial sums over this program's channels."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)               # d · l may pass 2^31
    offs_n = tl.arange(0, NP)
    md, mn = offs_d < DIM, offs_n < N
    m2 = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    if HAS_GLAST:   # fp32 as the loop's adjoint
        g = tl.load(gl_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_n[None, :] * s_ln, mask=m2,
                    other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(h0_ptr + pid_b * s_hb + offs_d[:, None] * s_hd + offs_n[None, :] * s_hn, mask=m2,
                     other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    tile = offs_d[:, None] * NP + offs_n[None, :]
    ga = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    part = (pid_b * NBLK + pid_d) * N * L                                      # this program's gb, gc rows
    h = tl.load(hs_ptr + (pid_b * L + L - 1) * DIM * NP + tile, mask=m2, other=0.0)   # h_{l-1}
    for i in range(L):
        t = L - 1 - i + pid_b * 0                                              # int64 offsets
        u = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + t * s_ul, mask=md, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td + t * s_tl, mask=md, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + pid_b * s_gb + offs_d * s_gd + t * s_gl, mask=md, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + pid_b * s_bb + offs_n * s_bn + t * s_bl, mask=mn, other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + pid_b * s_cb + offs_n * s_cn + t * s_cl, mask=mn, other=0.0).to(tl.float32)
        h_prev = tl.load(hs_ptr + (pid_b * L + tl.maximum(t - 1, 0)) * DIM * NP + tile, mask=m2, other=0.0)
        h_prev = tl.where(t > 0, h_prev, h0)                                   # h_{t-1}; h_0 before the first
        a = tl.exp(dt[:, None] * A)
        g = g + gy[:, None] * ct[None, :]                                      # G_t
        tl.store(gc_ptr + part + offs_n * L + t, tl.sum(gy[:, None] * h, axis=0), mask=mn)
        tl.store(gb_ptr + part + offs_n * L + t, tl.sum(g * (dt * u)[:, None], axis=0), mask=mn)
        gbt = tl.sum(g * bt[None, :], axis=1)                                  # Σ_n G_t B_t
        g_log_a = g * a * h_prev                                               # dL/d(Δ_t A)
        row = pid_b * s_ob + offs_d * L + t
        tl.store(gu_ptr + row, gbt * dt, mask=md)
        tl.store(gdt_ptr + row, gbt * u + tl.sum(g_log_a * A, axis=1), mask=md)
        ga += g_log_a * dt[:, None]
        g = a * g                                                              # a_t G_t: carried to t - 1
        h = h_prev
    state = pid_b * s_sb + offs_d[:, None] * N + offs_n[None, :]
    tl.store(ga_ptr + state, ga, mask=m2)
    tl.store(gh0_ptr + state, g, mask=m2)


def _block_d(bsz: int, dim: int, device) -> int:
    """Channels per program: a program walks l sequentially, so while batch × blocks do not give every SM
    sub-partition a warp, smaller tiles (shorter steps: 473 / 266 instructions a step at 16 / 8 channels
    against 741 at 32, sm_90 compiled code) and more programs; 32 once the GPU is full (least work per channel)."""
    if device.type != "cuda":
        return BLOCK_D
    quads = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    for bd in (BLOCK_D, 16):
        if bsz * triton.cdiv(dim, bd) >= quads:
            return bd
    return 8


def scan_backward(u, delta, A, B, C, h0, gy, glast, *, block_d=None, scratch_bytes=SCRATCH_BYTES):
    """Gradients of (y, h_last) = scan(u, Δ, A, B, C, h0) for the upstream gy (b, d, l) and glast
    (b, d, n) or None. u, delta, gy: (b, d, l); A: (d, n) real; B, C: (b, n, l); h0: (b, d, n) or None.
    Returns gu, gdelta (b, d, l), gA (d, n), gB, gC (b, n, l), gh0 (b, d, n) or None, all fp32. A slice
    holds at least one block of channels, so scratch_bytes bounds the scratch only above that."""
    bsz, dim, length = u.shape
    block_d = block_d or _block_d(bsz, dim, u.device)
    n = A.shape[1]
    dev, f = u.device, torch.float32
    np_ = max(2, triton.next_power_of_2(n))
    A = A.to(f)
    gu = torch.empty(bsz, dim, length, device=dev, dtype=f)
    gdelta = torch.empty_like(gu)
    ga_rows = torch.empty(bsz, dim, n, device=dev, dtype=f)         # gA per batch row, summed at the end
    gB = torch.zeros(bsz, n, length, device=dev, dtype=f)
    gC = torch.zeros_like(gB)
    gh0 = torch.empty(bsz, dim, n, device=dev, dtype=f)
    if length == 0:                 # nothing scanned: dL/dh0 = dL/dh_last
        gh0.copy_(glast if glast is not None else torch.zeros_like(gh0))
        return gu, gdelta, torch.zeros_like(A), gB, gC, (gh0 if h0 is not None else None)
    per_channel = bsz * length * np_ * 4
    step = max(block_d, scratch_bytes // per_channel // block_d * block_d)
    for s in range(0, dim, step):
        sl = slice(s, min(s + step, dim))
        d = sl.stop - sl.start
        nblk = triton.cdiv(d, block_d)
        hs = torch.empty(bsz, length, d, np_, device=dev, dtype=f)
        gb_s = torch.empty(bsz, nblk, n, length, device=dev, dtype=f)
        gc_s = torch.empty_like(gb_s)
        us, ds, As, gys = u[:, sl], delta[:, sl], A[sl], gy[:, sl]
        h0s = h0[:, sl] if h0 is not None else None
        gls = glast[:, sl] if glast is not None else None
        hst = h0s.stride() if h0s is not None else (0, 0, 0)
        lst = gls.stride() if gls is not None else (0, 0, 0)
        grid = (bsz, nblk)
        flags = dict(N=n, NP=np_, BLOCK_D=block_d, HAS_H0=h0s is not None, num_warps=max(1, block_d // 32))
        _states_kernel[grid](us, ds, As, B, h0s if h0s is not None else hs, hs, d, length, *us.stride(), *ds.stride(),
                             *As.stride(), *B.stride(), *hst, **flags)
        _reverse_kernel[grid](us, ds, As, B, C, h0s if h0s is not None else hs, hs, gys, gls if gls is not None else hs,
                              gu[:, sl], gdelta[:, sl], ga_rows[:, sl], gb_s, gc_s, gh0[:, sl], d, length, nblk,
                              dim * length, dim * n, *us.stride(), *ds.stride(),
                              *As.stride(), *B.stride(), *C.stride(), *hst, *gys.stride(), *lst,
                              HAS_GLAST=gls is not None, **flags)
        gB += gb_s.sum(1)
        gC += gc_s.sum(1)
        del hs
    return gu, gdelta, ga_rows.sum(0), gB, gC, (gh0 if h0 is not None else None)


class TritonScanFn(torch.autograd.Function):
    """(y, h_last) of the core scan (the contract of modules.selective_scan._ScanFn), fp32 inputs:
    the Triton forward, and the backward above."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        from modules.triton_scan import selective_scan_fwd
        y, last = selective_scan_fwd(u, delta, A, B, C, None, None, None, False, True, h0)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C, h0 = ctx.saved_tensors      # autograd passes zeros for an unused output, not None
        return scan_backward(u, delta, A, B, C, h0, gy, glast)
