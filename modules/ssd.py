"""SSD scan (Mamba-2's SSM): an exact chunked pure-PyTorch path beside mamba-ssm's Triton kernel.

Glossary (Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060, §6 and Listing 1):
    b batch · l tokens · h heads · p headdim · g groups (heads share B, C within a group; r = h / g
    heads per group) · n d_state · T chunk length · c chunks
    Δ = softplus(dt + dt_bias) (b, l, h) step size, clamped to dt_limit;  A (h,) negative scalar per head
    h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ      (state (p, n) per head)
    y_t = h_t C_t + D x_t,  optionally gated by SiLU(z)

The chunked algorithm, all in fp32 (or wider) accumulation:
    1 intra-chunk (diagonal blocks): y_diag = (L ∘ C Bᵀ) (Δ x), L[i, j] = exp(Σ_{j<k≤i} Δ_k A),
      the segment sums taken by a masked cumulative sum (no differences of large cumulative sums);
    2 chunk states: the state each chunk leaves from a zero start, Σ_s exp(Σ_{k>s} Δ_k A) Δ_s x_s B_sᵀ;
    3 inter-chunk state passing: a loop over chunks, state ← exp(Σ_chunk Δ A) state + chunk state;
    4 state → output: y_off = exp(Σ_{k≤t} Δ_k A) C_t · state entering the chunk.
Every exponent is ≤ 0 (Δ ≥ 0, A < 0): nothing overflows. Chunks are processed in blocks that bound
memory; gradients come from autograd through these exact steps.

``ssd_scan_ref`` has the signature and layouts of mamba-ssm's ``mamba_chunk_scan_combined``;
``ssd_scan`` dispatches to the kernel (through modules/kernels.py) or to it; ``ssd_step`` is one
recurrent step for decoding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modules import kernels

# Chunk length of the torch path. The result does not depend on it (exact algebra). Forward +
# backward at 8K tokens on 2 shared CPU cores (16 heads × 64, 2 groups, d_state 128; best of 3):
# 0.89 s at 128, 1.11 s at 64, 1.5 s at 32; 256 was slower again.
TORCH_CHUNK = 128
# Elements of the largest per-block temporary, (b, chunks, h, T, T) or (b, chunks, h, p, n). On a
# GPU blocks may be 64x larger (fewer launches; an H200 has the memory).
_BLOCK_ELEMS = 1 << 22
_GPU_BLOCK_FACTOR = 64


def step_size(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf), f=torch.float32):
    """Δ in dtype f from raw dt (…, h): + bias, softplus if asked, clamped to dt_limit (as the kernel)."""
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)                      # threshold 20, as the kernel's softplus
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _segsum(dA):
    """dA (..., T) -> (..., T, T): [i, j] = Σ_{j<k≤i} dA_k for i ≥ j, −inf above the diagonal."""
    t_len = dA.shape[-1]
    x = dA[..., :, None].expand(*dA.shape, t_len)                 # [k, j] = dA_k
    below = torch.ones(t_len, t_len, dtype=torch.bool, device=dA.device).tril(-1)
    seg = torch.cumsum(x.masked_fill(~below, 0), dim=-2)          # [i, j] = Σ_{j<k≤i} dA_k
    return seg.masked_fill(~below.logical_or(torch.eye(t_len, dtype=torch.bool, device=dA.device)), -math.inf)


def _chunk_block(x, dt, A, B, C, state):
    """Steps 1-4 for one block of whole chunks, all in the compute dtype. Layouts put the chunk's
    tokens next to the matrix dimensions, so every product is a plain batched matmul (einsum's
    backward picked slow bmm layouts here: 10x slower on CPU).

    x (b, c, g, r, T, p) · dt (b, c, g, r, T) · A (g, r) · B, C (b, c, g, T, n) · state (b, g, r, p, n)
    Returns y (b, c, g, r, T, p) and the state after the block.
    """
    dA = dt * A[:, :, None]                                                         # (b, c, g, r, T)
    xdt = x * dt[..., None]                                                         # Δ x
    decay = _segsum(dA).exp()                                                       # (b, c, g, r, T, T)
    CB = (C @ B.transpose(-1, -2))[:, :, :, None]                                   # (b, c, g, 1, T, T)
    y = (decay * CB) @ xdt                                                          # 1: y_diag
    to_end = decay[..., -1, :, None]                                                # (b, c, g, r, T, 1) exp(Σ_{k>s})
    chunk_states = (xdt * to_end).transpose(-1, -2) @ B[:, :, :, None]              # 2: (b, c, g, r, p, n)
    cum = torch.cumsum(dA, dim=-1)                                                  # Σ_{k≤t}
    chunk_decay = cum[..., -1].exp()                                                # (b, c, g, r)
    entering = []
    for i in range(x.shape[1]):                                                     # 3: state passing
        entering.append(state)
        state = state * chunk_decay[:, i, :, :, None, None] + chunk_states[:, i]
    entering = torch.stack(entering, dim=1)                                         # (b, c, g, r, p, n)
    y_off = (C[:, :, :, None] @ entering.transpose(-1, -2)) * cum.exp()[..., None]  # 4: (b, c, g, r, T, p)
    return y + y_off, state


def ssd_scan_ref(x, dt, A, B, C, chunk_size=None, D=None, z=None, dt_bias=None, initial_states=None,
                 dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False):
    """Pure-PyTorch SSD scan, same arguments as mamba-ssm's ``mamba_chunk_scan_combined``.

    x (b, l, h, p) · dt (b, l, h) raw · A (h,) · B, C (b, l, g, n) · D (h,) or (h, p) · z (b, l, h, p)
    · dt_bias (h,) · initial_states (b, h, p, n). chunk_size is accepted for the signature; the torch
    path uses TORCH_CHUNK (the result is the same for any chunk length). Returns y (b, l, h, p) in
    x's dtype, and the final state (b, h, p, n) in fp32 (or wider) if ``return_final_states``.
    """
    bsz, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    r = nheads // ngroups
    f = torch.promote_types(x.dtype, torch.float32)   # fp32 accumulation (fp64 stays fp64 for gradcheck)
    delta = step_size(dt, dt_bias, dt_softplus, dt_limit, f)                        # (b, l, h)
    t_len = max(1, min(TORCH_CHUNK, length))            # a short call (a streamed chunk) pads nothing
    n_chunks = -(-length // t_len)
    pad = n_chunks * t_len - length                     # Δ = 0 on padding: no decay, no input
    xs = F.pad(x.to(f), (0, 0, 0, 0, 0, pad)).view(bsz, n_chunks, t_len, ngroups, r, headdim).permute(0, 1, 3, 4, 2, 5)
    ds = F.pad(delta, (0, 0, 0, pad)).view(bsz, n_chunks, t_len, ngroups, r).permute(0, 1, 3, 4, 2)
    Bs, Cs = (F.pad(t.to(f), (0, 0, 0, 0, 0, pad)).view(bsz, n_chunks, t_len, ngroups, dstate).transpose(2, 3)
              for t in (B, C))                                                      # (b, c, g, T, n)
    As = A.to(f).view(ngroups, r)
    if initial_states is None:
        state = torch.zeros(bsz, ngroups, r, headdim, dstate, dtype=f, device=x.device)
    else:
        state = initial_states.to(f).view(bsz, ngroups, r, headdim, dstate)
    per_chunk = bsz * nheads * max(t_len * t_len, headdim * dstate)
    budget = _BLOCK_ELEMS * (_GPU_BLOCK_FACTOR if x.is_cuda else 1)
    step = max(1, budget // per_chunk)
    ys = [xs.new_zeros(bsz, 0, ngroups, r, t_len, headdim)]                          # (no token: empty y)
    for c0 in range(0, n_chunks, step):
        sl = slice(c0, c0 + step)
        y, state = _chunk_block(xs[:, sl], ds[:, sl], As, Bs[:, sl], Cs[:, sl], state)
        ys.append(y)
    y = torch.cat(ys, dim=1).permute(0, 1, 4, 2, 3, 5).reshape(bsz, n_chunks * t_len, nheads, headdim)[:, :length]
    out = _skip_and_gate(y, x, D, z).to(x.dtype)
    if return_final_states:
        return out, state.view(bsz, nheads, headdim, dstate)
    return out


def _skip_and_gate(y, x, D, z):
    """y + D x (D per head (h,) or per channel (h, p)), gated by SiLU(z) if given."""
    if D is not None:
        Df = D.to(y.dtype)
        y = y + x.to(y.dtype) * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


INT32_MAX = 2**31 - 1


def max_offset(t: torch.Tensor) -> int:
    """Largest element offset a kernel computes into t from its strides."""
    return sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)


def conv_input(t: torch.Tensor) -> torch.Tensor | None:
    """t (b, d, l) as causal-conv1d's kernel accepts it, or None where even a copy would not do (run the
    conv in torch then). The kernel reads a channel-last view (stride(1) == 1 and stride(2) > 1: a view into
    in_proj's rows) only when d, stride(0) and stride(2) are multiples of 8 (in_proj rows of 1,028 broke
    this on the H200), and it adds each stride term in uint32 (offsets kept under 2³¹ here). Otherwise a
    channel-first copy with canonical strides (``.contiguous()`` would keep the strides of size-1 dims)."""
    last = t.stride(1) == 1 and t.stride(2) > 1
    if max_offset(t) <= INT32_MAX and not (last and (t.shape[1] % 8 or t.stride(0) % 8 or t.stride(2) % 8)):
        return t
    t = t.clone(memory_format=torch.contiguous_format)
    return t if max_offset(t) <= INT32_MAX else None


def kernel_segment(x, B, chunk_size) -> int:
    """Tokens per SSD kernel call. mamba-ssm's Triton kernels index in int32 (pid · chunk · stride,
    no int64 cast): every tensor they touch (inputs, out, the chunk states) must stay under 2³¹
    elements, or they read out of bounds (the 130m shape's in_proj rows passes it at 640K tokens)."""
    bsz, _, nheads, headdim = x.shape
    row = max(nheads * headdim, B.shape[2] * B.shape[3], -(-nheads * headdim * B.shape[3] // chunk_size))
    return max(chunk_size, INT32_MAX // (bsz * row) // chunk_size * chunk_size)


def _kernel_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit):
    """One kernel call; states in fp32 (the kernel passes states in fp32 and returns them in C's dtype)."""
    if initial_states is not None:
        initial_states = initial_states.to(torch.promote_types(initial_states.dtype, torch.float32)).contiguous()
    y, last = kernels.mamba_chunk_scan_combined(
        x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
        dt_softplus=dt_softplus, dt_limit=tuple(dt_limit), return_final_states=True)
    return y, last.to(torch.promote_types(last.dtype, torch.float32))


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False, backend="auto"):
    """Dispatcher: mamba-ssm's ``mamba_chunk_scan_combined`` (Triton) when allowed and possible,
    else ``ssd_scan_ref``. Both take an initial state, so a continued scan needs no correction.
    On the kernel, a sequence whose tensors pass int32 offsets runs in segments (``kernel_segment``
    tokens, compact copies), each continuing from the previous one's final state: exact."""
    if not kernels.use_ssd_kernels(backend, x):
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                            dt_limit, return_final_states)
    seg = kernel_segment(x, B, chunk_size)
    if x.shape[1] <= seg and all(max_offset(t) <= INT32_MAX for t in (x, dt, B, C, z) if t is not None):
        y, last = _kernel_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus, dt_limit)
    else:
        ys, last = [], initial_states
        for s in range(0, x.shape[1], seg):
            part = [None if t is None else t[:, s:s + seg].contiguous() for t in (x, dt, B, C, z)]
            y, last = _kernel_scan(part[0], part[1], A, part[2], part[3], chunk_size, D, part[4], dt_bias,
                                   last, dt_softplus, dt_limit)
            ys.append(y)
        y = torch.cat(ys, dim=1)
    return (y, last) if return_final_states else y


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """One recurrent step. state (b, h, p, n) fp32, updated in place; x (b, h, p); dt (b, h) raw;
    B, C (b, g, n). Returns y (b, h, p) in fp32 (D term included, no gate)."""
    bsz, nheads, headdim = x.shape
    ngroups = B.shape[1]
    f = state.dtype
    delta = step_size(dt, dt_bias, dt_softplus, dt_limit, f)                        # (b, h)
    Bh = B.to(f).repeat_interleave(nheads // ngroups, dim=1)                        # (b, h, n)
    Ch = C.to(f).repeat_interleave(nheads // ngroups, dim=1)
    xf = x.to(f)
    dA = torch.exp(delta * A.to(f))                                                 # (b, h)
    state.mul_(dA[:, :, None, None]).add_((delta[:, :, None] * xf)[..., None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    return _skip_and_gate(y, xf, D, None)
