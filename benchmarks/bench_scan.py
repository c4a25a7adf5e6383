"""The Triton selective scan against mamba-ssm's selective_scan_fn, in one run on one GPU.

    GIT_REV=$(git rev-parse --short HEAD) python benchmarks/bench_scan.py [--out benchmarks/results/scan_h200]

Scan alone: mamba-130m's shape (d_inner 1536, d_state 16), batch 1, bf16, with D, z gating, delta_bias
and softplus, at 16K, 128K and 1M tokens; CUDA-event time of each call after warm-up, median of
the repetitions. mamba-ssm gets Δ, B, C contiguous (its preferred layout, no copies timed); ours
reads the model's strides (Δ channel-contiguous, B and C views into x_proj's output) and, in a
second row, the same contiguous tensors. GB/s counts the bytes a scan must move (u, Δ, z read, out
written, B and C read). Every row's output is checked against mamba-ssm's in the same run (relative
error in norm and the largest elementwise error relative to the output's scale). Then a small
sweep of kernel settings at 128K, and the model: a 24-layer mamba-130m-shape prefill (random
weights, bf16, last token's logits) with mamba-ssm's fused mamba_inner_fn, and unfused (conv, x_proj
and the scan as separate kernels) with each scan (DECIMAMBA_SCAN), plus the streamed prefill at 1M
(64K chunks; with the Triton scan the initial state needs no correction kernel).
Writes <out>.md and <out>.json (command, machine, date, git commit) after every section.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_results  # noqa: E402
from modules import kernels, triton_scan  # noqa: E402
from modules.triton_scan import selective_scan_fwd  # noqa: E402

COLS = ["section", "impl", "tokens", "ms", "ratio_vs_mamba_ssm", "GB_per_s", "rel_err_norm", "max_err_rel_scale", "note"]
D_INNER, D_STATE, DT_RANK = 1536, 16, 48


def cuda_ms(fn, reps, warmup=2):
    """Median CUDA-event milliseconds of fn() over reps calls, after warmup calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in times)[reps // 2]


def scan_inputs(length, seed=0):
    """bf16 inputs in the model's layouts, the 130m shape; Δ's bias as dt_proj's initialisation
    (Δ in [0.001, 0.1]), A as the S4D-real init (1..16), D = 1."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16
    u = torch.randn(1, D_INNER, length, device="cuda", generator=g).to(bf)
    dt = (torch.randn(1, length, D_INNER, device="cuda", generator=g) * 0.5).to(bf).transpose(1, 2)
    x_dbl = torch.randn(1, length, DT_RANK + 2 * D_STATE, device="cuda", generator=g).to(bf)
    B = x_dbl[..., DT_RANK:DT_RANK + D_STATE].transpose(1, 2)
    C = x_dbl[..., DT_RANK + D_STATE:].transpose(1, 2)
    z = torch.randn(1, 2 * D_INNER, length, device="cuda", generator=g).to(bf)[:, D_INNER:]
    A = -torch.arange(1, D_STATE + 1, device="cuda", dtype=torch.float32).repeat(D_INNER, 1)
    dt0 = torch.exp(torch.rand(D_INNER, device="cuda", generator=g) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    bias = dt0 + torch.log(-torch.expm1(-dt0))                                  # inverse softplus
    D = torch.ones(D_INNER, device="cuda")
    return dict(u=u, delta=dt, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)


def errors(out, ref):
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    return round(rel, 6), round(((out - ref).abs().max() / ref.abs().max()).item(), 6)


def scan_rows(args, rows, out):
    reps = {16384: 30, 131072: 10, 1 << 20: 3}
    for length in args.lengths:
        x = scan_inputs(length)
        contig = dict(x, delta=x["delta"].contiguous(), B=x["B"].contiguous(), C=x["C"].contiguous())
        nbytes = 4 * 2 * D_INNER * length + 2 * 2 * D_STATE * length            # u, Δ, z, out + B, C (bf16)
        n = reps.get(length, 5)
        ref = kernels.selective_scan_fn(**contig, delta_softplus=True)
        base = cuda_ms(lambda: kernels.selective_scan_fn(**contig, delta_softplus=True), n)
        rows.append(dict(section="scan", impl="mamba_ssm selective_scan_fn (contiguous inputs)", tokens=length,
                         ms=round(base, 4), ratio_vs_mamba_ssm=1.0, GB_per_s=round(nbytes / base / 1e6)))
        print(rows[-1], flush=True)
        for name, inp in (("triton, model strides", x), ("triton, contiguous inputs", contig)):
            y = selective_scan_fwd(**inp, delta_softplus=True)
            rel, mx = errors(y, ref)
            t = cuda_ms(lambda: selective_scan_fwd(**inp, delta_softplus=True), n)
            rows.append(dict(section="scan", impl=name, tokens=length, ms=round(t, 4), ratio_vs_mamba_ssm=round(base / t, 2),
                             GB_per_s=round(nbytes / t / 1e6), rel_err_norm=rel, max_err_rel_scale=mx))
            print(rows[-1], flush=True)
        del x, contig, ref
        torch.cuda.empty_cache()
        write_results(out, rows, COLS, "Triton selective scan vs mamba-ssm (H200)", NOTES)


def sweep_rows(args, rows, out):
    """Kernel settings at 128K (model strides): which default to keep."""
    length = 131072
    x = scan_inputs(length)
    if kernels.HAS_KERNELS:
        ref = kernels.selective_scan_fn(**dict(x, delta=x["delta"].contiguous(), B=x["B"].contiguous(),
                                               C=x["C"].contiguous()), delta_softplus=True)
    else:                                                         # errors against our defaults then
        ref = selective_scan_fwd(**x, delta_softplus=True)
    settings = [dict(), dict(prefetch=(0, 0)), dict(poly_exp=(0, 0)), dict(poly_exp=(0, 0), prefetch=(0, 0)),
                dict(tile_u=4), dict(tile_u=4, poly_exp=(0, 0)), dict(tile_u=4, prefetch=(1, 1)),
                dict(programs_per_sm=8), dict(prefetch=(1, 1), maxnreg=None), dict(block_d=128),
                dict(chunk=length)]                               # one pass, 24 programs: the per-program rate
    # prefetch (pass 1, pass 3): the next tile's loads ahead; tile_u 4: 8-byte rows, pass 1 at 90 registers, pass 3
    # with prefetch at 10 spill instructions instead of 142 (Triton 3.9's sm_90 code); two rounds: the spread
    # between a setting's two timings is the noise
    rounds = [(r, kw) for r in range(args.sweep_rounds) for kw in settings]
    note = "" if kernels.HAS_KERNELS else "errors vs triton defaults (no mamba-ssm)"
    for r, kw in rounds:
        if time.time() > args.deadline:
            break
        y = selective_scan_fwd(**x, delta_softplus=True, **kw)
        rel, mx = errors(y, ref)
        t = cuda_ms(lambda: selective_scan_fwd(**x, delta_softplus=True, **kw), 10)
        rows.append(dict(section="sweep", impl="triton " + (", ".join(f"{k}={v}" for k, v in kw.items()) or "defaults"),
                         tokens=length, ms=round(t, 4), rel_err_norm=rel, max_err_rel_scale=mx,
                         note=f"round {r + 1}" + (f"; {note}" if note else "")))
        print(rows[-1], flush=True)
    write_results(out, rows, COLS, "Triton selective scan vs mamba-ssm (H200)", NOTES)


def model_rows(args, rows, out):
    from models import MambaConfig, MambaLMHeadModel
    from models.streaming import streaming_prefill
    from modules.mamba_mixer import MambaMixer

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=24, vocab_size=50277)).to("cuda", torch.bfloat16).eval()
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    variants = [("fused mamba_inner_fn (mamba-ssm)", True, "mamba_ssm", None),
                ("unfused, mamba-ssm scan", False, "mamba_ssm", None),
                ("unfused, triton scan", False, "triton", None),
                ("unfused, triton scan, no prefetch (the previous default)", False, "triton", (False, False))]
    default_prefetch = triton_scan.PREFETCH
    for length in args.model_lengths:
        ids = torch.randint(0, 50277, (1, length), device="cuda")
        base = ref = None
        for name, fused, impl, prefetch in variants:
            if time.time() > args.deadline:
                return
            os.environ["DECIMAMBA_SCAN"] = impl
            triton_scan.PREFETCH = default_prefetch if prefetch is None else prefetch
            for m in mixers:
                m.use_fast_path = fused
            with torch.no_grad():
                logits = model(ids, num_last_tokens=1).logits.float()
                t = cuda_ms(lambda: model(ids, num_last_tokens=1), 3 if length <= 131072 else 1, warmup=1)
            ref = logits if ref is None else ref
            base = t if base is None else base
            rel, mx = errors(logits, ref)
            rows.append(dict(section="prefill 24 layers", impl=name, tokens=length, ms=round(t, 3),
                             ratio_vs_mamba_ssm=round(base / t, 2), rel_err_norm=rel, max_err_rel_scale=mx,
                             note="vs the fused row"))
            print(rows[-1], flush=True)
        write_results(out, rows, COLS, "Triton selective scan vs mamba-ssm (H200)", NOTES)
    triton_scan.PREFETCH = default_prefetch
    for m in mixers:
        m.use_fast_path = True
    length = args.stream_length
    ids = torch.randint(0, 50277, (1, length), device="cuda")
    base = ref = None
    for impl in ("mamba_ssm", "triton"):
        if time.time() > args.deadline:
            break
        os.environ["DECIMAMBA_SCAN"] = impl
        with torch.no_grad():
            logits = streaming_prefill(model, ids, chunk_size=65536).logits.float()
            t = cuda_ms(lambda: streaming_prefill(model, ids, chunk_size=65536), 1, warmup=0)
        ref = logits if ref is None else ref
        base = t if base is None else base
        rel, mx = errors(logits, ref)
        rows.append(dict(section="streamed prefill, 64K chunks", impl=f"{impl} scan", tokens=length, ms=round(t, 2),
                         ratio_vs_mamba_ssm=round(base / t, 2), rel_err_norm=rel, max_err_rel_scale=mx,
                         note="mamba_ssm: + the Triton initial-state correction"))
        print(rows[-1], flush=True)
    os.environ.pop("DECIMAMBA_SCAN", None)
    write_results(out, rows, COLS, "Triton selective scan vs mamba-ssm (H200)", NOTES)


NOTES = ("Scan: batch 1, d_inner 1536, d_state 16, bf16, D, z, delta_bias, softplus; CUDA events, "
         "median. ratio = mamba-ssm ms / row ms (same run). rel_err_norm and max_err_rel_scale: "
         "against mamba-ssm's output (scan rows) or the first row of the section (model rows); bf16 "
         "outputs round at 2^-9.")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "scan_h200"))
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072, 1 << 20])
    p.add_argument("--model-lengths", type=int, nargs="+", default=[16384, 131072])
    p.add_argument("--stream-length", type=int, default=1 << 20)
    p.add_argument("--skip", nargs="*", default=[], choices=["scan", "sweep", "model"])
    p.add_argument("--sweep-rounds", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=110)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_scan.py: needs a CUDA GPU")
    if not kernels.HAS_KERNELS and not {"scan", "model"} <= set(args.skip):
        sys.exit(f"bench_scan.py: the scan and model sections need mamba-ssm ({kernels.KERNEL_IMPORT_ERROR}); "
                 "--skip scan model times the sweep alone")
    args.deadline = time.time() + args.max_seconds
    rows = []
    if "scan" not in args.skip:
        scan_rows(args, rows, args.out)
    if "sweep" not in args.skip:
        sweep_rows(args, rows, args.out)
    if "model" not in args.skip:
        model_rows(args, rows, args.out)
    for r in rows:
        if r["section"] == "scan" and r["impl"].startswith("triton"):
            print(f"{r['tokens']:>8} tokens  {r['impl']:<26} {r['ms']:8.3f} ms  {r['ratio_vs_mamba_ssm']:.2f}x mamba-ssm  "
                  f"rel err {r['rel_err_norm']:.1e} (max {r['max_err_rel_scale']:.1e})", flush=True)
    print(f"wrote {args.out}.md / .json", flush=True)


if __name__ == "__main__":
    main()
