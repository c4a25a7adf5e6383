"""Every Triton kernel of the project compiled for the H200 (sm_90) as its wrapper launches it, no GPU needed.

    python benchmarks/triton_resources.py [--out benchmarks/results/triton_resources_sm90]

The wrappers run on CPU tensors with their kernels replaced by recorders (nothing is computed); each
recorded launch is specialised as Triton's JIT would (its own rules: integers equal to 1 become
constants, multiples of 16 and 16-byte aligned pointers are marked so) and compiled for
GPUTarget('cuda', 90) with the ptxas Triton ships. cuobjdump (shipped too) reads each cubin's
registers per thread and stack bytes (spills), nvdisasm its SASS: spill instructions (STL, LDL),
special-function instructions (MUFU: the exponentials) and the total, and from the registers the
warps an SM holds (65,536 registers, at most 64 warps): the occupancy a launch plan can count on.
Launches, planned as on an H200 (132 SMs: blocks and chunks as the wrappers choose there; inputs in the
model's strides): the forward at mamba-130m's shape (bf16; in chunks at batch 1, one chunk at batch 32) and in fp32
as training calls it, the backward at
our LM's training shape (no initial state, as in training) and at batch 2 with initial and last-state
gradients, and once with 32-channel programs in one chunk, the initial-state correction.
``tests/test_triton_compile.py`` compiles the same launches on CPU, so a kernel that would not
compile fails before a GPU session.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402
from modules import triton_correction, triton_scan, triton_scan_bwd  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
COLS = ["launch", "kernel", "num_warps", "registers", "stack_bytes", "spill_instructions", "mufu", "sass_instructions",
        "loop_instructions", "loop_mufu", "resident_warps_per_sm"]
KERNEL_NAMES = {triton_scan: ("_scan_kernel", "_carry_kernel"),
                triton_scan_bwd: ("_states_kernel", "_adjoint_kernel", "_reverse_kernel", "_carry_kernel"),
                triton_correction: ("_segment_sums", "_correction")}
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")
H200_SMS = 132


@contextlib.contextmanager
def recording(launches: list):
    """Within: every kernel launch of the modules appends (kernel, its specialisation) to launches instead of running,
    and the wrappers plan blocks and chunks for an H200's 132 SMs (modules.triton_scan.sm_count)."""
    saved = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):      # specialised at once: no tensor is kept past its launch
            return lambda *args, **kwargs: launches.append((self.fn, specialise(self.fn, args, kwargs)))

    try:
        saved.append((triton_scan, "sm_count", triton_scan.sm_count))   # plan launches as on an H200 (132 SMs)
        triton_scan.sm_count = lambda device: H200_SMS
        for mod, names in KERNEL_NAMES.items():
            for name in names:
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, Recorder(getattr(mod, name)))
        yield launches
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)


