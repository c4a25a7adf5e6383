"""GPU tests: the CUDA kernel path against the torch path (fp32 and bf16, forward and backward),
long sequences (128K and 1M tokens: the int32-offset bug class), and GPU generation.
Skipped without CUDA; the kernel tests also need mamba-ssm and causal-conv1d. One CPU test checks
the bf16 budget of the kernel test on the torch path under CPU autocast."""
import pytest
import torch

from models import DecimatingMambaModel, MambaConfig
from tests.conftest import requires_cuda, requires_kernels
from tests.helpers import (BF16_UNIT_ROUNDOFF, GRADS_BF16, LOGITS_BF16, fwd_bwd, over_budget, prompt_positions,
                           randomize, rel_err)

DECI = dict(activate=True, beta=0.5, L_base=1000, decimating_layers=[1, 2], min_seq_len=20)

# bf16 budgets LOGITS_BF16 / GRADS_BF16 and their reasons: tests/helpers.py


needs_cuda, needs_kernels = requires_cuda, requires_kernels     # conftest marks their tests gpu too


def _model(d_model=256, n_layer=4, deci=None, dtype=torch.float32, device="cuda"):
    m = randomize(DecimatingMambaModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=1000), decimation_config=deci))
    return m.to(device, dtype)


def _separate_scores(model):
    """Random weights give near-equal ‖Δ‖ for every token, and bf16 rounding (which differs between
    the conv/scan kernels and the torch ops) then reshuffles the top-k. A sharper dt projection at
    the decimating layers separates the scores, as trained models do. Only there: sharpening every
    layer amplifies bf16 rounding through exp(ΔA) (6% logits error instead of 2%)."""
    with torch.no_grad():
        for i in model.decimation.decimating_layers if model.decimation.activate else []:
            model.backbone.layers[i].mixer.dt_proj.weight.mul_(20)


