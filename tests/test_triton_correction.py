"""The fused Triton initial-state correction equals the torch reference (computed in fp64).

Runs on a GPU, or on CPU in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which must
be set before Triton compiles anything; ~40 s on 2 cores). requirements-dev.txt installs Triton on
Linux for this (torch's CPU wheel does not bring it); skipped where it is not installed.
"""
import pytest
import torch
from tests.helpers import run_in_interpreter

pytest.importorskip("triton")



def check(device: str, d: int = 37, l: int = 5000) -> None:
    """Kernel vs fp64 reference for b = 2 rows of d channels (not a multiple of BLOCK_D = 16) and l
    tokens (segments of SEG = 2048: 5000 and 4200 give 3, the last partial)."""
    from modules.selective_scan import initial_state_correction as reference
    from modules.triton_correction import initial_state_correction

    g = torch.Generator().manual_seed(0)
    b, n = 2, 16
    for dt_dtype, softplus in ((torch.float32, True), (torch.bfloat16, True), (torch.float32, False)):
        raw = torch.randn(b, l, d, generator=g) * 2 - 3            # dt before bias: softplus spans ~1e-4..1
        delta = (raw if softplus else torch.nn.functional.softplus(raw)).to(dt_dtype).transpose(1, 2)  # strided
        bias = torch.randn(d, generator=g) * 0.5 if softplus else None
        A = -torch.exp(torch.randn(d, n, generator=g))               # decay rates from ~0.05 to ~20
        C = torch.randn(b, l, n, generator=g).transpose(1, 2)          # a strided view, as from x_proj
        h0 = torch.randn(b, d, n, generator=g)
        ref_dy, ref_decay = reference(delta.double(), A.double(), C.double(), h0.double(),
                                      None if bias is None else bias.double(), softplus)
        dy, decay = initial_state_correction(*(t if t is None else t.to(device) for t in (delta, A, C, h0, bias)),
                                             delta_softplus=softplus)
        assert dy.dtype == decay.dtype == torch.float32
        # fp32 sums of up to 5000 steps in another order than the reference's: the exponents A·cum agree
        # to ~1e-6 relative, so each term (≤ |C h0|) agrees to ~1e-5 relative; 1e-4 leaves a 10x margin.
        torch.testing.assert_close(dy.cpu().double(), ref_dy, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(decay.cpu().double(), ref_decay, rtol=1e-4, atol=1e-6)
        assert ref_dy[:, :, :50].abs().max() > 1           # the test has something to compare
        print("ok", dt_dtype, softplus)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU (the interpreter test covers CPU)")
def test_triton_correction_gpu():
    check("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test runs the compiled kernels")
def test_triton_correction_interpreter():
    # 20 channels and 4200 tokens: the same cases (a partial channel block, 3 segments, the last
    # partial) in 12 programs instead of 18, so the interpreter takes ~35 s instead of ~55 s
    out = run_in_interpreter("test_triton_correction", "check('cpu', 20, 4200)", timeout=600)
    assert out.count("ok") == 3
