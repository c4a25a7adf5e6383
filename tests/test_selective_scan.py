"""The chunked torch scan against a per-token oracle, forward and backward."""
import pytest
import torch

import modules.selective_scan as ss
from modules.selective_scan import selective_scan_ref, selective_scan_sequential


def _inputs(b, d, l, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(u=r(b, d, l), delta=r(b, d, l), A=-torch.rand(d, n, generator=g, dtype=dtype) * 4,
                B=r(b, n, l), C=r(b, n, l), D=r(d), z=r(b, d, l), delta_bias=r(d), initial_state=r(b, d, n))


def _run(fn, inp, grads):
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    out, last = fn(**leaves, delta_softplus=True, return_last_state=True)
    ((out * grads[0]).sum() + (last * grads[1]).sum()).backward()
    return out, last, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("length", [1, 7, 64, 301])
@pytest.mark.parametrize("block_elems", [None, 2 * 6 * 3 * 40])   # one block, or the 128-token floor (3 blocks at 301)
def test_ref_equals_sequential_fp64(length, block_elems, monkeypatch):
    # fp64 isolates the algorithm from rounding: both must agree to ~1e-12.
    if block_elems:
        monkeypatch.setattr(ss, "_BLOCK_ELEMS", block_elems)
    inp = _inputs(2, 6, length, 3, torch.float64)
    grads = (torch.randn(2, 6, length, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64))
    o1, l1, g1 = _run(selective_scan_ref, inp, grads)
    o2, l2, g2 = _run(selective_scan_sequential, inp, grads)
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-10)
    for k in inp:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-9, atol=1e-9, msg=f"grad of {k}")


def test_ref_equals_sequential_fp32():
    # fp32: the two summation orders differ; rtol 6e-4 / atol 2e-3 is the fp32 budget used by
    # mamba-ssm's own tests for length ~1e3 recurrences (gradients: 5x looser, they sum over l).
    inp = _inputs(1, 16, 1000, 8, torch.float32, seed=1)
    grads = (torch.randn(1, 16, 1000), torch.randn(1, 16, 8))
    o1, l1, g1 = _run(selective_scan_ref, inp, grads)
    o2, l2, g2 = _run(selective_scan_sequential, inp, grads)
    torch.testing.assert_close(o1, o2, rtol=6e-4, atol=2e-3)
    for k in inp:
        torch.testing.assert_close(g1[k], g2[k], rtol=3e-3, atol=1e-2, msg=f"grad of {k}")


def test_gradcheck_small():
    inp = _inputs(1, 3, 9, 2, torch.float64, seed=2)
    keys = list(inp)

    def f(*args):
        return selective_scan_ref(**dict(zip(keys, args)), delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, tuple(v.clone().requires_grad_() for v in inp.values()))


