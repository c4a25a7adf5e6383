"""The only place the optional CUDA kernels are imported.

mamba-ssm (``selective_scan_fn``, ``mamba_inner_fn``) and causal-conv1d (``causal_conv1d_fn``)
are GPU accelerators. They cannot be imported on a machine without CUDA, and a broken CUDA
install raises ``OSError``/``RuntimeError`` (undefined symbols) rather than ``ImportError``, so
all three are caught. Everything else in the package works without them.

Mamba-2's SSD kernels (``mamba_chunk_scan_combined``, ``mamba_split_conv1d_scan_combined``, Triton)
are imported lazily, on the first CUDA call that may use them (``use_ssd_kernels``).
"""
from __future__ import annotations

import functools
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
        from modules.selective_scan import cuda_scan, triton_available    # here: selective_scan imports this

        triton = cuda_scan(backend) == "triton" and triton_available()
        scan = "the selective scan in Triton" if triton else "the pure-PyTorch scan"
        warnings.warn(
            f"mamba-ssm's kernels are not importable ({KERNEL_IMPORT_ERROR}): on CUDA {scan} runs "
            f"(DECIMAMBA_SCAN chooses), the conv and the rest in PyTorch. For full speed: {KERNEL_INSTALL_HINT}",
            stacklevel=3,
        )
    return on_cuda and HAS_KERNELS


@functools.cache
def _ssd_kernels():
    """(mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined, error or None), imported once."""
    try:  # pragma: no cover - exercised only where CUDA kernels are installed
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as scan
        from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined as fused
    except (ImportError, OSError, RuntimeError) as exc:  # missing, or a broken CUDA / Triton build
        return None, None, f"{type(exc).__name__}: {exc}"
    return scan, fused, None


def mamba_chunk_scan_combined(*args, **kwargs):
    """mamba-ssm's SSD chunk scan (Mamba-2); call only where ``use_ssd_kernels`` said True."""
    return _ssd_kernels()[0](*args, **kwargs)


def mamba_split_conv1d_scan_combined(*args, **kwargs):
    """mamba-ssm's fused Mamba-2 conv + SSD + gated norm + out-projection; as above."""
    return _ssd_kernels()[1](*args, **kwargs)


_ssd_warned = False


def use_ssd_kernels(backend: str, tensor) -> bool:
    """``use_kernels`` for Mamba-2 layers: mamba-ssm's SSD Triton kernels. causal-conv1d is not needed
    for them (as in mamba-ssm's own Mamba2, the conv then runs in torch: ``has_conv_kernel``). The
    import is attempted only for CUDA tensors (or backend "kernel"), so CPU runs never load Triton."""
    global _ssd_warned
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return False
    error = _ssd_kernels()[2]
    if backend == "kernel":
        if error is not None:
            raise RuntimeError(f"backend='kernel' was requested but the Mamba-2 kernels are not importable "
                               f"({error}). Install them: {KERNEL_INSTALL_HINT}, or use backend='torch'.")
        if not tensor.is_cuda:
            raise RuntimeError("backend='kernel' needs CUDA tensors; move the model to a GPU or use backend='torch'.")
        return True
    if error is not None and not _ssd_warned:
        _ssd_warned = True
        warnings.warn(f"Running the pure-PyTorch SSD scan on CUDA because the Mamba-2 kernels are not "
                      f"importable ({error}). For speed: {KERNEL_INSTALL_HINT}", stacklevel=3)
    return error is None


def has_conv_kernel() -> bool:
    """causal-conv1d importable: the Mamba-2 conv (and mamba-ssm's fused Mamba-2 kernel, which calls it) can
    run on it; where it is not, the conv runs in torch beside the SSD kernels."""
    return causal_conv1d_fn is not None
