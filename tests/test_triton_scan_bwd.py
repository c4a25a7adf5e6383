"""The Triton selective-scan backward (modules/triton_scan_bwd.py): gradients equal those of an fp64
per-token loop differentiated by autograd (selective_scan_sequential), for every input.

On CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1), on small
shapes that reach every path: partial channel blocks, padded state sizes (n = 5), the model's strides,
with and without an initial state and a gradient on the last state, channels taken in several
slices (a small scratch bound), the sequence cut into chunks (1-token last chunk, more
chunks than the carry kernel's unrolled step) with and without slices, and the dispatcher's route for a call that wants a gradient. On a
GPU: the compiled kernels against the pure-PyTorch scan at 4K tokens, and a model's training step.
Tolerance: fp32 state and sums in another order against fp64; observed <= 4e-7 of each gradient's
largest value in the interpreter, 1e-5 is a 25x margin.
"""
import functools
import os

import pytest
import torch

from tests.conftest import requires_cuda
from tests.helpers import run_in_interpreter

pytest.importorskip("triton")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(b, d, l, n, dtype, h0=True, layout="model", device="cpu"):
    """Inputs with the strides the model produces (Δ channel-contiguous, B and C views into x_proj's
    output, z a slice of in_proj's) or all contiguous; drawn in fp64, then cast (same values per dtype)."""
    g = torch.Generator().manual_seed(1)

    def r(*s, sc=1.0, sh=0.0):
        return (torch.randn(*s, generator=g, dtype=torch.float64) * sc + sh).to(device, dtype)

    x_dbl = r(b, l, 8 + 2 * n)
    out = dict(u=r(b, d, l), delta=r(b, l, d, sc=0.5, sh=-2.0).transpose(1, 2), A=-torch.exp(r(d, n)),
               B=x_dbl[..., 8:8 + n].transpose(1, 2), C=x_dbl[..., 8 + n:].transpose(1, 2), D=r(d),
               z=r(b, 2 * d, l)[:, d:], delta_bias=r(d, sc=0.3), initial_state=r(b, d, n) if h0 else None)
    if layout == "contiguous":
        out = {k: None if v is None else v.contiguous() for k, v in out.items()}
    return out


def grads(fn, inp, last_grad):
    """Gradients of a fixed random projection of (out, last state) with respect to every input."""
    inp = {k: None if v is None else torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v).requires_grad_()
           for k, v in inp.items()}                                       # leaves with the model's strides
    out, last = fn(**inp, delta_softplus=True, return_last_state=True)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)).sum()
    if last_grad:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=torch.float64).to(last)).sum()
    loss.backward()
    return {k: v.grad for k, v in inp.items() if v is not None} | {"out": out.detach(), "last": last.detach()}


def assert_close_to_oracle(got, want, rel=1e-5):
    for k, w in want.items():
        assert w.abs().max() > 0, k                                        # something to compare
        err = ((got[k].double().cpu() - w.cpu()).abs().max() / w.abs().max()).item()
        assert err < rel, (k, err)


# (name, shape (b, d, l, n), initial state, gradient on the last state, layout, scratch bound in bytes,
#  tokens per chunk: None = one chunk, as the CPU plans it)
CASES = [
    ("model_strides_h0_last", (2, 24, 37, 16), True, True, "model", None, None),
    ("contiguous_n5_no_h0", (1, 20, 21, 5), False, False, "contiguous", None, None),
    ("three_channel_slices", (2, 72, 19, 8), True, True, "model", 2 * 19 * 8 * 4 * 32, None),   # 32, 32, 8 channels
    ("three_blocks_one_slice", (2, 72, 13, 8), True, True, "model", None, None),               # gB/gC: 3 blocks' sums
    ("chunks_h0_last", (2, 24, 37, 16), True, True, "model", None, 16),                        # 16, 16, 5 tokens
    ("six_chunks_last_no_h0", (1, 20, 21, 5), False, True, "contiguous", None, 4),             # carry: 2 unrolled steps
    ("chunks_and_slices", (2, 72, 19, 8), True, False, "model", 2 * 19 * 8 * 4 * 32, 8),       # 8, 8, 3 tokens
]


