import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

from modules.kernels import HAS_KERNELS  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_kernels = pytest.mark.skipif(not (HAS_KERNELS and torch.cuda.is_available()),
                                      reason="needs CUDA and the mamba-ssm / causal-conv1d kernels")


def _ssd_kernels_importable() -> bool:
    if not torch.cuda.is_available():       # CPU runs never import mamba-ssm's Triton kernels
        return False
    from modules.kernels import _ssd_kernels
    return _ssd_kernels()[2] is None


requires_ssd_kernels = pytest.mark.skipif(not _ssd_kernels_importable(),
                                          reason="needs CUDA and mamba-ssm's SSD kernels (causal-conv1d optional)")
GPU_SKIPS = (requires_cuda, requires_kernels, requires_ssd_kernels)


@pytest.hookimpl(tryfirst=True)       # before -m selects on the marks
def pytest_collection_modifyitems(items):
    """A test carrying one of GPU_SKIPS (as a decorator, a module's pytestmark or a param's marks) is also
    marked gpu, so `pytest -m gpu` (what the device scripts run) selects every test written for a GPU."""
    reasons = {m.mark.kwargs["reason"] for m in GPU_SKIPS}
    for item in items:
        if any(m.kwargs.get("reason") in reasons for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
