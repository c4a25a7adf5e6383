"""mamba-ssm's SSD kernels on the CPU, in Triton's interpreter: our Mamba-2 kernel path (modules.ssd.ssd_scan with
backend "kernel": the call, the int32-offset segments chained by their final states, initial states) and a
DeciMamba model on it, against the torch path, values and gradients, on any CPU machine that has the archive
beside the checkout (this project's CI does).

The GPU tests (tests/test_gpu_mamba2.py) cover the compiled kernels; these cover the same code paths on the CPU.
The interpreter multiplies in full fp32 (no TF32 rounding: its tl.dot is numpy's matmul), so the two paths differ
only in summation order and the kernels' cumulative sums: observed <= 2.7e-6 relative (scans) and 5.3e-6 (the model's
logits, loss and gradients, through 2 layers and a decimation); budgets 1e-4 and 1e-3 leave about 40x and 190x
(the model's wider: the GPU test's 4-layer DeciMamba model at 4,096 tokens reached 1.43e-4,
benchmarks/results/mamba2_kernel_interpreter/).
Needs mamba-ssm's source archive (../shared/device/, or DECIMAMBA_MAMBA_SSM_SDIST) and einops; skipped without.
"""
import contextlib
import os
import types

import pytest
import torch

from tests.helpers import extract_mamba_ssm, fwd_bwd, rel_err, run_in_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDIST = os.environ.get("DECIMAMBA_MAMBA_SSM_SDIST") or os.path.join(ROOT, "..", "shared", "device",
                                                                     "mamba_ssm-2.3.2.post1.tar.gz")
SCAN_BUDGET, MODEL_BUDGET = 1e-4, 1e-3


def _interpreter_shims():
    """What mamba-ssm's wrappers ask of CUDA, for CPU tensors: a device context, the SM count (132, an H200's),
    and the autotuner's timing (every config timed equal: the first is taken)."""
    import triton.runtime.autotuner as autotuner

    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)
    autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]
    from modules import kernels

    kernels.use_ssd_kernels = lambda backend, tensor: backend == "kernel"   # CPU tensors on the kernels


def _inputs(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)     # noqa: E731
    b, h, p, ng, n = 2, 4, 16, 2, 16
    t = dict(x=r(b, length, h, p), dt=r(b, length, h) - 1, A=-torch.rand(h, generator=g) * 4 - 0.5,
             B=r(b, length, ng, n), C=r(b, length, ng, n), D=r(h), dt_bias=r(h), z=r(b, length, h, p),
             h0=r(b, h, p, n))
    return {k: v.requires_grad_() for k, v in t.items()}


def _scan(t, backend, with_h0):
    from modules.ssd import ssd_scan

    y, last = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 64, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                       initial_states=t["h0"] if with_h0 else None, dt_softplus=True, return_final_states=True,
                       backend=backend)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((y * w).sum() + last.sum(), [v for k, v in t.items() if with_h0 or k != "h0"])
    return y.detach(), last.detach(), grads


def check_scans():
    """In the interpreter: three scans of 300 tokens (not a multiple of the 64-token chunk), one of them in
    128-token segments (the path ssd_scan takes when offsets pass int32), kernel against torch."""
    _interpreter_shims()
    from modules import ssd

    for name, with_h0, segment in (("zero-state", False, None), ("initial-state", True, None),
                                   ("segmented, initial-state", True, 128)):
        t = _inputs(300)
        saved = ssd.kernel_segment
        if segment:
            ssd.kernel_segment = lambda x, B, chunk_size: segment
        try:
            yk, lk, gk = _scan(t, "kernel", with_h0)
        finally:
            ssd.kernel_segment = saved
        yt, lt, gt = _scan(t, "torch", with_h0)
        worst = max([rel_err(yk, yt), rel_err(lk, lt)] + [rel_err(a, b) for a, b in zip(gk, gt)])
        assert worst < SCAN_BUDGET, (name, worst)
        print("ok", name, f"{worst:.1e}", flush=True)


def check_deci_model():
    """In the interpreter: a 2-layer DeciMamba Mamba-2 model (decimation at layer 1) on the kernel path against
    the torch path, the torch run replaying the kernel run's kept tokens (as the GPU test does)."""
    _interpreter_shims()
    from models import DecimatingMambaModel, MambaConfig
    from modules import mamba2_mixer

    torch.manual_seed(0)
    deci = dict(activate=True, beta=0.5, L_base=64, decimating_layers=[1], min_seq_len=20)
    model = DecimatingMambaModel(MambaConfig(d_model=64, n_layer=2, vocab_size=100, ssm_cfg={
        "layer": "Mamba2", "ngroups": 2, "headdim": 16, "d_state": 16, "chunk_size": 64}), decimation_config=deci)
    ids = torch.randint(0, 100, (1, 256), generator=torch.Generator().manual_seed(0))
    o_k, l_k, g_k = fwd_bwd(model, ids, "kernel")
    assert o_k.kept_indices and len(o_k.kept_indices[0][1]) < 256, "layer 1 decimated nothing"
    replay = iter([keep.unsqueeze(0) for _, keep in o_k.kept_indices])
    mamba2_mixer.kept_from_scores = lambda *args: next(replay)
    o_t, l_t, g_t = fwd_bwd(model, ids, "torch")
    worst = max([rel_err(o_k.logits, o_t.logits), rel_err(l_k, l_t)] + [rel_err(g_k[n], g_t[n]) for n in g_t])
    assert worst < MODEL_BUDGET, worst
    print("ok deci model", f"{worst:.1e}", flush=True)


@pytest.fixture
def mamba_ssm_sources(tmp_path, monkeypatch):
    """mamba-ssm's Python package from its source archive (tests.helpers.extract_mamba_ssm) on PYTHONPATH."""
    pytest.importorskip("triton")
    pytest.importorskip("einops")
    if not os.path.exists(SDIST):
        pytest.skip(f"needs mamba-ssm's source archive at {SDIST} (or DECIMAMBA_MAMBA_SSM_SDIST)")
    top = extract_mamba_ssm(SDIST, str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([top, os.environ.get("PYTHONPATH", "")]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels run (tests/test_gpu_mamba2.py)")
def test_ssd_kernel_path_in_the_interpreter(mamba_ssm_sources):
    out = run_in_interpreter("test_ssd_interpreter", "check_scans()")
    assert out.count("ok ") == 3, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels run (tests/test_gpu_mamba2.py)")
def test_deci_model_on_the_ssd_kernels_in_the_interpreter(mamba_ssm_sources):
    out = run_in_interpreter("test_ssd_interpreter", "check_deci_model()")
    assert out.count("ok ") == 1, out
