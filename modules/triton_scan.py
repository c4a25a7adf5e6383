"""Mamba-1 selective-scan forward in Triton (GPU; CPU through Triton's interpreter for tests).

Same contract as mamba-ssm's ``selective_scan_fn`` forward plus an initial state (no autograd):

    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t u_t B_t,   y_t = <C_t, h_t> + D u_t,   out_t = y_t · SiLU(z_t)

Design (mamba-ssm's kernel reaches ~7% of HBM bandwidth at batch 1; this one does most of the 16 exps per channel
and token on the special-function units, 16 per cycle and SM, POLY_EXP the others on the FMA units. At 128K on the
H200 that pipe (the exps, softplus' log, the gate) ran at 48-61% of its peak: latency-bound,
benchmarks/results/scan_profile_h200.md):
- One thread owns one channel and all n <= 16 states of it: the sum over n of C_t h_t stays in
  registers and nothing is computed twice across threads. Tokens are walked sequentially inside a
  thread, U at a time: Δ, u, z and out move as (U, BLOCK_D) tiles (one 16-byte vector per row along
  l; Δ, channel-contiguous as the model makes it, goes through shared memory), B_t and C_t are
  broadcast to the block's channels (as fp32, n-contiguous: one small copy of each per call).
- Parallelism over sequence chunks as well as channels, in three launches: (1) each chunk's final
  state from a zero state, and its Σ Δ; (2) a short scan over chunk boundaries, h_c+1 = exp(A ΣΔ_c)
  h_c + s_c, from the initial state; (3) each chunk again from its true initial state, with D, the
  gate and the last chunk's final state. (1) and (3) both pay the exps, so chunks are used only when
  batch × channel blocks cannot fill the GPU, in whole waves of programs.
- Pass 1 loads the next tile's Δ, u and z while it computes this one (PREFETCH). Both passes are latency-bound
  at ~4 warps per scheduler (Nsight Compute); pass 3 has no registers left for it.
- A few states' exps run as a polynomial on the FMA units (POLY_EXP), which balances the
  special-function units against instruction issue; softplus' log and the gate's division use the
  GPU's approximate instructions (2 ulp).
Offsets along l advance 64-bit pointers, so b·d·l beyond 2^31 is safe. State and arithmetic fp32.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Defaults: BLOCK_D measured on the H200, the others chosen from the compiled code (instruction and
# register counts for sm_90); benchmarks/bench_scan.py and bench_scan_blocks.py measure alternatives:
BLOCK_D = 64           # channels per program = 32 · num_warps (one channel per thread); 64, not 128: 1.47x
                       # faster at 128K in the model's strides on the H200 before prefetch (scan_blocks_h200.md),
                       # 1.10x with it (3.43 vs 3.78-3.79 ms, scan_sweep_h200.md)
TILE_BYTES = 16        # a tile row is one 16-byte vector: 8 tokens of bf16, 4 of fp32
MAXNREG = 128          # registers per thread of pass 3 (~150 unbounded): 4 programs per SM, not 3
PROGRAMS_PER_SM = 4    # resident programs of 4 warps per SM (65536 registers / (128 threads · 128)); _slots
                       # counts programs of fewer warps (BLOCK_D 64: 2) as that many more
POLY_EXP = (2, 1)      # states whose exp runs on the FMA units in pass 1 and pass 3 (balances the
                       # special-function units against instruction issue: 128 and 152 cycles a step
                       # per warp instead of 144 and 160, from the compiled code)
PREFETCH = (True, False)   # pass 1, pass 3: load the next tile's Δ, u, z before this tile's steps (a register
                       # double buffer). Pass 1 at 128K on the H200 (ncu, Triton 3.6): 1.73 -> 1.43 ms, long-scoreboard
                       # stalls 3.44 -> 1.50 cycles an instruction. Pass 3 with it spills at MAXNREG (ncu: 45.7M local
                       # spill requests against 16.9K; Triton 3.9's sm_90 code: 142 spill instructions against 16) and
                       # took 1.97 -> 2.96 ms (benchmarks/results/scan_profile_h200.md)
MAX_CHUNK = 8192       # at most this many tokens per chunk (more chunks: smaller waves, longer carry scan)
MIN_CHUNK = 64
MAX_N = 64             # d_state beyond this is refused (correct to 64, fast to 16)


@triton.jit
def _softplus(x, FAST: tl.constexpr):
    """torch's softplus (threshold 20) in fp32: log1p(e^x) by its series where e^x < 1/32 (there
    log(1 + e) would lose digits to the rounding of 1 + e), else log(1 + e); relative error < 1e-5
    with the GPU's approximate log2 (FAST), < 1e-7 with tl.log."""
    e = tl.exp2(x * 1.4426950408889634)
    series = e * (1.0 - e * (0.5 - e * (0.33333333 - e * (0.25 - e * 0.2))))
    if FAST:
        log1p = libdevice.fast_log2f(1.0 + e) * 0.6931471805599453
    else:
        log1p = tl.log(1.0 + e)
    return tl.where(x > 20.0, x, tl.where(e < 0.03125, series, log1p))