def test_bf16_input_keeps_dtype_and_fp32_state():
    inp = _inputs(1, 4, 33, 2, torch.float32)
    inp16 = {k: (v.bfloat16() if k in ("u", "delta", "z") else v) for k, v in inp.items()}
    out, last = selective_scan_ref(**inp16, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref = selective_scan_ref(**{k: (v.bfloat16().float() if k in ("u", "delta", "z") else v) for k, v in inp.items()},
                             delta_softplus=True)
    # only the final rounding to bf16 differs: half a bf16 ulp (2^-8 relative)
    torch.testing.assert_close(out.float(), ref, rtol=2**-8, atol=1e-5)


def test_extreme_decay_is_finite():
    # Δ·A of -1e4 underflows exp to 0: must give finite values, not inf/nan.
    inp = _inputs(1, 4, 200, 2, torch.float32)
    inp["delta"] = inp["delta"].abs() * 2000
    out = selective_scan_ref(**inp, delta_softplus=True)
    assert torch.isfinite(out).all()


def test_kernel_dispatch_initial_state_correction(monkeypatch):
    # The Mamba-1 kernel takes no initial state: the dispatcher adds the exact correction term.
    # Stand in for the kernel with the torch path at zero state, then compare with the torch path
    # given the state directly (fp64: the two are algebraically equal).
    import modules.kernels as K
    from modules.selective_scan import selective_scan

    def fake_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    monkeypatch.setattr(K, "selective_scan_fn", fake_kernel)
    monkeypatch.setattr(K, "use_kernels", lambda backend, t: True)
    inp = _inputs(2, 5, 77, 3, torch.float64, seed=4)
    got, got_last = selective_scan(**inp, delta_softplus=True, return_last_state=True)
    want, want_last = selective_scan_ref(**inp, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_last, want_last, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_initial_state_correction_stops_where_every_term_underflows(dtype):
    # The correction skips positions where exp(cum·A) is exactly 0 in the dtype; the result must be
    # identical (not merely close) to computing every position, and the skipped part non-empty.
    from modules.selective_scan import initial_state_correction

    g = torch.Generator().manual_seed(7)
    b, e, n, length = 2, 6, 4, 4000
    delta = torch.rand(b, e, length, generator=g, dtype=dtype) * 2            # Σ Δ grows ~1 per token
    A = -torch.rand(e, n, generator=g, dtype=dtype) - 0.5
    C = torch.randn(b, n, length, generator=g, dtype=dtype)
    h0 = torch.randn(b, e, n, generator=g, dtype=dtype)
    dy, decay = initial_state_correction(delta, A, C, h0)
    cum = torch.cumsum(delta, dim=-1)
    full = torch.einsum("beln,bnl->bel", torch.exp(cum[..., None] * A[None, :, None, :]) * h0[:, :, None], C)
    assert torch.equal(dy, full)
    assert (dy[..., :20] != 0).all() and (dy[..., -length // 4:] == 0).all()
    assert torch.equal(decay, torch.exp(cum[:, :, -1, None] * A[None]))


def test_kernel_dispatch_hands_the_kernel_aligned_rows(monkeypatch):
    # mamba-ssm's scan kernel vector-loads rows assuming 16-byte alignment (it only checks
    # stride(-1) == 1): the dispatcher must copy a view such as x[..., 3:] and pass aligned
    # tensors through untouched.
    import modules.kernels as K
    from modules.selective_scan import selective_scan

    seen = {}

    def fake_kernel(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
        seen.update(u=u, delta=delta, z=z)
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    monkeypatch.setattr(K, "selective_scan_fn", fake_kernel)
    monkeypatch.setattr(K, "use_kernels", lambda backend, t: True)
    inp = _inputs(2, 4, 64, 3, torch.float32, seed=5)
    inp.pop("initial_state")                                        # the plain kernel call, no correction term
    wide = torch.randn(2, 4, 67)
    inp["u"] = wide[..., 3:]                                        # rows start 12 bytes in
    want = selective_scan_ref(**inp, delta_softplus=True)
    got = selective_scan(**inp, delta_softplus=True)
    assert torch.equal(got, want)
    assert seen["u"].data_ptr() % 16 == 0 and seen["u"].is_contiguous() and torch.equal(seen["u"], inp["u"])
    assert seen["delta"] is inp["delta"]                            # already aligned: no copy


def test_double_backward_equals_the_per_token_loop():
    # a gradient of a gradient (create_graph=True) through the pure-PyTorch scan: its in-place steps are
    # skipped while autograd records (out= has no derivative); fp64 against the per-token loop
    from modules.selective_scan import selective_scan_ref, selective_scan_sequential

    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 4, 40, generator=g, dtype=torch.float64)
    dt = torch.rand(1, 4, 40, generator=g, dtype=torch.float64)
    A = -torch.rand(4, 3, generator=g, dtype=torch.float64)
    B, C = torch.randn(1, 3, 40, generator=g, dtype=torch.float64), torch.randn(1, 3, 40, generator=g, dtype=torch.float64)
    res = []
    for fn in (selective_scan_ref, selective_scan_sequential):
        x = u.clone().requires_grad_()
        first, = torch.autograd.grad((fn(x, dt, A, B, C) ** 2).sum(), x, create_graph=True)
        second, = torch.autograd.grad((first ** 2).sum(), x)
        res.append(second)
    torch.testing.assert_close(res[0], res[1], rtol=1e-9, atol=1e-12)    # fp64, sums in another order
