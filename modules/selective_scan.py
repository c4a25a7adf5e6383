"""Selective scan (Mamba-1 SSM): a fast exact pure-PyTorch path beside the CUDA kernel.

Glossary (Gu & Dao 2023, arXiv 2312.00752, Alg. 2):
    b  batch,  d  channels (d_inner),  l  sequence length,  n  state size (d_state)
    Δ (delta)  per-token, per-channel step size, (b, d, l), after bias and softplus
    A  (d, n) negative real diagonal state matrix;  B, C  (b, n, l) input-dependent projections
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t u_t        (ZOH for A, Euler for B, as the kernel)
    y_t = <C_t, h_t> + D u_t,  optionally gated by SiLU(z)

``selective_scan_ref`` has the signature of mamba-ssm's ``selective_scan_fn`` plus an
``initial_state``. It is exact in fp32 and fast: the recurrence is evaluated in blocks that bound
memory; inside a block, a two-level scan (a loop over positions inside chunks, all chunks at
once, then a loop over chunk carries) needs O(sqrt(l)) Python steps instead of O(l). The
backward is a hand-written reverse scan that recomputes states block by block (as the CUDA
kernel does), so training memory stays O(b·d·l) rather than O(b·d·l·n).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from modules import kernels

# Elements of one (b, d, block, n) fp32 tensor per block. On CPU 4 MB blocks keep a block's
# temporaries near the caches (measured on 2 cores: 2.3x faster than 64 MB blocks at 2K-16K
# tokens, d_inner 512); blocks never go below 128 tokens (d_inner 1536 at 6K tokens: fwd+bwd
# 3.1 s with 85-170-token blocks vs 5.0 s with 42). On a GPU the cost is kernel launches, about 2·sqrt(block) per block, so blocks grow
# with free memory: one tensor may take 1/64 of it (a block holds about ten), at least 64x the CPU size.
_BLOCK_ELEMS = 1 << 20
_GPU_BLOCK_FACTOR = 64
_GPU_MEMORY_SHARE = 64
# exp(x) is exactly 0 below these (fp32: e^-104 is under half the smallest subnormal; fp64: e^-746)
_UNDERFLOW = {torch.float32: -110.0, torch.float64: -760.0}


def _linear_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """Inclusive scan h_t = exp(log_a_t) * h_{t-1} + b_t along dim 2 of (B, D, L, N) tensors.

    log_a <= 0 always (Δ >= 0, A < 0), so every exponential here is in (0, 1]: no overflow.
    Returns h of shape (B, D, L, N) in fp32.
    """
    bsz, d, length, n = b.shape
    t_len = _chunk_len(length)                               # chunk length T
    n_chunks = -(-length // t_len)
    pad = n_chunks * t_len - length
    if pad:
        log_a = F.pad(log_a, (0, 0, 0, pad))                 # exp(0) = 1, b = 0: inert tail
        b = F.pad(b, (0, 0, 0, pad))
    log_a = log_a.view(bsz, d, n_chunks, t_len, n)
    b = b.view(bsz, d, n_chunks, t_len, n)
    a = log_a.exp()                                          # (B, D, C, T, N)
    h = torch.empty_like(b)
    h[:, :, :, 0] = b[:, :, :, 0]
    in_place = not torch.is_grad_enabled()                   # out= has no autograd (a double backward records this)
    for t in range(1, t_len):                                # local scans of all chunks at once, in place
        if in_place:
            torch.addcmul(b[:, :, :, t], a[:, :, :, t], h[:, :, :, t - 1], out=h[:, :, :, t])
        else:
            h[:, :, :, t] = torch.addcmul(b[:, :, :, t], a[:, :, :, t], h[:, :, :, t - 1])
    decay = torch.cumsum(log_a, dim=3).exp_()                # (B, D, C, T, N) decay since chunk start
    carry = torch.empty(bsz, d, n_chunks, n, dtype=b.dtype, device=b.device)
    carry[:, :, 0] = 0 if h0 is None else h0
    for c in range(1, n_chunks):                             # state entering each chunk
        if in_place:
            torch.addcmul(h[:, :, c - 1, -1], decay[:, :, c - 1, -1], carry[:, :, c - 1], out=carry[:, :, c])
        else:
            carry[:, :, c] = torch.addcmul(h[:, :, c - 1, -1], decay[:, :, c - 1, -1], carry[:, :, c - 1])
    h.addcmul_(decay, carry.unsqueeze(3))
    return h.view(bsz, d, n_chunks * t_len, n)[:, :, :length]


def _chunk_len(length: int) -> int:
    """About sqrt(length); a divisor of length within [sqrt/2, 2 sqrt] when there is one, so
    that no padded copy of the inputs is needed (blocks are powers of two but for the last)."""
    root = max(1, int(math.ceil(math.sqrt(length))))
    for t in sorted(range(max(1, root // 2), 2 * root + 1), key=lambda t: abs(t - root)):
        if length % t == 0:
            return t
    return root


def _block_len(bsz: int, d: int, n: int, device=None) -> int:
    elems = _BLOCK_ELEMS
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        elems = max(_BLOCK_ELEMS * _GPU_BLOCK_FACTOR, free // 4 // _GPU_MEMORY_SHARE)
    return max(128, elems // max(1, bsz * d * n))     # >= 128 tokens: fewer Python steps for wide models


class _ScanFn(torch.autograd.Function):
    """y_t = <C_t, h_t> with h from the recurrence above; returns (y, h_last). Inputs fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        bsz, d, length = u.shape
        n = A.shape[1]
        blk = _block_len(bsz, d, n, u.device)
        y = torch.empty_like(u)
        h_in = torch.zeros(bsz, d, n, dtype=u.dtype, device=u.device) if h0 is None else h0
        starts = list(range(0, length, blk))
        entry_states = []
        for s in starts:
            e = min(s + blk, length)
            log_a = delta[:, :, s:e, None] * A[None, :, None, :]                       # (b, d, l', n)
            bu = (delta[:, :, s:e] * u[:, :, s:e]).unsqueeze(-1) * B[:, None, :, s:e].transpose(2, 3)
            h = _linear_scan(log_a, bu, h_in)                                          # (b, d, l', n)
            y[:, :, s:e] = torch.einsum("bdln,bnl->bdl", h, C[:, :, s:e])
            entry_states.append(h_in)
            h_in = h[:, :, -1]
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(entry_states))
        ctx.starts, ctx.blk, ctx.has_h0 = starts, blk, h0 is not None
        return y, h_in.clone()

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, delta, A, B, C, entry_states = ctx.saved_tensors
        length = u.shape[2]
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gA, gB, gC = torch.zeros_like(A), torch.empty_like(B), torch.empty_like(C)
        gy = gy.to(u.dtype) if gy is not None else torch.zeros_like(u)
        carry = gh_last if gh_last is not None else torch.zeros_like(entry_states[0])
        for i in reversed(range(len(ctx.starts))):
            s = ctx.starts[i]
            e = min(s + ctx.blk, length)
            d_blk, u_blk, B_t = delta[:, :, s:e], u[:, :, s:e], B[:, :, s:e].transpose(1, 2)  # B_t (b, l', n)
            log_a = d_blk[..., None] * A[None, :, None, :]
            bu = (d_blk * u_blk).unsqueeze(-1) * B_t[:, None]
            h = _linear_scan(log_a, bu, entry_states[i])                              # recompute states
            gy_blk = gy[:, :, s:e]
            c = gy_blk.unsqueeze(-1) * C[:, None, :, s:e].transpose(2, 3)             # dL/dh_t, direct
            # G_t = c_t + a_{t+1} G_{t+1}: a reverse scan; the last position takes the carry.
            log_a_next = F.pad(log_a[:, :, 1:], (0, 0, 0, 1))
            G = _linear_scan(log_a_next.flip(2), c.flip(2), carry).flip(2)
            g_log_a = G * (h - bu)                                                     # dL/d(Δ A): G a h_prev
            gC[:, :, s:e] = (h * gy_blk[..., None]).sum(1).transpose(1, 2)            # (b, n, l')
            GB = (G * B_t[:, None]).sum(-1)                                            # (b, d, l')
            gu[:, :, s:e] = GB * d_blk
            gdelta[:, :, s:e] = GB * u_blk + (g_log_a @ A[None, :, :, None]).squeeze(-1)
            gB[:, :, s:e] = (G * (d_blk * u_blk)[..., None]).sum(1).transpose(1, 2)
            gA += torch.einsum("bdln,bdl->dn", g_log_a, d_blk)
            carry = log_a[:, :, 0].exp() * G[:, :, 0]                                  # a_s G_s
        return gu, gdelta, gA, gB, gC, (carry if ctx.has_h0 else None)