@needs_kernels
@pytest.mark.parametrize("deci", [None, DECI], ids=["vanilla", "deci"])
def test_kernel_equals_torch_fp32(deci):
    model = _model(deci=deci)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    o_k, l_k, g_k = fwd_bwd(model, ids, "kernel")
    o_t, l_t, g_t = fwd_bwd(model, ids, "torch")
    for (i, a), (_, b) in zip(prompt_positions(o_k.kept_indices), prompt_positions(o_t.kept_indices)):
        assert torch.equal(a, b), f"kept indices differ at layer {i}"
    # fp32 budget of mamba-ssm's own kernel tests (rtol 6e-4, atol 2e-3); gradients: relative
    # norm error 1e-3 (sums over 4K tokens in different orders)
    torch.testing.assert_close(o_k.logits, o_t.logits, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(l_k, l_t, rtol=6e-4, atol=2e-3)
    worst = max((rel_err(g_k[n], g_t[n]), n) for n in g_t)
    assert worst[0] < 1e-3, worst


@needs_kernels
@pytest.mark.parametrize("deci", [None, {**DECI, "decimating_layers": [1]}], ids=["vanilla", "deci"])
def test_kernel_equals_torch_bf16_autocast(deci):
    model = _model(deci=deci)
    _separate_scores(model)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    o_ref, l_ref, g_ref = fwd_bwd(model, ids, "torch")                  # fp32 reference
    o_k, l_k, g_k = fwd_bwd(model, ids, "kernel", autocast=True)
    o_t, l_t, g_t = fwd_bwd(model, ids, "torch", autocast=True)
    for (_, a), (_, b) in zip(prompt_positions(o_k.kept_indices), prompt_positions(o_t.kept_indices)):
        shared = len(set(a.tolist()) & set(b.tolist())) / len(b)
        assert shared >= 0.98, shared                                     # only boundary flips
    # each bf16 path on its own against fp32 (budgets above)
    assert not over_budget({"kernel": o_k.logits, "torch": o_t.logits}, o_ref.logits, LOGITS_BF16)
    assert not over_budget({"kernel": l_k, "torch": l_t}, l_ref, LOGITS_BF16)   # (measured on CPU: 1e-4)
    for n in g_ref:
        bad = over_budget({"kernel": g_k[n], "torch": g_t[n]}, g_ref[n], GRADS_BF16)
        assert not bad, (n, bad)


def test_bf16_budget_passes_rounding_and_fails_a_few_percent_more():
    # On CPU: the torch path of the GPU test's model under CPU autocast stays within LOGITS_BF16 of
    # its fp32 run, and the same output 4% off (as a faulty kernel's would be) fails the budget.
    model = _model(deci={**DECI, "decimating_layers": [1], "L_base": 60}, device="cpu")
    _separate_scores(model)
    model.set_backend("torch")
    ids = torch.randint(0, 1000, (1, 256))
    with torch.no_grad():
        ref = model(ids, num_last_tokens=8).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(ids, num_last_tokens=8).logits.float()
    assert not over_budget({"torch": bf16}, ref, LOGITS_BF16)
    assert over_budget({"torch": bf16}, ref, BF16_UNIT_ROUNDOFF)          # and bf16 did round (not fp32)
    g = torch.Generator().manual_seed(0)
    off = torch.randn(ref.shape, generator=g)
    faulty = bf16 + 0.04 * ref.norm() * off / off.norm()
    assert set(over_budget({"kernel": faulty, "torch": bf16}, ref, LOGITS_BF16)) == {"kernel"}


@needs_kernels
@pytest.mark.parametrize("length", [131_072, 1_048_576], ids=["128K", "1M"])
def test_long_sequences_kernel_equals_torch(length):
    model = _model(d_model=128, n_layer=2, deci={**DECI, "decimating_layers": [1], "L_base": 2000})
    ids = torch.randint(0, 1000, (1, length), device="cuda")
    o_k, l_k, g_k = fwd_bwd(model, ids, "kernel")
    o_t, l_t, g_t = fwd_bwd(model, ids, "torch")
    assert torch.equal(o_k.kept_indices[0][1], o_t.kept_indices[0][1])
    assert o_k.kept_indices[0][1].max().item() == length - 1
    torch.testing.assert_close(o_k.logits, o_t.logits, rtol=6e-4, atol=2e-3)
    worst = max((rel_err(g_k[n], g_t[n]), n) for n in g_t)
    assert worst[0] < 1e-3, worst


@needs_kernels
def test_vanilla_128k_forward_kernel_equals_torch():
    model = _model(d_model=128, n_layer=2)
    ids = torch.randint(0, 1000, (1, 131_072), device="cuda")
    with torch.no_grad():
        model.set_backend("kernel")
        a = model(ids, num_last_tokens=64).logits
        model.set_backend("torch")
        b = model(ids, num_last_tokens=64).logits
    torch.testing.assert_close(a, b, rtol=6e-4, atol=2e-3)


@needs_kernels
def test_generation_kernel_equals_torch():
    model = _model(deci=DECI)
    ids = torch.randint(0, 1000, (2, 3000), device="cuda")
    model.set_backend("kernel")
    a = model.generate(ids, max_length=3010)
    model.set_backend("torch")
    b = model.generate(ids, max_length=3010)
    assert torch.equal(a, b)


@needs_cuda
def test_torch_path_on_cuda_equals_cpu():
    model = _model(d_model=64, n_layer=2, deci={**DECI, "decimating_layers": [1]})
    model.set_backend("torch")
    ids = torch.randint(0, 1000, (1, 3000))
    gpu = model(ids.cuda(), num_last_tokens=4).logits.cpu()
    cpu = model.cpu()(ids, num_last_tokens=4).logits
    torch.testing.assert_close(gpu, cpu, rtol=6e-4, atol=2e-3)


@needs_kernels
def test_kernel_scan_with_initial_state_equals_torch():
    from modules.selective_scan import selective_scan, selective_scan_ref

    g = torch.Generator(device="cuda").manual_seed(0)
    b, e, n, length = 2, 64, 16, 3000
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    args = (r(b, e, length), r(b, e, length), -torch.rand(e, n, generator=g, device="cuda"), r(b, n, length), r(b, n, length))
    kw = dict(D=r(e), z=r(b, e, length), delta_bias=r(e), delta_softplus=True, return_last_state=True,
              initial_state=r(b, e, n))
    y_k, h_k = selective_scan(*args, backend="kernel", **kw)
    y_t, h_t = selective_scan_ref(*args, **kw)
    torch.testing.assert_close(y_k, y_t, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(h_k, h_t, rtol=6e-4, atol=2e-3)


@needs_kernels
def test_streaming_prefill_kernel_equals_one_shot_256k():
    from models.streaming import streaming_prefill

    model = _model(d_model=128, n_layer=4, deci={**DECI, "decimating_layers": [2], "L_base": 2000})
    with torch.no_grad():   # separate the ‖Δ‖ scores (random weights make them near-equal; see the bf16 test)
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.weight.mul_(20)
    ids = torch.randint(0, 1000, (1, 262_144), device="cuda")
    with torch.no_grad():
        one = model(ids, num_last_tokens=1)
        got = streaming_prefill(model, ids, chunk_size=65_536)
    assert torch.equal(got.kept_indices[0][1], one.kept_indices[0][1])
    torch.testing.assert_close(got.logits, one.logits, rtol=6e-4, atol=2e-3)
