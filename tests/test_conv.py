"""modules/conv.causal_conv (the mixers' convolution on the CPU path) against the convolution it replaces."""
import pytest
import torch
import torch.nn as nn


@pytest.mark.parametrize("k,prev,bias", [(4, 0, True), (4, 3, True), (4, 7, False), (2, 1, True), (1, 0, True)])
def test_causal_conv_equals_the_padded_convolution(k, prev, bias):
    # values and gradients (input, weight, bias) of nn.Conv1d(groups=e, padding=k-1)(x)[..., prev:prev+length]:
    # fp64, so the two summation orders agree to rounding (1e-12 relative to values of order 1)
    from modules.conv import causal_conv

    torch.manual_seed(0)
    e, length = 6, 11
    conv = nn.Conv1d(e, e, k, groups=e, padding=k - 1, bias=bias).double()
    x = torch.randn(2, e, prev + length, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, e, length, dtype=torch.float64)
    res = []
    for fn in (lambda: conv(x)[..., prev:prev + length], lambda: causal_conv(x, conv, prev, length)):
        x.grad = None
        conv.zero_grad()
        y = fn()
        (y * g).sum().backward()
        res.append([y.detach(), x.grad.clone(), conv.weight.grad.clone()] + ([conv.bias.grad.clone()] if bias else []))
    for want, got in zip(*res):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() < 1e-12


def test_half_precision_rounds_once():
    # bf16 on CPU: the sum of the d_conv products is formed in fp32 and rounded once, so each output is
    # within bf16's unit roundoff (2^-8 relative: 8 significand bits) of the exact result of its bf16 inputs
    # (fp64 reference; fp32's own error, ~1e-7, is far below it)
    from modules.conv import causal_conv

    torch.manual_seed(1)
    conv = nn.Conv1d(64, 64, 4, groups=64, padding=3).to(torch.bfloat16)
    x = torch.randn(2, 64, 300).to(torch.bfloat16)
    got = causal_conv(x, conv, 0, 300)
    exact = nn.functional.conv1d(x.double(), conv.weight.double(), conv.bias.double(), padding=3, groups=64)[..., :300]
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-30).all()
