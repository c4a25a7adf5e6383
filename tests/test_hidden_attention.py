"""Hidden attention: α u + D u reproduces the selective scan; the map is causal and stable."""
import torch

from modules.hidden_attention import default_channels, hidden_attention, log_normalized, scan_from_attention
from modules.selective_scan import selective_scan_sequential


def _inputs(e=6, n=4, length=70, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    delta = torch.nn.functional.softplus(torch.randn(e, length, generator=g, dtype=torch.float64)) * scale
    A = -torch.rand(e, n, generator=g, dtype=torch.float64) * 3 - 0.1
    B, C = torch.randn(n, length, generator=g, dtype=torch.float64), torch.randn(n, length, generator=g, dtype=torch.float64)
    u, D = torch.randn(e, length, generator=g, dtype=torch.float64), torch.randn(e, generator=g, dtype=torch.float64)
    return delta, A, B, C, u, D


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
