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
    # the five cases' launches: forward (3 + 1 kernels), backward in chunks twice (6 each), correction (2)
    kinds = [fn.__name__ for _, fn, _, _ in LAUNCHES]
    assert kinds.count("_scan_kernel") == 3 and kinds.count("_carry_kernel") == 5
    assert kinds.count("_states_kernel") == 4 and kinds.count("_reverse_kernel") == 2 and "_adjoint_kernel" in kinds
    assert "_segment_sums" in kinds and "_correction" in kinds


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels compile for real in the GPU tests")
@pytest.mark.parametrize("i", range(len(LAUNCHES) or 18))
def test_launch_compiles_for_sm90(i):
    label, fn, args, kwargs = LAUNCHES[i]
    kernel, num_warps = tr.compile_sm90(fn, args, kwargs)
    res = tr.resources(kernel, num_warps)
    assert 0 < res["registers"] <= 255 and res["sass_instructions"] > 0, (label, fn.__name__, res)
    if fn.__name__ in ("_states_kernel", "_adjoint_kernel", "_reverse_kernel"):
        assert res["stack_bytes"] == 0 and res["spill_instructions"] == 0, (label, fn.__name__, res)