@triton.jit
def _silu_gate(y, z, FAST: tl.constexpr):
    """y · z · sigmoid(z); FAST: the GPU's approximate division (2 ulp; z < -88 gives -0 as the limit)."""
    den = 1.0 + tl.exp2(z * -1.4426950408889634)
    if FAST:
        return libdevice.fast_dividef(y * z, den)
    return y * z / den


@triton.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA units (beside the special-function units, 16 per cycle and SM, which do
    the other exps): 2^k · p(f) with k = round(x) (the 1.5·2^23 trick), f in [-1/2, 1/2] and p a degree-6 fit of
    2^f, relative error 1e-7 in fp32 (ex2.approx: 2 ulp); x below -125 gives 2^-125 instead of ~0."""
    x = tl.maximum(x, -125.0)
    j = x + 12582912.0
    f = x - (j - 12582912.0)
    p = 0.00015345764404628426 * f + 0.0013399930903688073
    p = p * f + 0.009618489071726799
    p = p * f + 0.05550328642129898
    p = p * f + 0.24022646248340607
    p = p * f + 0.6931471824645996
    p = p * f + 1.0
    k = j.to(tl.int32, bitcast=True) << 23                    # the low mantissa bits of j hold k
    return (p.to(tl.int32, bitcast=True) + k).to(tl.float32, bitcast=True)


@triton.jit
def _decay(x, rows, NP: tl.constexpr, POLY: tl.constexpr):
    """exp2(x) of an (NP, BLOCK_D) tensor: the last POLY state rows on the FMA units, the others on
    the special-function units (rows are per-thread registers: the compiler keeps one path each)."""
    if POLY > 0:
        return tl.where(rows >= NP - POLY, _exp2_poly(x), tl.exp2(x))
    return tl.exp2(x)


@triton.jit
def _column(tile, sel):
    """tile[j, :] of a (U, BLOCK_D) tile whose U axis lies in one thread (sel: offs_u[:, None] == j):
    a sum of one value and zeros, which the compiler reduces to (about) a register read."""
    return tl.sum(tl.where(sel, tile, 0.0), axis=0)


@triton.jit
def _load_tile(pu, pt, pz, o_u, o_t, o_z, mask, LOAD_Z: tl.constexpr):
    """The raw (U, BLOCK_D) tiles of Δ, u and (LOAD_Z) z at scalar pointer + offsets; z is u otherwise."""
    dt = tl.load(pt + o_t, mask=mask, other=0.0)
    u = tl.load(pu + o_u, mask=mask, other=0.0)
    if LOAD_Z:
        z = tl.load(pz + o_z, mask=mask, other=0.0)
    else:
        z = u
    return dt, u, z


@triton.jit
def _tile(h, sum_dt, dt, u, z, A, bias, skip, pb, pc, po, o_o, o_b, o_c, mask, mask_n, rows,
          t_left, s_bl, s_cl, NP: tl.constexpr, POLY: tl.constexpr, BLOCK_D: tl.constexpr, U: tl.constexpr,
          MASKED: tl.constexpr,
          STATES_ONLY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
          SOFTPLUS: tl.constexpr, FAST: tl.constexpr):
    """U tokens on from state h; returns (h, sum_dt + Σ Δ). dt, u, z: the raw tiles (_load_tile) under
    mask; out's tile at po + o_o, B_t and C_t at pb + o_b + j·s_bl. MASKED: only t_left < U tokens are
    left, the others read as 0 (Δ = 0 keeps the state) and write nothing."""
    offs_u = tl.arange(0, U)
    dt = dt.to(tl.float32)
    if HAS_BIAS:
        dt += bias[None, :]
    if SOFTPLUS:
        dt = _softplus(dt, FAST)
    if MASKED:
        dt = tl.where(mask, dt, 0.0)
    u = u.to(tl.float32)
    du = dt * u
    if STATES_ONLY:
        sum_dt += tl.sum(dt, axis=0)
    else:
        y = tl.zeros((U, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(U):
        sel = offs_u[:, None] == j
        dt_j = _column(dt, sel)
        du_j = _column(du, sel)
        ok = mask_n
        if MASKED:
            ok = ok & (mask_n.to(tl.int32) * 0 + j < t_left)
        B_j = tl.load(pb + j * s_bl + o_b, mask=ok, other=0.0).to(tl.float32)
        h = _decay(dt_j[None, :] * A, rows, NP, POLY) * h + du_j[None, :] * B_j[:, None]
        if not STATES_ONLY:
            C_j = tl.load(pc + j * s_cl + o_c, mask=ok, other=0.0).to(tl.float32)
            y = tl.where(sel, tl.sum(h * C_j[:, None], axis=0)[None, :], y)
    if not STATES_ONLY:
        if HAS_D:
            y += u * skip[None, :]
        if HAS_Z:
            y = _silu_gate(y, z.to(tl.float32), FAST)
        tl.store(po + o_o, y.to(po.dtype.element_ty), mask=mask)
    return h, sum_dt


@triton.jit
def _tile_offsets(offs_dl, offs_u, s_d, s_l, I64: tl.constexpr):
    """(U, BLOCK_D) element offsets of a tile from its first token and channel (int64 if I64)."""
    dl = offs_dl
    tu = offs_u
    if I64:
        dl = dl.to(tl.int64)
        tu = tu.to(tl.int64)
    return dl[None, :] * s_d + tu[:, None] * s_l


@triton.jit
def _scan_kernel(u_ptr, dt_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, h0_ptr, st_ptr, sdt_ptr,
                 out_ptr, last_ptr,
                 DIM, L, CHUNK, N_CHUNKS, D_PER_GROUP,
                 s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_ad, s_an,
                 s_bb, s_bg, s_bn, s_bl, s_cb, s_cg, s_cn, s_cl, s_zb, s_zd, s_zl,
                 s_hb, s_hd, s_hn, s_ob, s_od, s_ol,
                 N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, U: tl.constexpr,
                 STATES_ONLY: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
                 STORE_LAST: tl.constexpr, FAST: tl.constexpr, I64: tl.constexpr, POLY: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """One program: batch pid_b, channels [pid_d·BLOCK_D, +BLOCK_D), the tokens of chunk pid_c.

    STATES_ONLY (pass 1): from a zero state, write the chunk's final state to st[b, c] and Σ Δ to
    sdt[b, c]. Otherwise (pass 3): start from initial_state (chunk 0) or st[b, c - 1], write out and,
    for the last chunk, the final state. Every (NP, BLOCK_D) and (U, BLOCK_D) tensor gets one channel
    per thread with the first axis inside the thread (the compiler's layout for these shapes).
    Scalar 64-bit pointers advance along l; I64: offsets inside a tile need 64 bits too.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    d0 = pid_d * BLOCK_D
    offs_dl = tl.arange(0, BLOCK_D)
    offs_d = d0 + offs_dl
    mask_d = offs_d < DIM
    offs_n = tl.arange(0, NP)
    mask_n = offs_n < N
    offs_u = tl.arange(0, U)
    mask_dn = mask_n[:, None] & mask_d[None, :]
    d64 = offs_d.to(tl.int64)
    # A · log2(e), so that exp(Δ A) = exp2(Δ A'); padded states get A = 0, B = C = 0: inert
    A = tl.load(a_ptr + d64[None, :] * s_ad + offs_n[:, None] * s_an, mask=mask_dn, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else None
    skip = tl.load(d_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else None
    state_off = (pid_b * N_CHUNKS * DIM + d64[None, :]) * N + offs_n[:, None]      # st is (b, chunks, d, n)
    if STATES_ONLY:
        h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
    elif pid_c > 0:             # st is fp32; in one chunk it is a stand-in (out: bf16 too), never read
        h = tl.load(st_ptr + state_off + (pid_c - 1).to(tl.int64) * DIM * N, mask=mask_dn, other=0.0).to(tl.float32)
    elif HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_hb + d64[None, :] * s_hd + offs_n[:, None] * s_hn, mask=mask_dn,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)

    t_start = pid_c * CHUNK
    t_len = tl.minimum(CHUNK, L - t_start)
    t64 = t_start.to(tl.int64)
    dd = d0.to(tl.int64)
    group = (d0 // D_PER_GROUP).to(tl.int64)                      # one group per program (wrapper's choice)
    pu = u_ptr + pid_b * s_ub + dd * s_ud + t64 * s_ul          # scalar pointers at (chunk start, d0)
    pt = dt_ptr + pid_b * s_tb + dd * s_td + t64 * s_tl
    pz = z_ptr + pid_b * s_zb + dd * s_zd + t64 * s_zl
    po = out_ptr + pid_b * s_ob + dd * s_od + t64 * s_ol
    pb = b_ptr + pid_b * s_bb + group * s_bg + t64 * s_bl
    pc = c_ptr + pid_b * s_cb + group * s_cg + t64 * s_cl
    o_u = _tile_offsets(offs_dl, offs_u, s_ud, s_ul, I64)
    o_t = _tile_offsets(offs_dl, offs_u, s_td, s_tl, I64)
    o_z = _tile_offsets(offs_dl, offs_u, s_zd, s_zl, I64)
    o_o = _tile_offsets(offs_dl, offs_u, s_od, s_ol, I64)
    o_b = offs_n * s_bn
    o_c = offs_n * s_cn
    sum_dt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    t_full = t_len - t_len % U
    LOAD_Z: tl.constexpr = HAS_Z and not STATES_ONLY
    full = tl.broadcast_to(mask_d[None, :], (U, BLOCK_D))       # constant along l: vector loads
    if PREFETCH:                                  # the next tile's Δ, u, z load while this one computes
        first = (offs_u[:, None] < t_full) & mask_d[None, :]   # nothing when no whole tile
        n_dt, n_u, n_z = _load_tile(pu, pt, pz, o_u, o_t, o_z, first, LOAD_Z)
    for t0 in range(0, t_full, U):                # whole tiles
        if PREFETCH:
            dt, u, z = n_dt, n_u, n_z
            step = tl.where(t0 + U < t_full, U, 0)  # after the last whole tile: this tile again, unused
            n_dt, n_u, n_z = _load_tile(pu + step * s_ul, pt + step * s_tl, pz + step * s_zl, o_u, o_t, o_z,
                                        full, LOAD_Z)
        else:
            dt, u, z = _load_tile(pu, pt, pz, o_u, o_t, o_z, full, LOAD_Z)
        h, sum_dt = _tile(h, sum_dt, dt, u, z, A, bias, skip, pb, pc, po, o_o, o_b, o_c,
                          full, mask_n, offs_n[:, None], U, s_bl, s_cl, NP, POLY, BLOCK_D, U, False,
                          STATES_ONLY, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST)
        pu += U * s_ul
        pt += U * s_tl
        pz += U * s_zl
        po += U * s_ol
        pb += U * s_bl
        pc += U * s_cl
    if t_full < t_len:                            # the sequence's last, partial tile
        part = (offs_u[:, None] < t_len - t_full) & mask_d[None, :]
        dt, u, z = _load_tile(pu, pt, pz, o_u, o_t, o_z, part, LOAD_Z)
        h, sum_dt = _tile(h, sum_dt, dt, u, z, A, bias, skip, pb, pc, po, o_o, o_b, o_c,
                          part, mask_n, offs_n[:, None], t_len - t_full, s_bl, s_cl, NP, POLY, BLOCK_D, U, True,
                          STATES_ONLY, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, FAST)
    if STATES_ONLY:
        tl.store(st_ptr + state_off + pid_c.to(tl.int64) * DIM * N, h, mask=mask_dn)
        tl.store(sdt_ptr + (pid_b * N_CHUNKS + pid_c) * DIM + offs_d, sum_dt, mask=mask_d)
    elif STORE_LAST:
        if pid_c == N_CHUNKS - 1:
            tl.store(last_ptr + (pid_b * DIM + d64[None, :]) * N + offs_n[:, None], h, mask=mask_dn)


@triton.jit
def _carry_kernel(a_ptr, h0_ptr, st_ptr, sdt_ptr, DIM, N_CHUNKS, s_ad, s_an, s_hb, s_hd, s_hn,
                  N: tl.constexpr, NP: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr):
    """Pass 2, in place: st[b, c] (chunk c's zero-state final state) becomes the true state after
    chunk c, h_c+1 = exp(A ΣΔ_c) ⊙ h_c + st[b, c], starting from the initial state (or 0)."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, NP)
    mask = (offs_n[:, None] < N) & (offs_d[None, :] < DIM)
    d64 = offs_d.to(tl.int64)
    A = tl.load(a_ptr + d64[None, :] * s_ad + offs_n[:, None] * s_an, mask=mask, other=0.0).to(tl.float32)
    A = A * 1.4426950408889634                                   # exp(Δ A) = exp2(Δ A log2 e)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_hb + d64[None, :] * s_hd + offs_n[:, None] * s_hn, mask=mask,
                    other=0.0).to(tl.float32)
    else:
        h = tl.zeros((NP, BLOCK_D), dtype=tl.float32)
    p_s = st_ptr + (pid_b * N_CHUNKS * DIM + d64[None, :]) * N + offs_n[:, None]
    p_dt = sdt_ptr + pid_b * N_CHUNKS * DIM + offs_d
    step = DIM * N
    for c0 in range(0, N_CHUNKS - 1, 4):             # four chunks' loads in flight at once: latency-bound loop
        left = N_CHUNKS - 1 - c0 + offs_d * 0
        ok_d = offs_d < DIM
        m0, m1, m2, m3 = ok_d & (left > 0), ok_d & (left > 1), ok_d & (left > 2), ok_d & (left > 3)
        s0 = tl.load(p_s, mask=mask & m0[None, :], other=0.0)
        s1 = tl.load(p_s + step, mask=mask & m1[None, :], other=0.0)
        s2 = tl.load(p_s + 2 * step, mask=mask & m2[None, :], other=0.0)
        s3 = tl.load(p_s + 3 * step, mask=mask & m3[None, :], other=0.0)
        e0 = tl.load(p_dt, mask=m0, other=0.0)
        e1 = tl.load(p_dt + DIM, mask=m1, other=0.0)
        e2 = tl.load(p_dt + 2 * DIM, mask=m2, other=0.0)
        e3 = tl.load(p_dt + 3 * DIM, mask=m3, other=0.0)
        h = tl.exp2(A * e0[None, :]) * h + s0
        tl.store(p_s, h, mask=mask & m0[None, :])
        h = tl.exp2(A * e1[None, :]) * h + s1
        tl.store(p_s + step, h, mask=mask & m1[None, :])
        h = tl.exp2(A * e2[None, :]) * h + s2
        tl.store(p_s + 2 * step, h, mask=mask & m2[None, :])
        h = tl.exp2(A * e3[None, :]) * h + s3
        tl.store(p_s + 3 * step, h, mask=mask & m3[None, :])
        p_s += 4 * step
        p_dt += 4 * DIM


def _interpreting() -> bool:
    """Triton's CPU interpreter runs no libdevice: the exact tl.log and division instead."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _n_contiguous_fp32(t: torch.Tensor) -> torch.Tensor:
    """B or C (b, g, n, l) as fp32 with n contiguous: a step then reads its n values in one vector
    load, converted once here instead of in every program (B and C are ~1% of the scan's bytes)."""
    if t.dtype == torch.float32 and t.stride(2) == 1:
        return t
    return t.transpose(2, 3).to(torch.float32, memory_format=torch.contiguous_format).transpose(2, 3)


def sm_count(device: torch.device) -> int | None:
    """The GPU's streaming multiprocessors, None off CUDA (benchmarks/triton_resources.py sets 132, the
    H200's, to record the launches an H200 gets on a CPU machine)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _slots(device: torch.device, num_warps: int, programs_per_sm: int) -> int:
    """Programs resident at once on the device (a small fixed number on CPU)."""
    sms = sm_count(device)
    if sms is None:
        return 4
    return sms * programs_per_sm * max(1, 4 // num_warps)


def plan_chunk(rows: int, length: int, tile_u: int, slots: int) -> int:
    """Tokens per chunk, a multiple of 16 (the compiler then knows tile rows stay 16-byte aligned).
    One chunk when rows (batch × channel blocks) fill half the resident slots (chunks double the
    exps); else the fewest chunks that make whole waves of programs with at most MAX_CHUNK tokens
    each (whole waves: no half-empty last wave), and at least MIN_CHUNK."""
    align = max(16, tile_u)
    if rows * 2 >= slots:
        return triton.cdiv(length, align) * align
    per_wave = triton.cdiv(slots, rows)
    n_chunks = per_wave * triton.cdiv(length, per_wave * MAX_CHUNK)
    chunk = triton.cdiv(triton.cdiv(length, n_chunks), align) * align
    return max(chunk, MIN_CHUNK)


def _needs_i64(*tensors, block: int, tile_u: int) -> bool:
    """Offsets inside a (tile_u, block) tile overflow int32 (rows 2^31 / block elements apart)."""
    return any(block * abs(t.stride(1)) + tile_u * abs(t.stride(2)) >= 2**31 for t in tensors)


def selective_scan_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, *, block_d=None, tile_u=None, chunk=None,
                       maxnreg=MAXNREG, programs_per_sm=None, poly_exp=POLY_EXP, prefetch=None):
    """Forward of ``selective_scan_fn`` (mamba-ssm's signature) plus ``initial_state``; no autograd.

    u, delta, z: (b, d, l), any strides, fp32/bf16/fp16; A: (d, n) real, n <= 64; B, C: (b, n, l) or
    (b, g, n, l); D, delta_bias: (d,); initial_state: (b, d, n). Returns out (b, d, l) in u's dtype
    and, if ``return_last_state``, the final state (b, d, n) fp32. The keywords override the
    defaults above (benchmarks and tests): ``block_d`` channels per program (a power of two >= 16),
    ``tile_u`` tokens per tile, ``chunk`` tokens per chunk (a multiple of tile_u), ``maxnreg``
    (None: no bound), ``programs_per_sm`` (for the chunk plan), ``poly_exp`` (states per pass whose
    exp is a polynomial), ``prefetch`` (pass 1, pass 3; None: PREFETCH).
    """
    bsz, dim, length = u.shape
    n = A.shape[1]
    if A.is_complex() or n > MAX_N or B.dim() < 3 or C.dim() < 3:
        raise ValueError("triton_scan: real A with d_state <= 64 and input-dependent B, C only")
    B4 = _n_contiguous_fp32(B if B.dim() == 4 else B.unsqueeze(1))
    C4 = _n_contiguous_fp32(C if C.dim() == 4 else C.unsqueeze(1))
    groups = B4.shape[1]
    if C4.shape[1] != groups or dim % groups:
        raise ValueError(f"triton_scan: B and C need the same number of groups dividing d ({B4.shape}, {C4.shape})")
    out = torch.empty(bsz, dim, length, device=u.device, dtype=u.dtype)
    last = torch.empty(bsz, dim, n, device=u.device, dtype=torch.float32) if return_last_state else None
    if length == 0:
        if return_last_state:
            last.copy_(initial_state if initial_state is not None else torch.zeros_like(last))
        return (out, last) if return_last_state else out
    per_group = dim // groups
    block = block_d or BLOCK_D
    while groups > 1 and per_group % block and block > 16:
        block //= 2
    if groups > 1 and per_group % block:            # no block fits inside a group: one launch per group
        for g in range(groups):
            sl = slice(g * per_group, (g + 1) * per_group)
            res = selective_scan_fwd(u[:, sl], delta[:, sl], A[sl], B4[:, g], C4[:, g], None if D is None else D[sl],
                                     None if z is None else z[:, sl],
                                     None if delta_bias is None else delta_bias[sl], delta_softplus, return_last_state,
                                     None if initial_state is None else initial_state[:, sl],
                                     block_d=block_d, tile_u=tile_u, chunk=chunk, maxnreg=maxnreg,
                                     programs_per_sm=programs_per_sm, poly_exp=poly_exp, prefetch=prefetch)
            out[:, sl] = res[0] if return_last_state else res
            if return_last_state:
                last[:, sl] = res[1]
        return (out, last) if return_last_state else out
    if tile_u is None:          # rows of u, z and out as single vectors
        tile_u = TILE_BYTES // max(u.element_size(), 1 if z is None else z.element_size())
    _launch(u, delta, A, B4, C4, D, z, delta_bias, delta_softplus, initial_state, out, last, per_group,
            block, tile_u, chunk, maxnreg, programs_per_sm or PROGRAMS_PER_SM, poly_exp,
            PREFETCH if prefetch is None else prefetch)
    return (out, last) if return_last_state else out


def _launch(u, delta, A, B4, C4, D, z, delta_bias, softplus, h0, out, last, per_group, block, tile_u, chunk, maxnreg,
            programs_per_sm, poly_exp, prefetch):
    bsz, dim, length = u.shape
    n = A.shape[1]
    num_warps = max(1, block // 32)
    d_blocks = triton.cdiv(dim, block)
    if chunk is None:
        chunk = plan_chunk(bsz * d_blocks, length, tile_u, _slots(u.device, num_warps, programs_per_sm))
    if chunk % tile_u:
        raise ValueError(f"chunk ({chunk}) must be a multiple of tile_u ({tile_u})")
    n_chunks = max(1, triton.cdiv(length, chunk))
    if n_chunks > 65535 or d_blocks > 65535:                   # the grid's 2nd and 3rd axes
        raise ValueError(f"triton_scan: {n_chunks} chunks or {d_blocks} channel blocks exceed 65535")
    np_ = max(2, triton.next_power_of_2(n))
    dummy = out
    if n_chunks > 1:
        st = torch.empty(bsz, n_chunks, dim, n, device=u.device, dtype=torch.float32)
        sdt = torch.empty(bsz, n_chunks, dim, device=u.device, dtype=torch.float32)
    else:
        st = sdt = dummy
    hs = h0.stride() if h0 is not None else (0, 0, 0)
    zz = z if z is not None else u
    args = [u, delta, A, B4, C4, D if D is not None else dummy, zz, delta_bias if delta_bias is not None else dummy,
            h0 if h0 is not None else dummy, st, sdt, out, last if last is not None else dummy,
            dim, length, chunk, n_chunks, per_group, *u.stride(), *delta.stride(), *A.stride(),
            B4.stride(0), B4.stride(1), B4.stride(2), B4.stride(3), C4.stride(0), C4.stride(1), C4.stride(2),
            C4.stride(3), *zz.stride(), *hs, *out.stride()]
    flags = dict(N=n, NP=np_, BLOCK_D=block, U=tile_u, HAS_D=D is not None, HAS_Z=z is not None,
                 HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), HAS_H0=h0 is not None,
                 STORE_LAST=last is not None, FAST=not _interpreting(), num_warps=num_warps,
                 I64=_needs_i64(u, delta, zz, out, block=block, tile_u=tile_u))
    if n_chunks > 1:
        _scan_kernel[(bsz, d_blocks, n_chunks - 1)](*args, STATES_ONLY=True, POLY=min(poly_exp[0], np_),
                                                    PREFETCH=bool(prefetch[0]), **flags)
        carry_block = 32
        _carry_kernel[(bsz, triton.cdiv(dim, carry_block))](
            A, h0 if h0 is not None else dummy, st, sdt, dim, n_chunks, *A.stride(), *hs, N=n, NP=np_,
            BLOCK_D=carry_block, HAS_H0=h0 is not None, num_warps=1)
    _scan_kernel[(bsz, d_blocks, n_chunks)](*args, STATES_ONLY=False, POLY=min(poly_exp[1], np_), maxnreg=maxnreg,
                                            PREFETCH=bool(prefetch[1]), **flags)