def check_interpreter():
    """Run in a process with TRITON_INTERPRET=1; prints 'ok <name>' per passing case."""
    from modules import selective_scan as ss
    from modules import triton_scan_bwd

    bwd = triton_scan_bwd.scan_backward
    for name, (b, d, l, n), h0, last_grad, layout, scratch, chunk in CASES:
        triton_scan_bwd.scan_backward = functools.partial(bwd, scratch_bytes=scratch or triton_scan_bwd.SCRATCH_BYTES,
                                                          chunk=chunk)
        want = grads(ss.selective_scan_sequential, make_inputs(b, d, l, n, torch.float64, h0, layout), last_grad)
        got = grads(ss.selective_scan_triton, make_inputs(b, d, l, n, torch.float32, h0, layout), last_grad)
        assert_close_to_oracle(got, want)
        print("ok", name, flush=True)
    # the dispatcher: DECIMAMBA_SCAN=triton and a gradient wanted -> the Triton forward and backward
    # (its CUDA check stood in for: the interpreter runs on CPU tensors)
    os.environ["DECIMAMBA_SCAN"] = "triton"
    ss._triton_trains = lambda u, A, B, C: True
    inp = {k: v.requires_grad_() for k, v in make_inputs(1, 16, 9, 4, torch.float32).items()}
    out = ss.selective_scan(**inp, delta_softplus=True)
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    assert any("TritonScanFn" in type(fn).__name__ for fn in seen), [type(f).__name__ for f in seen]
    print("ok dispatcher", flush=True)
    # called directly as autograd never does: no initial state and no gradient on the last state (None,
    # not zeros: the kernels' HAS_H0/HAS_GLAST=False branches), in 3 chunks, against autograd of an fp64 loop
    g = torch.Generator().manual_seed(2)
    b, d, l, n = 2, 40, 23, 4
    u, dt = torch.randn(b, d, l, generator=g, dtype=torch.float64), torch.rand(b, d, l, generator=g, dtype=torch.float64)
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 2
    B, C = torch.randn(b, n, l, generator=g, dtype=torch.float64), torch.randn(b, n, l, generator=g, dtype=torch.float64)
    gy = torch.randn(b, d, l, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (u, dt, A, B, C)]
    h, ys = torch.zeros(b, d, n, dtype=torch.float64), []
    for t in range(l):
        h = torch.exp(leaves[1][:, :, t, None] * leaves[2]) * h + (leaves[1][:, :, t] * leaves[0][:, :, t])[..., None] * leaves[3][:, None, :, t]
        ys.append((h * leaves[4][:, None, :, t]).sum(-1))
    want = torch.autograd.grad((torch.stack(ys, 2) * gy).sum(), leaves)
    got = bwd(*(t.float() for t in (u, dt, A, B, C)), None, gy.float(), None, chunk=8)
    assert got[5] is None
    for name, w, v in zip(("u", "delta", "A", "B", "C"), want, got):
        err = ((v.double() - w).abs().max() / w.abs().max()).item()
        assert err < 1e-5, (name, err)
    print("ok direct_no_h0_no_glast", flush=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_triton_scan_backward_interpreter():
    out = run_in_interpreter("test_triton_scan_bwd", "check_interpreter()")
    assert out.count("ok ") == len(CASES) + 2, out


def test_chunk_plan_fills_the_warp_slots():
    # tokens per chunk: whole where batch x channel blocks fill the slots, else enough chunks to (values by hand)
    from modules.triton_scan_bwd import MIN_CHUNK, plan_chunk

    assert plan_chunk(0, 2048, 2112) == 2048          # an empty batch: nothing to cut
    assert plan_chunk(4000, 2048, 2112) == 2048       # enough programs: one chunk
    assert plan_chunk(896, 2048, 2112) == 688         # our LM's training shape on an H200 (32 x 28 blocks of 16
                                                      # channels, 2,112 slots): 3 chunks
    assert plan_chunk(1, 100, 2112) == MIN_CHUNK      # no chunk below MIN_CHUNK tokens
    assert plan_chunk(10, 50, 2112) == 50             # a sequence shorter than that stays whole
    assert plan_chunk(50, 4100, 2112) == 96           # the GPU test below: 43 chunks

@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("h0,chunk", [(False, None), (True, None), (True, 4100)],
                         ids=["zero-state", "initial-state", "initial-state-one-chunk"])
def test_compiled_backward_equals_torch_scan(monkeypatch, h0, chunk):
    # the compiled kernels against the pure-PyTorch scan (itself checked against the fp64 loop on CPU),
    # fp32, 4,100 tokens (not a multiple of any block), the model's strides; the planned chunks (43 on
    # an H200: 2 rows x 25 blocks of 8 channels) and one chunk
    from modules import triton_scan_bwd
    from modules.selective_scan import selective_scan_ref, selective_scan_triton

    inp = make_inputs(2, 200, 4100, 16, torch.float32, h0, device="cuda")
    if chunk:
        monkeypatch.setattr(triton_scan_bwd, "scan_backward", functools.partial(triton_scan_bwd.scan_backward, chunk=chunk))
    got = grads(selective_scan_triton, inp, h0)
    want = grads(selective_scan_ref, inp, h0)
    assert_close_to_oracle(got, want, rel=1e-4)     # fp32 both; sums over 4K tokens in different orders


@requires_cuda
@pytest.mark.gpu
def test_training_step_on_triton_equals_torch_path(monkeypatch):
    # one model's loss and gradients with DECIMAMBA_SCAN=triton (no mamba-ssm needed) against the torch path
    from models import DecimatingMambaModel, MambaConfig

    model = DecimatingMambaModel(MambaConfig(d_model=128, n_layer=2, vocab_size=1000)).cuda()
    for layer in model.backbone.layers:
        layer.mixer.use_fast_path = False           # else mamba-ssm's fused kernel, where installed, skips the scan
    ids = torch.randint(0, 1000, (2, 2048), device="cuda")
    res = {}
    for impl, backend in (("triton", "auto"), ("torch", "torch")):
        monkeypatch.setenv("DECIMAMBA_SCAN", impl)
        model.zero_grad()
        model.set_backend(backend)
        loss = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1).float(), ids.flatten())
        loss.backward()
        res[impl] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(res["triton"][0] - res["torch"][0]) < 1e-4 * abs(res["torch"][0])
    for n, g in res["torch"][1].items():
        err = ((res["triton"][1][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < 1e-3, (n, err)                 # relative norm; sums over 4K tokens, 2 layers


@pytest.mark.parametrize("backend,device,scan,kernels,want", [
    ("torch", "cuda", "triton", True, "torch"),
    ("auto", "cpu", "triton", True, "torch"),
    ("auto", "cuda", "triton", False, "triton_scan"),
    ("auto", "cuda", "triton", True, "kernel+triton_scan"),
    ("auto", "cuda", "", True, "kernel"),
    ("auto", "cuda", "", False, "triton_scan"),      # the default without mamba-ssm: Triton's scan (cuda_scan)
    ("auto", "cuda", "auto", False, "triton_scan"),
    ("auto", "cuda", "torch", False, "torch"),
    ("kernel", "cuda", "", False, "kernel"),         # asked for mamba-ssm's kernels: never relabelled Triton
])
def test_results_name_the_scan_that_ran(monkeypatch, backend, device, scan, kernels, want):
    # a record's "backend" must say when the Triton scan ran instead of mamba-ssm's or the torch path
    from engine.evaluate import resolved_backend
    from modules import kernels as kmod

    monkeypatch.setenv("DECIMAMBA_SCAN", scan)
    monkeypatch.setattr(kmod, "HAS_KERNELS", kernels)
    assert resolved_backend(backend, device) == want


@pytest.mark.parametrize("scan,d_state,dtype,triton,want", [
    ("", 16, torch.float32, True, "triton_scan"),
    ("", 128, torch.float32, True, "torch"),         # the Triton scan takes d_state <= 64: the torch scan runs
    ("", 16, torch.float64, True, "torch"),          # nor float64
    ("triton", 16, torch.bfloat16, False, "torch"),  # asked for, but Triton does not import
])
def test_labels_follow_what_the_triton_scan_takes(monkeypatch, scan, d_state, dtype, triton, want):
    from engine.evaluate import resolved_backend
    from modules import kernels as kmod
    from modules import selective_scan as ss

    monkeypatch.setenv("DECIMAMBA_SCAN", scan)
    monkeypatch.setattr(kmod, "HAS_KERNELS", False)
    monkeypatch.setattr(ss, "_triton_scan", lambda: object() if triton else None)
    assert resolved_backend("auto", "cuda", False, d_state, dtype) == want


@pytest.mark.parametrize("backend,device,ssd,conv,want", [
    ("auto", "cuda", True, True, "kernel"),
    ("auto", "cuda", True, False, "ssd_kernel"),      # mamba-ssm's SSD kernels, the conv in torch
    ("auto", "cuda", False, True, "torch"),
    ("auto", "cpu", True, True, "torch"),
    ("torch", "cuda", True, True, "torch"),
])
def test_mamba2_results_name_the_kernels_that_ran(monkeypatch, backend, device, ssd, conv, want):
    # Mamba-2 layers use mamba-ssm's SSD kernels (with or without causal-conv1d), not the Mamba-1 kernels
    from engine.evaluate import resolved_backend
    from modules import kernels as kmod

    monkeypatch.setattr(kmod, "HAS_KERNELS", False)           # no Mamba-1 kernels: must not decide a Mamba-2 label
    monkeypatch.setattr(kmod, "_ssd_kernels", lambda: (object(), object(), None) if ssd else (None, None, "ImportError"))
    monkeypatch.setattr(kmod, "causal_conv1d_fn", object() if conv else None)
    assert resolved_backend(backend, device, mamba2=True) == want
