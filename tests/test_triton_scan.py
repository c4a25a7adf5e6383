"""The Triton selective-scan forward (modules/triton_scan.py) equals an fp64 reference.

On CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, which must be
set before Triton compiles anything), on small shapes that still reach every code path: partial
channel blocks, chunks (passes 1-3) and a single pass, tokens not a multiple of the tile (8 bf16 or
4 fp32) or of the chunk, padded state sizes, grouped B/C, the model's strides, 64-bit tile offsets,
the polynomial exps (POLY_EXP) beside the exact ones. On a GPU:
the compiled kernels at 4K-20K tokens, against mamba-ssm's selective_scan_fn, and at 1M tokens
with b·d·l > 2^31. Skipped where Triton is not installed.
"""
import pytest
import torch

from tests.conftest import requires_cuda, requires_kernels
from tests.helpers import run_in_interpreter

pytest.importorskip("triton")

FULL = dict(D=True, z=True, bias=True, softplus=True, h0=True)
NONE = dict(D=False, z=False, bias=False, softplus=False, h0=False)


def make_inputs(b, d, l, n, dtype=torch.float32, groups=0, layout="model", feats=FULL, device="cpu", seed=0):
    """Scan inputs with the strides the model produces (layout "model"): Δ channel-contiguous (a
    transposed (b, l, d) tensor), B and C transposed views into x_proj's (b, l, r + 2n) output, z a
    channel slice of in_proj's output; "contiguous": every tensor contiguous; "misaligned": u starts
    3 elements into its rows (a continued conv's output). groups > 0: B, C of shape (b, g, n, l)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=device) * scale + shift

    if layout == "misaligned":
        u = rnd(b, d, l + 3)[..., 3:]
    else:
        u = rnd(b, d, l)
    softplus = feats["softplus"]
    raw = rnd(b, l, d, scale=0.5, shift=-2.0)                      # softplus(raw + bias) ~ 0.02-0.5
    delta = raw if softplus else torch.nn.functional.softplus(raw)
    delta = delta.transpose(1, 2) if layout == "model" else delta.transpose(1, 2).contiguous()
    A = -torch.exp(rnd(d, n))                                      # decay rates ~0.05 to ~20
    if groups:
        B, C = rnd(b, l, groups, n).permute(0, 2, 3, 1), rnd(b, groups, n, l)
    elif layout == "model":
        x_dbl = rnd(b, l, 8 + 2 * n)
        B, C = x_dbl[..., 8:8 + n].transpose(1, 2), x_dbl[..., 8 + n:].transpose(1, 2)
    else:
        B, C = rnd(b, n, l), rnd(b, n, l)
    z = rnd(b, 2 * d, l)[:, d:] if layout == "model" else rnd(b, d, l)
    out = dict(u=u, delta=delta, A=A, B=B, C=C, D=rnd(d) if feats["D"] else None, z=z if feats["z"] else None,
               delta_bias=rnd(d, scale=0.3) if feats["bias"] else None,
               initial_state=rnd(b, d, n) if feats["h0"] else None)
    for k in ("u", "delta", "B", "C", "z"):
        if out[k] is not None:
            out[k] = out[k].to(dtype)
    return out, softplus


def oracle(inp, softplus):
    """fp64 per-token loop (selective_scan_sequential) on the inputs as given (already rounded);
    grouped B/C: each group's channels on their own."""
    from modules.selective_scan import selective_scan_sequential

    x = {k: None if v is None else v.double() for k, v in inp.items()}
    d = x["u"].shape[1]
    groups = x["B"].shape[1] if x["B"].dim() == 4 else 0
    outs, lasts = [], []
    for g in range(max(1, groups)):
        sl = slice(g * d // max(1, groups), (g + 1) * d // max(1, groups))
        pick = {k: None if v is None else (v[sl] if k in ("A", "D", "delta_bias") else v[:, sl])
                for k, v in x.items() if k not in ("B", "C")}
        B, C = (x["B"][:, g], x["C"][:, g]) if groups else (x["B"], x["C"])
        out, last = selective_scan_sequential(pick["u"], pick["delta"], pick["A"], B, C, pick["D"], pick["z"],
                                              pick["delta_bias"], softplus, True, pick["initial_state"])
        outs.append(out)
        lasts.append(last)
    return torch.cat(outs, 1), torch.cat(lasts, 1)


def assert_matches(out, last, ref_out, ref_last, dtype, rel):
    """Elementwise within rel of the reference, plus rel of its largest value (entries near 0)."""
    assert out.dtype == dtype and last.dtype == torch.float32
    assert ref_out.abs().max() > 1 and ref_last.abs().max() > 0.1       # something to compare
    scale = ref_out.abs().max().item()
    torch.testing.assert_close(out.double().cpu(), ref_out.cpu(), rtol=rel, atol=rel * scale)
    torch.testing.assert_close(last.double().cpu(), ref_last.cpu(), rtol=rel, atol=rel * ref_last.abs().max().item())


# (name, shape (b, d, l, n), dtype, groups, layout, features, chunk, block_d, tolerance)
# fp32 in the interpreter (exact log and division): fp32 state against the fp64 reference, sums in
# another order; observed <= 3e-7 of the output's scale, 2e-6 is a 6x margin. bf16: the oracle sees
# the same rounded inputs; the output is rounded to bf16 (half an ulp, 2^-9 relative; observed
# 2.7e-3): 2^-7.
INTERP_CASES = [
    ("fp32_all_chunked", (2, 24, 45, 16), torch.float32, 0, "model", FULL, 16, 16, 2e-6),
    ("fp32_all_single_pass", (2, 24, 45, 16), torch.float32, 0, "model", FULL, None, 16, 2e-6),
    ("fp32_plain_n5_contiguous", (1, 20, 37, 5), torch.float32, 0, "contiguous", NONE, 16, 16, 2e-6),
    ("bf16_groups_one_launch_misaligned", (1, 32, 40, 16), torch.bfloat16, 2, "misaligned", FULL, 16, 16, 2**-7),
    ("fp32_groups_per_group_n64", (1, 20, 30, 64), torch.float32, 2, "contiguous", FULL, 16, 16, 2e-6),
]


# run a second time with the next tile's loads issued ahead in both passes: chunked with a partial last tile,
# and bf16 with groups in the misaligned layout
PREFETCH_CASES = ("fp32_all_chunked", "bf16_groups_one_launch_misaligned")


def check_interpreter(names=None):
    """Run in a process with TRITON_INTERPRET=1; prints 'ok <name>' per passing case."""
    from modules import triton_scan

    runs = [(case, (0, 0)) for case in INTERP_CASES] + [(c, (1, 1)) for c in INTERP_CASES if c[0] in PREFETCH_CASES]
    for (name, (b, d, l, n), dtype, groups, layout, feats, chunk, block, rel), prefetch in runs:
        if names and name not in names:
            continue
        inp, softplus = make_inputs(b, d, l, n, dtype, groups, layout, feats)
        out, last = triton_scan.selective_scan_fwd(**inp, delta_softplus=softplus, return_last_state=True,
                                                   block_d=block, chunk=chunk, prefetch=prefetch)
        assert_matches(out, last, *oracle(inp, softplus), dtype, rel)
        print("ok", name, "prefetch" if any(prefetch) else "", flush=True)
    # 64-bit offsets inside tiles (taken for l >= 2^31 / BLOCK_D): forced on a small case
    triton_scan._needs_i64 = lambda *tensors, block, tile_u: True
    inp, softplus = make_inputs(1, 20, 21, 16, feats=FULL)
    out, last = triton_scan.selective_scan_fwd(**inp, delta_softplus=softplus, return_last_state=True,
                                               block_d=16, chunk=16)
    assert_matches(out, last, *oracle(inp, softplus), torch.float32, 2e-6)
    print("ok fp32_int64_offsets", flush=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run the compiled kernels")
def test_triton_scan_interpreter():
    out = run_in_interpreter("test_triton_scan", "check_interpreter()")
    assert out.count("ok ") == len(INTERP_CASES) + len(PREFETCH_CASES) + 1, out


def test_plan_chunk_makes_whole_waves():
    from modules.triton_scan import MAX_CHUNK, plan_chunk

    assert plan_chunk(rows=600, length=5000, tile_u=8, slots=528) >= 5000    # rows fill the GPU: one pass
    # batch 1, d 1536, on 132 SMs: 128 channels a block (12 rows, 4-warp programs: 528 slots) and the
    # default 64 (24 rows, 2-warp programs: 1056 slots)
    for rows, slots in ((12, 528), (24, 1056)):
        for length in (16384, 131072, 1 << 20, 1000, 12345):
            chunk = plan_chunk(rows=rows, length=length, tile_u=8, slots=slots)
            n_chunks = -(-length // chunk)
            assert chunk % 16 == 0 and chunk <= max(MAX_CHUNK, 64), (length, chunk)
            waves = n_chunks * rows / slots      # rounding chunks up to 16 tokens may drop a chunk of a wave
            assert round(waves) >= 1 and abs(waves - round(waves)) < 0.05 or chunk == 64, (rows, length, chunk, waves)


def test_scan_impl_choice(monkeypatch):
    from modules import selective_scan as ss

    monkeypatch.setenv("DECIMAMBA_SCAN", "cuda_please")
    with pytest.raises(ValueError, match="DECIMAMBA_SCAN"):
        ss.scan_impl()
    monkeypatch.setenv("DECIMAMBA_SCAN", "triton")
    assert ss.scan_impl() == "triton"
    monkeypatch.delenv("DECIMAMBA_SCAN")
    assert ss.scan_impl() == ss.DEFAULT_SCAN_IMPL == "auto"


@pytest.mark.parametrize("env,backend,has_kernels,has_triton,want", [
    ("", "auto", True, True, "mamba_ssm"),       # mamba-ssm's kernels where they import
    ("", "auto", False, True, "triton"),         # else Triton's scan
    ("", "auto", False, False, "triton"),        # routed to Triton: a call it cannot serve runs torch (below)
    ("", "torch", True, True, "torch"),          # a torch layer never leaves torch
    ("", "kernel", False, True, "mamba_ssm"),    # backend "kernel" asks for mamba-ssm (use_kernels raises)
    ("triton", "auto", True, True, "triton"),    # an explicit choice wins
    ("torch", "auto", True, True, "torch"),
    ("mamba_ssm", "auto", False, True, "mamba_ssm"),
])
def test_cuda_scan_resolves_auto(monkeypatch, env, backend, has_kernels, has_triton, want):
    from modules import kernels
    from modules import selective_scan as ss

    monkeypatch.setenv("DECIMAMBA_SCAN", env)
    monkeypatch.setattr(kernels, "HAS_KERNELS", has_kernels)
    monkeypatch.setattr(ss, "_triton_scan", lambda: object() if has_triton else None)
    assert ss.cuda_scan(backend) == want


@pytest.mark.parametrize("env,want", [("", "the selective scan in Triton"), ("torch", "the pure-PyTorch scan"),
                                      ("mamba_ssm", "the pure-PyTorch scan")])
def test_cuda_warning_names_the_scan_that_runs(monkeypatch, env, want):
    import types

    from modules import kernels

    monkeypatch.setenv("DECIMAMBA_SCAN", env)
    monkeypatch.setattr(kernels, "HAS_KERNELS", False)
    monkeypatch.setattr(kernels, "_warned", False)
    with pytest.warns(UserWarning, match=f"on CUDA {want} runs"):
        assert kernels.use_kernels("auto", types.SimpleNamespace(is_cuda=True)) is False


def test_cpu_calls_never_import_triton(monkeypatch):
    from modules import kernels
    from modules import selective_scan as ss

    def boom():
        raise AssertionError("a CPU call asked for the Triton scan")
    monkeypatch.delenv("DECIMAMBA_SCAN", raising=False)
    monkeypatch.setattr(kernels, "HAS_KERNELS", False)
    monkeypatch.setattr(ss, "_triton_scan", boom)
    inp, softplus = make_inputs(1, 8, 16, 4, torch.float32)
    torch.testing.assert_close(ss.selective_scan(**inp, delta_softplus=softplus),
                               ss.selective_scan_ref(**inp, delta_softplus=softplus))


def test_auto_without_kernels_routes_cuda_calls_to_triton(monkeypatch):
    """The dispatcher under the default: with no mamba-ssm and a call the Triton scan fits, the Triton
    forward serves inference and selective_scan_triton a call that wants a gradient (stand-ins record which
    ran); on CPU tensors nothing fits and the torch scan runs."""
    from modules import kernels
    from modules import selective_scan as ss

    calls = []
    monkeypatch.delenv("DECIMAMBA_SCAN", raising=False)
    monkeypatch.setattr(kernels, "HAS_KERNELS", False)
    monkeypatch.setattr(ss, "_triton_scan", lambda: lambda *a: calls.append("fwd") or "fwd")
    monkeypatch.setattr(ss, "selective_scan_triton", lambda *a: calls.append("train") or "train")
    inp, softplus = make_inputs(1, 8, 16, 4, torch.float32)
    want = ss.selective_scan_ref(**inp, delta_softplus=softplus)
    torch.testing.assert_close(ss.selective_scan(**inp, delta_softplus=softplus), want)   # CPU: the torch scan
    assert calls == []
    monkeypatch.setattr(ss, "_triton_fits", lambda u, A, B, C: True)                       # as on CUDA
    with torch.no_grad():
        assert ss.selective_scan(**inp, delta_softplus=softplus) == "fwd"
    u = inp["u"].clone().requires_grad_()
    assert ss.selective_scan(**dict(inp, u=u), delta_softplus=softplus) == "train"
    monkeypatch.setenv("DECIMAMBA_SCAN", "torch")
    torch.testing.assert_close(ss.selective_scan(**inp, delta_softplus=softplus), want)
    assert calls == ["fwd", "train"]


# ----------------------------------------------------------------------------------------- GPU
# Compiled (FAST): approximate exp2, log2 and division, <= 2 ulp each (softplus' log2: up to 4e-6
# relative where Δ is smallest), compounded along the ~1000-step memories of the slowest states:
# ~1e-5 expected; 2e-4 stays 3x inside mamba-ssm's own fp32 budget (rtol 6e-4). bf16 as above.
GPU_CASES = [
    ("fp32_all_4099", (2, 200, 4099, 16), torch.float32, 0, "model", FULL, None, 2e-4),
    ("fp32_all_chunk_1008", (1, 384, 20000, 16), torch.float32, 0, "model", FULL, 1008, 2e-4),
    ("bf16_all_20000", (1, 384, 20000, 16), torch.bfloat16, 0, "model", FULL, None, 2**-7),
    ("bf16_plain_contiguous", (1, 256, 9001, 16), torch.bfloat16, 0, "contiguous", NONE, None, 2**-7),
    ("fp32_groups_n8", (2, 256, 3000, 8), torch.float32, 4, "contiguous", FULL, 512, 2e-4),
]


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_triton_scan_gpu(case):
    check_against_torch_scan(case, "cuda")


@requires_cuda
@pytest.mark.parametrize("case", GPU_CASES[1:3], ids=[c[0] for c in GPU_CASES[1:3]])
def test_triton_scan_gpu_prefetch(case):
    """The next tile's loads issued ahead (a variant the benchmark times): the same results."""
    check_against_torch_scan(case, "cuda", prefetch=(True, True))


def check_against_torch_scan(case, device, prefetch=None):
    """One GPU_CASES entry against the torch scan (selective_scan_ref, exact in fp64) of the same
    inputs; grouped B/C one group at a time."""
    from modules.selective_scan import selective_scan_ref
    from modules.triton_scan import selective_scan_fwd

    name, (b, d, l, n), dtype, groups, layout, feats, chunk, rel = case
    inp, softplus = make_inputs(b, d, l, n, dtype, groups, layout, feats, device=device)
    out, last = selective_scan_fwd(**inp, delta_softplus=softplus, return_last_state=True, chunk=chunk,
                                   prefetch=prefetch)
    x = {k: None if v is None else v.double() for k, v in inp.items()}
    outs, lasts = [], []
    for g in range(max(1, groups)):
        sl = slice(g * d // max(1, groups), (g + 1) * d // max(1, groups))
        pick = {k: None if v is None else (v[sl] if k in ("A", "D", "delta_bias") else v[:, sl]) for k, v in x.items()}
        if groups:
            pick["B"], pick["C"] = x["B"][:, g], x["C"][:, g]
        else:
            pick["B"], pick["C"] = x["B"], x["C"]
        o, h = selective_scan_ref(**pick, delta_softplus=softplus, return_last_state=True)
        outs.append(o)
        lasts.append(h)
    assert_matches(out, last, torch.cat(outs, 1), torch.cat(lasts, 1), dtype, rel)


@requires_kernels
def test_triton_scan_equals_mamba_ssm_bf16():
    """mamba-130m's scan shape at 16K tokens, bf16, D, z, softplus: the same output as mamba-ssm's
    kernel up to bf16 rounding (both keep fp32 states), and the same final state."""
    from modules import kernels
    from modules.triton_scan import selective_scan_fwd

    inp, _ = make_inputs(1, 1536, 16384, 16, torch.bfloat16, feats=dict(FULL, h0=False), device="cuda")
    out, last = selective_scan_fwd(**inp, delta_softplus=True, return_last_state=True)
    ref = dict(inp, delta=inp["delta"].contiguous(), B=inp["B"].contiguous(), C=inp["C"].contiguous())
    ref.pop("initial_state")
    ref_out, ref_last = kernels.selective_scan_fn(**ref, delta_softplus=True, return_last_state=True)
    rel = ((out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    assert rel < 4e-3, rel                     # bf16 rounding of two outputs: ~2.3e-3 in norm
    torch.testing.assert_close(last, ref_last, rtol=1e-3, atol=1e-3 * ref_last.abs().max().item())


@requires_cuda
def test_triton_scan_1m_tokens_int64_offsets():
    """b·d·l = 3.2e9 > 2^31 elements (1M tokens, bf16): the rows at the largest offsets (last batch
    row, last channels) equal the torch scan of those rows alone (small offsets)."""
    check_large_offsets(2, 1536, (1 << 20) + 5, "cuda")


def check_large_offsets(b, d, l, device, rows=64):
    from modules.selective_scan import selective_scan_ref
    from modules.triton_scan import selective_scan_fwd

    inp, softplus = make_inputs(b, d, l, 16, torch.bfloat16, device=device)
    out, last = selective_scan_fwd(**inp, delta_softplus=softplus, return_last_state=True)
    sl = slice(d - rows, d)
    x = {k: None if v is None else (v[sl] if k in ("A", "D", "delta_bias") else v[-1:] if k in ("B", "C") else v[-1:, sl])
         for k, v in inp.items()}
    ref_out, ref_last = selective_scan_ref(**{k: None if v is None else v.float() for k, v in x.items()},
                                           delta_softplus=softplus, return_last_state=True)
    assert_matches(out[-1:, sl], last[-1:, sl], ref_out.double(), ref_last.double(), torch.bfloat16, 2**-7)


@requires_kernels
def test_dispatcher_routes_inference_to_triton(monkeypatch):
    """DECIMAMBA_SCAN=triton: calls without gradient run the Triton forward (bit-identical to a
    direct call), calls that need one the Triton forward and backward (modules/triton_scan_bwd.py)."""
    from modules import selective_scan as ss
    from modules.triton_scan import selective_scan_fwd

    inp, softplus = make_inputs(1, 256, 3000, 16, torch.float32, device="cuda")
    monkeypatch.setenv("DECIMAMBA_SCAN", "triton")
    with torch.no_grad():
        out, last = ss.selective_scan(**inp, delta_softplus=softplus, return_last_state=True)
    direct, direct_last = selective_scan_fwd(**inp, delta_softplus=softplus, return_last_state=True)
    assert torch.equal(out, direct) and torch.equal(last, direct_last)
    u = inp["u"].clone().requires_grad_()
    out_g = ss.selective_scan(**dict(inp, u=u), delta_softplus=softplus)
    assert out_g.grad_fn is not None                   # through TritonScanFn (tests/test_triton_scan_bwd.py)
    torch.testing.assert_close(out_g.detach(), out, rtol=1e-3, atol=1e-3 * out.abs().max().item())


@pytest.mark.parametrize("env,has_kernels,fused", [("triton", True, False), ("", True, True), ("mamba_ssm", True, True)])
def test_fused_kernel_is_skipped_when_the_triton_scan_is_chosen(monkeypatch, env, has_kernels, fused):
    """The Mamba-1 mixer's fused mamba_inner_fn (which runs mamba-ssm's own scan) is taken only when the
    scan routed to is mamba-ssm's: under DECIMAMBA_SCAN=triton the layer runs unfused, through the dispatcher.
    Stand-ins: use_kernels says True for the fused-path decision only, mamba_inner_fn records its call."""
    from models import MambaConfig, MambaLMHeadModel
    from modules import kernels

    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64, ssm_cfg={"d_state": 4})).eval()
    mixer = model.backbone.layers[0].mixer
    answers, calls = iter([True]), []
    monkeypatch.setenv("DECIMAMBA_SCAN", env)
    monkeypatch.setattr(kernels, "HAS_KERNELS", has_kernels)
    monkeypatch.setattr(kernels, "use_kernels", lambda backend, t: next(answers, False))
    monkeypatch.setattr(kernels, "mamba_inner_fn", lambda *a, **k: calls.append(1) or torch.zeros(1, 8, 16))
    with torch.no_grad():
        out = mixer(torch.randn(1, 8, 16))[0]
    assert calls == ([1] if fused else [])
    assert out.shape == (1, 8, 16) and (fused or out.abs().sum() > 0)    # unfused: the layer's real output
