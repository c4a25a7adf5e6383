"""Backward of the Mamba-1 selective scan in Triton, so that training on a GPU needs no compiled
mamba-ssm (GPU; CPU through Triton's interpreter for tests).

The core scan of ``modules.selective_scan._ScanFn``, with Δ already through bias and softplus:

    h_t = a_t ⊙ h_{t-1} + Δ_t u_t B_t,   a_t = exp(Δ_t A),   y_t = <C_t, h_t>

Forward: ``modules.triton_scan.selective_scan_fwd`` (y and the last state). Backward: one program per
(batch row, BLOCK_D channels, chunk of tokens), every state of a channel in the program's registers.
A program walks its chunk sequentially, so the sequence is cut into chunks when batch × channel
blocks alone would leave the GPU's warp slots idle (training shapes: 32 × 2K tokens × 448 channels
give 896 one-warp programs of 16 channels for 132 SMs: 3 chunks of 688 tokens); on one chunk passes 1, 2, 4 and 5 are skipped:
  1. each chunk's final state from a zero state, and its Σ Δ;
  2. the carry over chunk boundaries (``modules.triton_scan._carry_kernel``): st[c] becomes the true
     state after chunk c, h_{c+1} = exp(A ΣΔ_c) ⊙ h_c + st[c], from the initial state;
  3. the states of every token again, each chunk from its true start, written to a scratch tensor
     (b, l, d, n) in fp32 (bounded by SCRATCH_BYTES: the channels are taken in slices);
  4. each chunk's adjoint from a zero adjoint at its end (below), and its Σ Δ; the same carry kernel,
     run over the chunks in reverse, turns them into the true adjoint entering each chunk's end,
     G_end(c) = exp(A ΣΔ_{c+1}) ⊙ G_end(c+1) + local(c+1), from dL/dh_last;
  5. the reverse scan of the adjoint G_t = dL/dh_t = C_t gy_t + a_{t+1} G_{t+1} in every chunk, and
     gu_t = Δ_t Σ_n G_t B_t,  gΔ_t = u_t Σ_n G_t B_t + Σ_n A G_t a_t h_{t-1},  gA = Σ_t Δ_t G_t a_t h_{t-1},
     gB_t = Σ_d G_t Δ_t u_t,  gC_t = Σ_d gy_t h_t,  dL/dh_0 = a_0 G_0 (the formulas of _ScanFn.backward).
B, C are shared by all channels: each program writes its partial sums over its channels, (b, blocks,
n, l), and torch adds them; gA likewise per (batch row, chunk). All arithmetic fp32; inputs of any strides.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from modules import triton_scan
from modules.triton_scan import _carry_kernel

BLOCK_D = 32                 # channels per one-warp program (a tile of BLOCK_D × n states), at most; fewer
                             # when batch × blocks would leave SM sub-partitions idle (_block_d)
SCRATCH_BYTES = 1 << 31      # at most 2 GiB of saved states per launch pair: channels are taken in slices
WARPS_PER_QUAD = 4           # one-warp programs per SM sub-partition wanted before the sequence is left whole: at
                             # our LM's training shape an H200 gets 16-channel programs (_block_d), whose pass 5 holds
                             # 106 registers per thread (benchmarks/results/triton_resources_sm90.md): 19 fit an SM,
                             # 16 are asked for. A choice from the compiled code; timed on the H200 at 2K tokens
                             # (benchmarks/results/scan_bwd_h200.md) the 3 chunks it plans there were 0.92-0.93x
                             # one chunk's speed: kept until shapes with fewer programs are timed
MIN_CHUNK = 64               # tokens per chunk, at least (each chunk adds a carry step and passes 1 and 4 walk
                             # every token once more)


@triton.jit
def _chunk_start(h0_ptr, st_ptr, pid_b, pid_c, NC, s_xc, offs_d, offs_n, m2, s_hb, s_hd, s_hn,
                 N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr):
    """(BLOCK_D, NP) state before chunk pid_c: st[b, c - 1] (pass 2's state after chunk c - 1; st is
    (b, chunks, ·, n) with chunk stride s_xc), else the initial state, else 0."""
    if pid_c > 0:
        h = tl.load(st_ptr + (pid_b * NC + pid_c - 1) * s_xc + offs_d[:, None] * N + offs_n[None, :], mask=m2,
                    other=0.0)
    elif HAS_H0:    # fp32 as the loop's state (a bf16 initial value would not compile as a loop-carried fp32)
        h = tl.load(h0_ptr + pid_b * s_hb + offs_d[:, None] * s_hd + offs_n[None, :] * s_hn, mask=m2,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    return h


@triton.jit
def _states_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, h0_ptr, st_ptr, sdt_ptr, hs_ptr, DIM, L, CHUNK, NC, s_xc,
                   s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl, s_hb, s_hd, s_hn,
                   N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr,
                   LOCAL: tl.constexpr):
    """LOCAL (pass 1): chunk pid_c from a zero state; its final state to st[b, c], Σ Δ to sdt[b, c]
    (st: (b, NC, DIM, n), sdt: (b, NC, DIM)). Else (pass 3): chunk pid_c from its true start state,
    hs[b, t] = h_t for each of its tokens (fp32, (b, l, DIM, NP) contiguous)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(2)
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)   # d · l may pass 2^31
    offs_n = tl.arange(0, NP)
    md, mn = offs_d < DIM, offs_n < N
    m2 = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    if LOCAL:
        h = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    else:
        h = _chunk_start(h0_ptr, st_ptr, pid_b, pid_c, NC, s_xc, offs_d, offs_n, m2, s_hb, s_hd, s_hn,
                         N, NP, BLOCK_D, HAS_H0)
    sum_dt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    tile = offs_d[:, None] * NP + offs_n[None, :]
    t0 = pid_c * CHUNK
    for t in range(t0, tl.minimum(t0 + CHUNK, L)):
        tt = t + pid_b * 0                                                     # int64 offsets
        u = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + tt * s_ul, mask=md, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td + tt * s_tl, mask=md, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + pid_b * s_bb + offs_n * s_bn + tt * s_bl, mask=mn, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * u)[:, None] * bt[None, :]
        if LOCAL:
            sum_dt += dt
        else:
            tl.store(hs_ptr + (pid_b * L + tt) * DIM * NP + tile, h, mask=m2)
    if LOCAL:
        slot = pid_b * NC + pid_c
        tl.store(st_ptr + slot * s_xc + offs_d[:, None] * N + offs_n[None, :], h, mask=m2)
        tl.store(sdt_ptr + slot * DIM + offs_d, sum_dt, mask=md)