def _step_size(delta, delta_bias, delta_softplus, f):
    """Δ in dtype f: delta (+ bias), through softplus if asked (the kernel's delta_softplus)."""
    delta = delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].to(f)
    return F.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y, u, D, z, dtype_out):
    """y + D u, gated by SiLU(z), cast to the output dtype (steps shared by every scan path)."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """Pure-PyTorch selective scan, same signature as mamba-ssm's ``selective_scan_fn``.

    u, delta: (b, d, l); A: (d, n); B, C: (b, n, l); D: (d,); z: (b, d, l); delta_bias: (d,);
    initial_state: (b, d, n) or None. Returns out (b, d, l) in u's dtype, and the final state
    (b, d, n, fp32) if ``return_last_state``. The state is always carried in fp32.
    """
    f = torch.promote_types(u.dtype, torch.float32)   # fp32 compute (fp64 stays fp64 for gradcheck)
    return _around_core(_ScanFn, f, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                        initial_state)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """``selective_scan_ref`` with its core scan in Triton, forward and backward
    (modules.triton_scan_bwd): training on a GPU without mamba-ssm. B, C: (b, n, l); fp32 compute."""
    from modules.triton_scan_bwd import TritonScanFn
    return _around_core(TritonScanFn, torch.float32, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        return_last_state, initial_state)


def _around_core(core, f, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state):
    """Step size, the core scan ``core.apply`` (an autograd Function giving y and the last state) in
    dtype f, then D and the gate (autograd through torch ops), output in u's dtype."""
    delta = _step_size(delta, delta_bias, delta_softplus, f)
    h0 = None if initial_state is None else initial_state.to(f)
    y, last = core.apply(u.to(f), delta, A.to(f), B.to(f), C.to(f), h0)
    out = _skip_and_gate(y, u, D, z, u.dtype)
    return (out, last) if return_last_state else out


