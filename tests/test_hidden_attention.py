"""Hidden attention: α u + D u reproduces the selective scan; the map is causal, exact and stable."""
import math

import pytest
import torch

from modules.hidden_attention import (default_channels, hidden_attention, log_normalized, scan_from_attention,
                                      ssd_hidden_attention)
from modules.selective_scan import selective_scan_sequential


def _inputs(e=6, n=4, length=70, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.nn.functional.softplus(torch.randn(e, length, generator=g, dtype=torch.float64)) * scale
    A = -torch.rand(e, n, generator=g, dtype=torch.float64) * 3 - 0.1
    B, C = torch.randn(n, length, generator=g, dtype=torch.float64), torch.randn(n, length, generator=g, dtype=torch.float64)
    u, D = torch.randn(e, length, generator=g, dtype=torch.float64), torch.randn(e, generator=g, dtype=torch.float64)
    return delta, A, B, C, u, D


def _naive_loops(delta, A, B, C, channels):
    """α[c, i, j] = Σ_n C_i[n] · exp(A[n] · Σ_{j<k<=i} Δ_k) · Δ_j · B_j[n], in Python floats (float64), one entry at a time."""
    d, a, b, c = delta.tolist(), A.tolist(), B.T.tolist(), C.T.tolist()
    length = len(d[0])
    out = torch.zeros(len(channels), length, length, dtype=torch.float64)
    for k, ch in enumerate(channels):
        for i in range(length):
            for j in range(i + 1):
                gap = sum(d[ch][j + 1:i + 1])
                out[k, i, j] = sum(c[i][n] * math.exp(a[ch][n] * gap) * d[ch][j] * b[j][n] for n in range(len(a[ch])))
    return out


def _naive_dense(delta, A, B, C, channels):
    """The same formula in float64, fully materialised as (n, l, l) per channel (for lengths too long to loop)."""
    out = []
    for ch in channels:
        S = torch.cumsum(delta[ch].double(), 0)
        gap = (S[:, None] - S[None, :]).clamp_min(0)                                   # masked below
        decay = torch.exp(A[ch].double()[:, None, None] * gap[None])
        att = torch.einsum("ni,nij,nj->ij", C.double(), decay, delta[ch].double()[None] * B.double())
        out.append(att.tril())
    return torch.stack(out)


@pytest.mark.parametrize("length,block_rows", [(70, 16), (33, 8), (64, 32), (5, 64), (1, 32), (50, 1)])
def test_matches_naive_formula(length, block_rows):
    # lengths not a multiple of block_rows, block_rows < length (several row blocks), > length, 1 row per block
    delta, A, B, C, _, _ = _inputs(length=length, seed=length)
    channels = [0, 2, 5]
    ref = _naive_loops(delta, A, B, C, channels)
    att = hidden_attention(delta, A, B, C, channels=channels, block_rows=block_rows)
    assert att.dtype == torch.float32 and att.shape == (3, length, length)
    # fp32 result vs float64 reference: fp32 rounding of A, Δ, B, C and of the exponent A·gap (relative
    # error ~1e-7 · |A·gap|, |A·gap| <= ~30 where exp is not negligible) and of sums over n = 4 terms that
    # partly cancel: rtol 1e-5; atol 1e-6 · max|α| for entries that cancel to ~0.
    tol = dict(rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    torch.testing.assert_close(att.double(), ref, **tol)
    avg = hidden_attention(delta, A, B, C, channels=channels, block_rows=block_rows, average=True)
    assert avg.shape == (length, length)
    torch.testing.assert_close(avg.double(), ref.mean(0), **tol)


def test_channel_groups_match_naive_formula(monkeypatch):
    # more channels than CHANNEL_GROUP: several groups, a ragged last one, averaged across groups
    import modules.hidden_attention as ha

    monkeypatch.setattr(ha, "CHANNEL_GROUP", 2)
    delta, A, B, C, _, _ = _inputs(e=7, length=21, seed=3)
    channels = [0, 1, 3, 4, 6]
    ref = _naive_loops(delta, A, B, C, channels)
    tol = dict(rtol=1e-5, atol=1e-6 * float(ref.abs().max()))      # as test_matches_naive_formula
    torch.testing.assert_close(ha.hidden_attention(delta, A, B, C, channels, block_rows=8).double(), ref, **tol)
    torch.testing.assert_close(ha.hidden_attention(delta, A, B, C, channels, block_rows=8, average=True).double(),
                               ref.mean(0), **tol)
    with pytest.raises(ValueError, match="block_rows=0: must be >= 1"):
        ha.hidden_attention(delta, A, B, C, channels, block_rows=0)


def test_long_sequence_stable_and_exact():
    delta, A, B, C, _, _ = _inputs(length=2000, scale=5.0)                             # large Δ: S reaches thousands
    S = torch.cumsum(delta.float(), -1)
    assert float(S[:, -1].min()) > 2000
    # exp(A·S) alone underflows and exp(−A·S) overflows in fp32: a factorisation through S itself would fail
    assert float(torch.exp(A[0, :, None].float() * S[0]).min()) == 0.0
    assert torch.isinf(torch.exp(-A[0, :, None].float() * S[0])).any()
    channels = [0, 3, 5]
    att = hidden_attention(delta, A, B, C, channels=channels)                          # 2000 = 62.5 default blocks
    assert torch.isfinite(att).all() and (att.triu(1) == 0).all()
    ref = _naive_dense(delta, A, B, C, channels)
    # fp32 vs float64 as in test_matches_naive_formula; S is float64 inside hidden_attention, so the long
    # cumulative sum adds no error and the tolerance does not grow with the length
    torch.testing.assert_close(att.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_bad_channels_raise():
    delta, A, B, C, _, _ = _inputs(length=8)
    for channels in ([], [6], [-1]):
        with pytest.raises(ValueError):
            hidden_attention(delta, A, B, C, channels=channels)


def test_attention_times_input_equals_scan():
    delta, A, B, C, u, D = _inputs()
    att = hidden_attention(delta, A, B, C, channels=range(6), block_rows=16)       # several row blocks
    y_att = scan_from_attention(att, u, D)
    y_scan = selective_scan_sequential(u[None], delta[None], A, B[None], C[None], D)[0]
    # fp32 attention vs fp64 scan: fp32 rounding of sums over 70 terms
    torch.testing.assert_close(y_att.double(), y_scan, rtol=1e-4, atol=1e-4)


def test_causal_average_and_long_sequence_stability():
    delta, A, B, C, _, _ = _inputs(length=2000, scale=5.0)      # large Δ: exp(A·ΣΔ) underflows, never overflows
    att = hidden_attention(delta, A, B, C, channels=[0, 3])
    assert torch.isfinite(att).all() and (att.triu(1) == 0).all()
    avg = hidden_attention(delta, A, B, C, channels=[0, 3], average=True)
    torch.testing.assert_close(avg, att.mean(0))
    diag = torch.einsum("nl,nl->l", C.float(), delta[0].float() * B.float())  # α[i, i] = C_i·Δ_i B_i
    torch.testing.assert_close(att[0].diagonal(), diag, rtol=1e-5, atol=1e-6)


def test_log_normalized_and_channels():
    m = log_normalized(torch.tensor([[2.0, -1.0], [0.0, 1e-9]]), threshold_exp=-3)
    assert m.max() == 0 and m.min() == -3
    assert default_channels(1536) == [round(i * 1535 / 10) for i in range(11)]
    assert default_channels(4) == [0, 1, 2, 3]


def test_log_normalized_scales_magnitudes_sign_ignored():
    # |α| / max|α| as log10, floored at 10^threshold_exp: a negative entry is placed by its magnitude
    # (-1 of max 2: log10 0.5), zero and tiny entries sit at the floor. Values written out by hand.
    m = log_normalized(torch.tensor([[2.0, -1.0], [0.0, 1e-9], [-4.0, 0.04]]), threshold_exp=-2)
    want = torch.tensor([[math.log10(0.5), math.log10(0.25)], [-2.0, -2.0], [0.0, -2.0]])
    torch.testing.assert_close(m, want)          # fp32 log10 of exact ratios: default fp32 tolerance


def _ssd_recurrence(x, delta, A, B, C, D, groups):
    """Mamba-2's scan one token at a time in float64: per head h (group g = h // (heads / groups)),
    state H (p, n) <- exp(Δ_t A_h) H + Δ_t x_t B_tᵀ, y_t = H C_t + D_h x_t. x (h, p, l) -> y (h, p, l)."""
    heads, p, length = x.shape
    y = torch.zeros_like(x)
    for h in range(heads):
        g = h // (heads // groups)
        state = torch.zeros(p, B.shape[1], dtype=torch.float64)
        for t in range(length):
            state = math.exp(float(delta[h, t] * A[h])) * state + delta[h, t] * torch.outer(x[h, :, t], B[g, :, t])
            y[h, :, t] = state @ C[g, :, t] + D[h] * x[h, :, t]
    return y


@pytest.mark.parametrize("groups,heads", [(1, [0, 2, 3]), (2, [3, 0, 1])])
def test_ssd_attention_times_input_equals_mamba2_recurrence(groups, heads):
    """For each chosen head and each of its headdim channels, α_h x + D_h x is the per-token SSD recurrence;
    heads in any order, in two groups that share B and C within a group."""
    g = torch.Generator().manual_seed(5)
    nh, p, n, length = 4, 3, 5, 40
    delta = torch.nn.functional.softplus(torch.randn(nh, length, generator=g, dtype=torch.float64))
    A = -torch.rand(nh, generator=g, dtype=torch.float64) * 2 - 0.1
    B, C = (torch.randn(groups, n, length, generator=g, dtype=torch.float64) for _ in range(2))
    x, D = torch.randn(nh, p, length, generator=g, dtype=torch.float64), torch.randn(nh, generator=g, dtype=torch.float64)
    want = _ssd_recurrence(x, delta, A, B, C, D, groups)
    att = ssd_hidden_attention(delta, A, B, C, heads, block_rows=16)                 # (3, l, l), several row blocks
    assert att.shape == (3, length, length) and (att.triu(1) == 0).all()
    for k, h in enumerate(heads):
        got = torch.einsum("ij,pj->pi", att[k].double(), x[h]) + D[h] * x[h]
        # fp32 attention vs the fp64 recurrence: fp32 rounding of sums over 40 terms
        torch.testing.assert_close(got, want[h], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ssd_hidden_attention(delta, A, B, C, heads, average=True), att.mean(0))
    with pytest.raises(ValueError, match="heads must be"):
        ssd_hidden_attention(delta, A, B, C, [nh])
