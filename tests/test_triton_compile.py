"""Every Triton kernel compiles for the H200 (sm_90) as its wrapper launches it, on a CPU machine:
benchmarks/triton_resources.py records the wrappers' launches on CPU tensors and compiles each with
Triton's ptxas. The interpreter tests (test_triton_*.py) check the values but never compile; this
catches what only the compiler rejects (types of loop-carried values, branch mismatches) before a
GPU session, and spills in the backward (a register-footprint regression: those kernels were written
to fit in registers, and plan_chunk's occupancy assumes it). Triton is pinned in requirements-dev.txt:
another version may allocate registers otherwise.
"""
import pytest
import torch

pytest.importorskip("triton")
try:
    from triton._C.libtriton import native_specialize_impl  # noqa: F401  (the JIT's specialisation, Triton >= 3.9)
except ImportError:
    pytest.skip("this Triton has no native_specialize_impl to specialise launches as its JIT does",
                allow_module_level=True)
from benchmarks import triton_resources as tr  # noqa: E402

LAUNCHES = tr.launches() if not torch.cuda.is_available() else []


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real in the GPU tests")
def test_every_launch_is_recorded():
    # the seven cases' launches as planned for an H200: the forward twice in chunks (pass 1, carry, pass 3) and
    # once in one chunk (bf16: its never-read chunk-state load is typed as the state, fp32),
    # the backward twice in chunks (pass 1, carry, pass 4, carry, pass 3, pass 5) and once whole, the correction
    kinds = [fn.__name__ for _, fn, _ in LAUNCHES]
    assert kinds.count("_scan_kernel") == 5 and kinds.count("_carry_kernel") == 6
    assert kinds.count("_states_kernel") == 5 and kinds.count("_reverse_kernel") == 3 and kinds.count("_adjoint_kernel") == 2
    assert "_segment_sums" in kinds and "_correction" in kinds
    blocks = {spec[1]["BLOCK_D"] for _, fn, spec in LAUNCHES if fn.__name__ == "_reverse_kernel"}
    assert blocks == {8, 16, 32}            # _block_d's choices for the two shapes on 132 SMs, and the forced 32

@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real in the GPU tests")
@pytest.mark.parametrize("i", range(len(LAUNCHES) or 23))
def test_launch_compiles_for_sm90(i):
    label, fn, spec = LAUNCHES[i]
    kernel, num_warps = tr.compile_sm90(fn, spec)
    res = tr.resources(kernel, num_warps)
    assert 0 < res["registers"] <= 255 and res["sass_instructions"] > 0, (label, fn.__name__, res)
    if fn.__name__ in ("_states_kernel", "_adjoint_kernel", "_reverse_kernel"):
        assert res["stack_bytes"] == 0 and res["spill_instructions"] == 0, (label, fn.__name__, res)