def selective_scan_sequential(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False, initial_state=None):
    """Test oracle only: the same scan as a per-token loop (slow, O(l) Python steps)."""
    dtype_in = u.dtype
    f = torch.promote_types(dtype_in, torch.float32)
    u, delta = u.to(f), _step_size(delta, delta_bias, delta_softplus, f)
    bsz, d, length = u.shape
    h = torch.zeros(bsz, d, A.shape[1], device=u.device, dtype=f) if initial_state is None else initial_state.to(f)
    dA = torch.exp(delta.unsqueeze(-1) * A.to(f)[:, None, :])             # (b, d, l, n)
    dBu = (delta * u).unsqueeze(-1) * B.to(f).transpose(1, 2).unsqueeze(1)
    ys = []
    for t in range(length):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t].to(f)))
    out = _skip_and_gate(torch.stack(ys, dim=2), u, D, z, dtype_in)
    return (out, h) if return_last_state else out


@functools.cache
def _triton_correction():
    """modules.triton_correction.initial_state_correction, or None where Triton cannot be imported."""
    try:
        from modules.triton_correction import initial_state_correction
    except ImportError:
        return None
    return initial_state_correction


def initial_state_correction(delta, A, C, initial_state, delta_bias=None, delta_softplus=False):
    """Exact contribution of an initial state h0 to a selective scan (the kernel takes none).

    The recurrence is linear in h, so with P_t = exp(A · Σ_{k<=t} Δ_k) (entries in (0, 1]):
        y_t(h0) = y_t(0) + <C_t, P_t ⊙ h0>   and   h_L(h0) = h_L(0) + P_L ⊙ h0.
    Returns (dy (b, e, l) in fp32 or wider, to add before the D term and gate; decay P_L (b, e, n)).
    On a GPU with Triton the work goes to ``modules.triton_correction`` (fused, nothing of size l·n
    stored); this torch code is its reference and the CPU path.
    """
    f = torch.promote_types(delta.dtype, torch.float32)
    fused = _triton_correction() if delta.is_cuda and f == torch.float32 and C.dim() == 3 else None
    if fused is not None:
        return fused(delta, A, C, initial_state, delta_bias, delta_softplus)
    A, h0 = A.to(f), initial_state.to(f)
    cum = torch.cumsum(_step_size(delta, delta_bias, delta_softplus, f), dim=-1)                                                   # (b, e, l)
    dy = torch.zeros_like(cum)
    # P_t <= exp(cum_t · max_n A): past the last t where that bound is above exp(_UNDERFLOW[f]) every
    # term underflows to 0 in f, so the work stops there (a trained or random Mamba forgets h0 within
    # a few thousand tokens; the kernel path streams 64K-token chunks).
    bound = (cum * A.amax(dim=1)[None, :, None]).amax(dim=(0, 1))                                       # (l,)
    alive = torch.nonzero(bound >= _UNDERFLOW[f])
    length = 0 if len(alive) == 0 else int(alive[-1]) + 1
    step = max(1, _BLOCK_ELEMS * _GPU_BLOCK_FACTOR // max(1, cum.shape[0] * cum.shape[1] * A.shape[1]))
    for s in range(0, length, step):                                                    # bounded memory
        e = min(s + step, length)
        P = torch.exp(cum[:, :, s:e, None] * A[None, :, None, :])                       # (b, e, l', n)
        dy[:, :, s:e] = torch.einsum("beln,bnl->bel", P * h0[:, :, None], C[:, :, s:e].to(f))
    return dy, torch.exp(cum[:, :, -1, None] * A[None])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself if its rows start 16-byte aligned, else an aligned copy. The scan kernel's vector
    loads assume it and only check stride(-1) == 1: a view such as x[..., 3:] (a continued conv's
    output) gave 'misaligned address' on the H200."""
    if t.data_ptr() % 16 == 0 and (t.is_contiguous() or (t.stride(-1) == 1 and all(
            st % (16 // t.element_size()) == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))):
        return t
    return t.clone(memory_format=torch.contiguous_format)


# Which scan serves CUDA calls: "mamba_ssm" (its selective_scan_fn, plus the initial-state
# correction), "triton" (modules.triton_scan's forward; a call that needs a gradient runs the same
# forward and modules.triton_scan_bwd's backward: no compiled mamba-ssm needed), "torch"
# (selective_scan_ref), or "auto" (the default): mamba-ssm's where its kernels import, else Triton's where
# Triton imports (one layer's scan forward + backward 7.6-7.8x faster than the torch path on the H200 as
# planned, 8.3x in one chunk, results/scan_bwd_h200.md), else torch. The environment variable
# DECIMAMBA_SCAN overrides the default, read at each call.
SCAN_IMPLS = ("auto", "mamba_ssm", "triton", "torch")
DEFAULT_SCAN_IMPL = "auto"


def scan_impl() -> str:
    """The scan asked for: DECIMAMBA_SCAN, or the default (cuda_scan says which one runs)."""
    impl = os.environ.get("DECIMAMBA_SCAN", "") or DEFAULT_SCAN_IMPL
    if impl not in SCAN_IMPLS:
        raise ValueError(f"DECIMAMBA_SCAN={impl!r} is not valid; choose one of {SCAN_IMPLS}")
    return impl


def cuda_scan(backend: str = "auto") -> str:
    """The scan a CUDA call of a layer with this backend is routed to: "torch" for backend "torch"; else
    scan_impl(), with "auto" resolved (backend "kernel" asks for mamba-ssm's kernels: never Triton's). A call
    the routed scan cannot serve (Triton not importable, d_state > 64, CPU tensors) runs the torch scan;
    importing Triton is left to the call (_triton_fits), so CPU calls never import it."""
    if backend == "torch":
        return "torch"
    impl = scan_impl()
    if impl != "auto":
        return impl
    return "mamba_ssm" if kernels.HAS_KERNELS or backend == "kernel" else "triton"


@functools.cache
def _triton_scan():
    """modules.triton_scan.selective_scan_fwd, or None where Triton cannot be imported."""
    try:
        from modules.triton_scan import selective_scan_fwd
    except ImportError:
        return None
    return selective_scan_fwd


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRITON_MAX_N = 64


def triton_available() -> bool:
    """Triton and modules.triton_scan import (checked once)."""
    return _triton_scan() is not None


def triton_takes(d_state: int, dtype) -> bool:
    """The Triton scan serves this d_state and dtype, where Triton imports (real A, per-token B and C: as
    every Mamba-1 layer of this repository makes them). Results' labels ask it too (engine/evaluate.py)."""
    return triton_available() and d_state <= TRITON_MAX_N and dtype in TRITON_DTYPES


def _triton_fits(u, A, B, C) -> bool:
    """A CUDA call of a shape the Triton scan supports: fp32/bf16/fp16, real A with n <= 64, per-token B, C."""
    return (u.is_cuda and triton_takes(A.shape[1], u.dtype) and not A.is_complex()
            and B.dim() >= 3 and C.dim() >= 3)


def _triton_serves(u, A, B, C, tensors) -> bool:
    """The Triton forward takes the call: it fits, and no gradient is wanted."""
    return _triton_fits(u, A, B, C) and not (torch.is_grad_enabled()
                                             and any(t is not None and t.requires_grad for t in tensors))


def _triton_trains(u, A, B, C) -> bool:
    """The Triton forward and backward take a call that wants a gradient: it fits, with B, C (b, n, l)."""
    return _triton_fits(u, A, B, C) and B.dim() == 3 and C.dim() == 3


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None, backend="auto"):
    """Dispatcher: on CUDA, the scan ``cuda_scan(backend)`` names when the call fits it, else
    ``selective_scan_ref``.

    The Mamba-1 kernel of mamba-ssm takes no initial state; with one, its zero-state result is
    corrected exactly by ``initial_state_correction`` (linearity of the recurrence). The Triton
    scan takes the state itself and the model's strides as they are (no copies).
    """
    impl = cuda_scan(backend)
    if impl == "triton" and _triton_serves(u, A, B, C, (u, delta, A, B, C, D, z, delta_bias, initial_state)):
        return _triton_scan()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    if impl == "triton" and _triton_trains(u, A, B, C):
        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                     initial_state)
    if impl == "torch" or not kernels.use_kernels(backend, u):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    u, delta, z = (None if t is None else _aligned(t) for t in (u, delta, z))
    B, C = B.contiguous(), C.contiguous()
    if initial_state is None:
        return kernels.selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    y, last = kernels.selective_scan_fn(u, delta, A, B, C, D, None, delta_bias, delta_softplus, True)
    dy, decay = initial_state_correction(delta, A, C, initial_state, delta_bias, delta_softplus)
    out = _skip_and_gate(y.to(dy.dtype) + dy, u, None, z, u.dtype)      # the kernel already added D u
    last = last + decay * initial_state.to(decay.dtype)
    return (out, last) if return_last_state else out