def specialise(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of a launch, by Triton's own specialisation rules."""
    unknown = [k for k in kwargs if k not in fn.arg_names and k not in _OPTIONS]
    twice = [k for k in kwargs if k in fn.arg_names[:len(args)]]
    if len(args) > len(fn.arg_names) or unknown or twice:      # the JIT refuses these launches: so does this
        raise TypeError(f"{fn.__name__}: {len(args)} positional arguments for {len(fn.arg_names)} parameters, "
                        f"unknown keywords {unknown}, given twice {twice}")
    bound = dict(zip(fn.arg_names, args)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    missing = [k for k in fn.arg_names if k not in bound]
    if missing:
        raise TypeError(f"{fn.__name__}: no value for {missing}")
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS and v is not None}
    sig, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = bound[name]
        if param.is_constexpr:
            sig[name], constexprs[name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        sig[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif key:
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return sig, constexprs, attrs, options


def compile_sm90(fn, spec):
    """(compiled kernel, num_warps) of a recorded launch (kernel, specialise's tuple) for sm_90."""
    sig, constexprs, attrs, options = spec
    return triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=options), options.get("num_warps", 4)


def resources(kernel, num_warps: int) -> dict:
    """Registers and stack bytes (cuobjdump), SASS instruction counts (nvdisasm) of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
    field = {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", usage)}
    ops = Counter(m.split(".")[0] for m in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass))
    warps = 65536 // (32 * max(field["REG"], 1)) // num_warps * num_warps
    loop, loop_mufu = longest_loop(sass)
    return dict(registers=field["REG"], stack_bytes=field["STACK"], spill_instructions=ops["STL"] + ops["LDL"],
                mufu=ops["MUFU"], sass_instructions=sum(ops.values()), loop_instructions=loop, loop_mufu=loop_mufu,
                resident_warps_per_sm=min(64, warps))


def longest_loop(sass: str) -> tuple[int, int]:
    """(instructions, MUFU among them) of the longest loop body in an nvdisasm listing: from a label to a
    branch back to it (a kernel's walk over tokens: per tile of U tokens in the forward, per token elsewhere)."""
    labels, body, best = {}, [], (0, 0)
    for line in sass.splitlines():
        m = re.match(r"\s*\.L_x_(\d+):", line)
        if m:
            labels[m.group(1)] = len(body)
        op = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not op:
            continue
        body.append(op.group(1).split(".")[0])
        back = re.search(r"BRA\s+`\(\.L_x_(\d+)\)", line)
        if back and labels.get(back.group(1), len(body)) < len(body) - 1:
            span = body[labels[back.group(1)]:]
            best = max(best, (len(span), span.count("MUFU")))
    return best


def _model_inputs(b, d, length, n=16, dt_rank=48, dtype=torch.bfloat16):
    """Scan inputs in the layouts the mixer produces (as benchmarks/bench_scan.py's): u, z slices of
    in_proj's (b, 2d, l) output, Δ channel-contiguous, B and C views into x_proj's (b, l, r + 2n)."""
    xz = torch.zeros(b, 2 * d, length, dtype=dtype)
    x_dbl = torch.zeros(b, length, dt_rank + 2 * n, dtype=dtype)
    return dict(u=xz[:, :d], delta=torch.zeros(b, length, d, dtype=dtype).transpose(1, 2),
                A=-torch.ones(d, n), B=x_dbl[..., dt_rank:dt_rank + n].transpose(1, 2),
                C=x_dbl[..., dt_rank + n:].transpose(1, 2), D=torch.ones(d), z=xz[:, d:], delta_bias=torch.zeros(d))


def _bwd_inputs(b, d, length, n=16, dt_rank=14):
    """u, Δ (b, d, l), A (d, n), B, C (b, n, l) as TritonScanFn saves them in training: fp32 copies that keep the
    model's strides (u contiguous from the conv, Δ channel-contiguous, B and C views into x_proj's output)."""
    x_dbl = torch.zeros(b, length, dt_rank + 2 * n)
    return (torch.zeros(b, d, length), torch.zeros(b, length, d).transpose(1, 2), -torch.ones(d, n),
            x_dbl[..., dt_rank:dt_rank + n].transpose(1, 2), x_dbl[..., dt_rank + n:].transpose(1, 2))


def launches() -> list[tuple[str, object, tuple]]:
    """(label, kernel, specialisation) of each launch the wrappers make in the cases of the module docstring."""
    out = []
    cases = [
        ("fwd, 130m shape, model strides, bf16, 16K (H200 plan)",
         lambda: triton_scan.selective_scan_fwd(**_model_inputs(1, 1536, 16384), delta_softplus=True,
                                                return_last_state=True)),
        ("fwd, 130m shape, bf16, batch 32: one chunk (the rows fill an H200)",
         lambda: triton_scan.selective_scan_fwd(**_model_inputs(32, 1536, 2048), delta_softplus=True)),
        ("fwd, training (fp32 core scan), 32 x 448 x 2048",
         lambda: triton_scan.selective_scan_fwd(torch.zeros(32, 448, 2048), torch.zeros(32, 448, 2048),
                                                -torch.ones(448, 16), torch.zeros(32, 16, 2048),
                                                torch.zeros(32, 16, 2048), return_last_state=True)),
        ("bwd, training: 32 x 448 x 2048, no initial state (H200 plan)",
         lambda: triton_scan_bwd.scan_backward(*_bwd_inputs(32, 448, 2048), None, torch.zeros(32, 448, 2048), None)),
        ("bwd, 2 x 448 x 2048, initial and last-state gradients (H200 plan)",
         lambda: triton_scan_bwd.scan_backward(*_bwd_inputs(2, 448, 2048), torch.zeros(2, 448, 16),
                                               torch.zeros(2, 448, 2048), torch.zeros(2, 448, 16))),
        ("bwd, 32 x 448 x 2048, 32 channels a program, one chunk",
         lambda: triton_scan_bwd.scan_backward(*_bwd_inputs(32, 448, 2048), None, torch.zeros(32, 448, 2048), None,
                                               block_d=32, chunk=2048)),
        ("initial-state correction, 130m shape, bf16 Δ",
         lambda: triton_correction.initial_state_correction(
             torch.zeros(1, 65536, 1536, dtype=torch.bfloat16).transpose(1, 2), -torch.ones(1536, 16),
             torch.zeros(1, 65536, 80, dtype=torch.bfloat16)[..., 64:].transpose(1, 2), torch.zeros(1, 1536, 16),
             torch.zeros(1536), True)),
    ]
    for label, call in cases:
        rec = []
        with recording(rec):
            call()
        out += [(label, fn, spec) for fn, spec in rec]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "triton_resources_sm90"))
    args = p.parse_args()
    rows = []
    for label, fn, spec in launches():
        kernel, num_warps = compile_sm90(fn, spec)
        cx = spec[1]
        name = fn.__name__ + "".join(f" {k}={cx[k]}" for k in ("STATES_ONLY", "LOCAL", "BLOCK_D") if k in cx)
        rows.append(dict(launch=label, kernel=name, num_warps=num_warps, **resources(kernel, num_warps)))
        print(rows[-1], flush=True)
    notes = (f"Compiled by Triton {triton.__version__} for GPUTarget('cuda', 90, 32) (the H200) on a machine without "
             "a GPU, each launch specialised as Triton's JIT does. registers and stack_bytes: cuobjdump "
             "--dump-resource-usage; spill_instructions (STL + LDL), mufu (special-function instructions) and "
             "sass_instructions: counted in nvdisasm's listing of the whole kernel; loop_instructions, loop_mufu: "
             "its longest loop body (per tile of 8 bf16 / 4 fp32 tokens in the forward's passes, per token in "
             "the backward's), what one warp issues per iteration. "
             "resident_warps_per_sm: 65,536 registers / (32 x registers), whole programs, at most 64. The GPU "
             "machine's Triton (3.6) may allocate registers differently.")
    write_results(args.out, rows, COLS, "Triton kernels compiled for sm_90: registers, spills, occupancy", notes)
    print(f"wrote {args.out}.md / .json")


if __name__ == "__main__":
    main()
