"""The only place the optional CUDA kernels are imported.

mamba-ssm (``selective_scan_fn``, ``mamba_inner_fn``) and causal-conv1d (``causal_conv1d_fn``)
are GPU accelerators. They cannot be imported on a machine without CUDA, and a broken CUDA
install raises ``OSError``/``RuntimeError`` (undefined symbols) rather than ``ImportError``, so
all three are caught. Everything else in the package works without them.
"""
from __future__ import annotations

import warnings

KERNEL_INSTALL_HINT = (
    "pip install --no-build-isolation causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1 "
    "(needs a CUDA toolkit matching your torch build; see README 'GPU kernels')"
)

selective_scan_fn = None
mamba_inner_fn = None
causal_conv1d_fn = None
layer_norm_fn = None              # mamba-ssm's fused (residual add +) RMSNorm/LayerNorm Triton kernel
KERNEL_IMPORT_ERROR: str | None = None

try:  # pragma: no cover - exercised only where CUDA kernels are installed
    from causal_conv1d import causal_conv1d_fn  # noqa: F811
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn  # noqa: F811
    from mamba_ssm.ops.triton.layer_norm import layer_norm_fn  # noqa: F811
except (ImportError, OSError, RuntimeError) as exc:  # missing, or a broken CUDA build
    selective_scan_fn = mamba_inner_fn = causal_conv1d_fn = layer_norm_fn = None
    KERNEL_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

HAS_KERNELS = selective_scan_fn is not None and causal_conv1d_fn is not None

BACKENDS = ("auto", "torch", "kernel")
_warned = False


def use_kernels(backend: str, tensor) -> bool:
    """Decide per call whether the CUDA kernel path runs.

    ``backend``: "auto" (kernels when importable and ``tensor`` is on CUDA), "torch" (never) or
    "kernel" (always; an error when it cannot be honoured).
    """
    global _warned
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    on_cuda = tensor.is_cuda
    if backend == "kernel":
        if not HAS_KERNELS:
            raise RuntimeError(
                f"backend='kernel' was requested but the kernels are not importable "
                f"({KERNEL_IMPORT_ERROR}). Install them: {KERNEL_INSTALL_HINT}, or use backend='torch'."
            )
        if not on_cuda:
            raise RuntimeError("backend='kernel' needs CUDA tensors; move the model to a GPU or use backend='torch'.")
        return True
    if on_cuda and not HAS_KERNELS and not _warned:
        _warned = True
        warnings.warn(
            f"Running the pure-PyTorch scan on CUDA because the kernels are not importable "
            f"({KERNEL_IMPORT_ERROR}). For speed: {KERNEL_INSTALL_HINT}",
            stacklevel=3,
        )
    return on_cuda and HAS_KERNELS