@triton.jit
def _adjoint_kernel(dt_ptr, a_ptr, c_ptr, gy_ptr, adj_ptr, sdt_ptr, DIM, L, CHUNK, NC,
                    s_tb, s_td, s_tl, s_ad, s_an, s_cb, s_cn, s_cl, s_gb, s_gd, s_gl,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 4, chunk c = pid_c + 1 (chunks 1 … NC - 1): the adjoint it passes to the token before it,
    from a zero adjoint after its end (Σ_t∈c (Π_{s∈c, s<=t} a_s) C_t gy_t), to adj[b, NC - 1 - c], and its
    Σ Δ to sdt[b, NC - 1 - c]: the chunks in reverse order, as the carry kernel then walks them."""
    pid_b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(2) + 1
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    offs_n = tl.arange(0, NP)
    md, mn = offs_d < DIM, offs_n < N
    m2 = md[:, None] & mn[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    g = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    sum_dt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t0 = c * CHUNK
    t1 = tl.minimum(t0 + CHUNK, L)
    for i in range(t1 - t0):
        t = t1 - 1 - i + pid_b * 0                                             # int64 offsets
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td + t * s_tl, mask=md, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + pid_b * s_gb + offs_d * s_gd + t * s_gl, mask=md, other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + pid_b * s_cb + offs_n * s_cn + t * s_cl, mask=mn, other=0.0).to(tl.float32)
        g = tl.exp(dt[:, None] * A) * (g + gy[:, None] * ct[None, :])          # a_t G_t
        sum_dt += dt
    slot = pid_b * NC + NC - 1 - c
    tl.store(adj_ptr + slot * DIM * N + offs_d[:, None] * N + offs_n[None, :], g, mask=m2)
    tl.store(sdt_ptr + slot * DIM + offs_d, sum_dt, mask=md)


@triton.jit
def _reverse_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, h0_ptr, st_ptr, adj_ptr, hs_ptr, gy_ptr, gl_ptr,
                    gu_ptr, gdt_ptr, ga_ptr, gb_ptr, gc_ptr, gh0_ptr, DIM, L, CHUNK, NC, NBLK, s_xc, s_ob, s_sb,
                    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an, s_bb, s_bn, s_bl, s_cb, s_cn, s_cl,
                    s_hb, s_hd, s_hn, s_gb, s_gd, s_gl, s_lb, s_ld, s_ln,
                    N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr,
                    HAS_GLAST: tl.constexpr):
    """Pass 5 in chunk pid_c, from the last token to the first; gradients as in the module docstring.
    The adjoint after the chunk's end: dL/dh_last (or 0) for the last chunk, else pass 4's adj[b, NC - 2 - c].
    Outputs: gu, gdt (b, DIM, l) with batch stride s_ob, contiguous below it (a slice of channels of the
    whole gradient); ga (b, NC, ·, N) with chunk stride s_xc, per batch row and chunk; gh0 (b, ·, N)
    with batch stride s_sb, from chunk 0; gb, gc (b, NBLK, N, l) partial sums over the program's channels."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)               # d · l may pass 2^31
    offs_n = tl.arange(0, NP)
    md, mn = offs_d < DIM, offs_n < N
    m2 = md[:, None] & mn[None, :]
    state = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(a_ptr + offs_d[:, None] * s_ad + offs_n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    if pid_c < NC - 1:
        g = tl.load(adj_ptr + (pid_b * NC + NC - 2 - pid_c) * s_xc + state, mask=m2, other=0.0)
    elif HAS_GLAST:  # fp32 as the loop's adjoint
        g = tl.load(gl_ptr + pid_b * s_lb + offs_d[:, None] * s_ld + offs_n[None, :] * s_ln, mask=m2,
                    other=0.0).to(tl.float32)
    else:
        g = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    start = _chunk_start(h0_ptr, st_ptr, pid_b, pid_c, NC, s_xc, offs_d, offs_n, m2, s_hb, s_hd, s_hn,
                         N, NP, BLOCK_D, HAS_H0)
    tile = offs_d[:, None] * NP + offs_n[None, :]
    ga = tl.zeros((BLOCK_D, NP), dtype=tl.float32)
    part = (pid_b * NBLK + pid_d) * N * L                                      # this program's gb, gc rows
    t0 = pid_c * CHUNK
    t1 = tl.minimum(t0 + CHUNK, L)
    h = tl.load(hs_ptr + (pid_b * L + t1 - 1) * DIM * NP + tile, mask=m2, other=0.0)   # the chunk's last state
    for i in range(t1 - t0):
        t = t1 - 1 - i + pid_b * 0                                             # int64 offsets
        u = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + t * s_ul, mask=md, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * s_tb + offs_d * s_td + t * s_tl, mask=md, other=0.0).to(tl.float32)
        gy = tl.load(gy_ptr + pid_b * s_gb + offs_d * s_gd + t * s_gl, mask=md, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + pid_b * s_bb + offs_n * s_bn + t * s_bl, mask=mn, other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + pid_b * s_cb + offs_n * s_cn + t * s_cl, mask=mn, other=0.0).to(tl.float32)
        h_prev = tl.load(hs_ptr + (pid_b * L + tl.maximum(t - 1, t0)) * DIM * NP + tile, mask=m2, other=0.0)
        h_prev = tl.where(t > t0, h_prev, start)                               # h_{t-1}; the start state first
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
    tl.store(ga_ptr + (pid_b * NC + pid_c) * s_xc + state, ga, mask=m2)
    if pid_c == 0:
        tl.store(gh0_ptr + pid_b * s_sb + state, g, mask=m2)


def _block_d(bsz: int, dim: int, device) -> int:
    """Channels per program: a program walks its tokens sequentially, so while batch × blocks do not give
    every SM sub-partition a warp, smaller tiles (shorter steps: 473 / 266 instructions a step at 16 / 8
    channels against 741 at 32, sm_90 compiled code) and more programs; 32 once the GPU is full (least
    work per channel). Chunks of the sequence then give each sub-partition WARPS_PER_QUAD (plan_chunk)."""
    sms = triton_scan.sm_count(device)
    if sms is None:
        return BLOCK_D
    quads = 4 * sms
    for bd in (BLOCK_D, 16):
        if bsz * triton.cdiv(dim, bd) >= quads:
            return bd
    return 8


def plan_chunk(programs: int, length: int, slots: int) -> int:
    """Tokens per chunk: the whole sequence where `programs` (batch rows × channel blocks, one warp each)
    fill the `slots` warps wanted; else the fewest chunks that do, each a multiple of 16 tokens and at
    least MIN_CHUNK (a sequence shorter than that stays whole)."""
    if programs <= 0 or programs >= slots or length <= MIN_CHUNK:      # programs 0: an empty batch or no channels
        return max(length, 1)
    per_chunk = triton.cdiv(length, triton.cdiv(slots, programs))
    return min(length, max(MIN_CHUNK, triton.cdiv(per_chunk, 16) * 16))


def _slots(device) -> int:
    """One-warp programs wanted at once: WARPS_PER_QUAD per SM sub-partition; on CPU (the interpreter,
    tests) no chunks unless asked for."""
    sms = triton_scan.sm_count(device)
    return 1 if sms is None else WARPS_PER_QUAD * 4 * sms


def scan_backward(u, delta, A, B, C, h0, gy, glast, *, block_d=None, chunk=None, scratch_bytes=SCRATCH_BYTES):
    """Gradients of (y, h_last) = scan(u, Δ, A, B, C, h0) for the upstream gy (b, d, l) and glast
    (b, d, n) or None. u, delta, gy: (b, d, l); A: (d, n) real; B, C: (b, n, l); h0: (b, d, n) or None.
    Returns gu, gdelta (b, d, l), gA (d, n), gB, gC (b, n, l), gh0 (b, d, n) or None, all fp32.
    block_d: channels per program; chunk: tokens per chunk (default: plan_chunk). A slice holds at
    least one block of channels, so scratch_bytes bounds the scratch only above that."""
    bsz, dim, length = u.shape
    block_d = block_d or _block_d(bsz, dim, u.device)
    n = A.shape[1]
    dev, f = u.device, torch.float32
    np_ = max(2, triton.next_power_of_2(n))
    A = A.to(f)
    gu = torch.empty(bsz, dim, length, device=dev, dtype=f)
    gdelta = torch.empty_like(gu)
    gB = torch.zeros(bsz, n, length, device=dev, dtype=f)
    gC = torch.zeros_like(gB)
    gh0 = torch.empty(bsz, dim, n, device=dev, dtype=f)
    if length == 0:                 # nothing scanned: dL/dh0 = dL/dh_last
        gh0.copy_(glast if glast is not None else torch.zeros_like(gh0))
        return gu, gdelta, torch.zeros_like(A), gB, gC, (gh0 if h0 is not None else None)
    if bsz == 0 or dim == 0:        # nothing to launch: every gradient is empty or zero
        return gu, gdelta, torch.zeros_like(A), gB, gC, (gh0.zero_() if h0 is not None else None)
    chunk = chunk or plan_chunk(bsz * triton.cdiv(dim, block_d), length, _slots(dev))
    nc = triton.cdiv(length, chunk)
    if nc > 65535:                                                             # the grid's third axis
        raise ValueError(f"triton_scan_bwd: {nc} chunks of {chunk} tokens exceed 65535")
    ga = torch.empty(bsz, nc, dim, n, device=dev, dtype=f)                   # gA per batch row and chunk
    st, adj = torch.empty_like(ga), torch.empty_like(ga)                     # pass 2's states, pass 4's adjoints
    hst = h0.stride() if h0 is not None else (0, 0, 0)
    lst = glast.stride() if glast is not None else (0, 0, 0)
    h0_arg = h0 if h0 is not None else st
    gl_arg = glast if glast is not None else st
    flags = dict(N=n, NP=np_, BLOCK_D=block_d, num_warps=max(1, block_d // 32))
    if nc > 1:                      # passes 1, 2 and 4, 2 (reversed): every chunk's true start state and end adjoint
        sdt, sdt_rev = torch.empty(bsz, nc, dim, device=dev, dtype=f), torch.empty(bsz, nc, dim, device=dev, dtype=f)
        grid = (bsz, triton.cdiv(dim, block_d), nc - 1)
        carry = dict(N=n, NP=np_, BLOCK_D=32, num_warps=1)
        _states_kernel[grid](u, delta, A, B, h0_arg, st, sdt, st, dim, length, chunk, nc, dim * n, *u.stride(),
                             *delta.stride(), *A.stride(), *B.stride(), *hst, HAS_H0=h0 is not None, LOCAL=True,
                             **flags)
        _carry_kernel[(bsz, triton.cdiv(dim, 32))](A, h0_arg, st, sdt, dim, nc, *A.stride(), *hst,
                                                    HAS_H0=h0 is not None, **carry)
        _adjoint_kernel[grid](delta, A, C, gy, adj, sdt_rev, dim, length, chunk, nc, *delta.stride(), *A.stride(),
                              *C.stride(), *gy.stride(), **flags)
        _carry_kernel[(bsz, triton.cdiv(dim, 32))](A, gl_arg, adj, sdt_rev, dim, nc, *A.stride(), *lst,
                                                    HAS_H0=glast is not None, **carry)
    per_channel = bsz * length * np_ * 4
    step = max(block_d, scratch_bytes // per_channel // block_d * block_d)
    for s in range(0, dim, step):   # passes 3 and 5, a slice of channels at a time
        sl = slice(s, min(s + step, dim))
        d = sl.stop - sl.start
        nblk = triton.cdiv(d, block_d)
        hs = torch.empty(bsz, length, d, np_, device=dev, dtype=f)
        gb_s = torch.empty(bsz, nblk, n, length, device=dev, dtype=f)
        gc_s = torch.empty_like(gb_s)
        us, ds, As, gys = u[:, sl], delta[:, sl], A[sl], gy[:, sl]
        h0s = h0[:, sl] if h0 is not None else st
        gls = glast[:, sl] if glast is not None else st
        grid = (bsz, nblk, nc)
        _states_kernel[grid](us, ds, As, B, h0s, st[:, :, sl], st, hs, d, length, chunk, nc, dim * n, *us.stride(),
                             *ds.stride(), *As.stride(), *B.stride(), *hst, HAS_H0=h0 is not None, LOCAL=False,
                             **flags)
        _reverse_kernel[grid](us, ds, As, B, C, h0s, st[:, :, sl], adj[:, :, sl], hs, gys, gls,
                              gu[:, sl], gdelta[:, sl], ga[:, :, sl], gb_s, gc_s, gh0[:, sl], d, length, chunk, nc,
                              nblk, dim * n, dim * length, dim * n, *us.stride(), *ds.stride(),
                              *As.stride(), *B.stride(), *C.stride(), *hst, *gys.stride(), *lst,
                              HAS_H0=h0 is not None, HAS_GLAST=glast is not None, **flags)
        gB += gb_s.sum(1)
        gC += gc_s.sum(1)
        del hs
    return gu, gdelta, ga.sum((0, 1)), gB, gC, (gh0 if h0 is not None else None)


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
