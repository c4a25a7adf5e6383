"""GPU tests for Falcon-Mamba: the kernel path (causal-conv1d and selective_scan_fn kernels with
the B/C/dt RMS norms in PyTorch between them; never mamba_inner_fn, which has no such norms)
against the torch path, fp32 and bf16, and against transformers' FalconMambaForCausalLM on CUDA.
Skipped without CUDA and the mamba-ssm / causal-conv1d kernels."""
import pytest
import torch

from models import DecimatingMambaModel, MambaConfig
from tests.conftest import requires_kernels
from tests.helpers import LOGITS_BF16, fwd_bwd, over_budget, prompt_positions, randomize, rel_err

pytestmark = pytest.mark.gpu
DECI = dict(activate=True, beta=0.5, L_base=1000, decimating_layers=[1, 2], min_seq_len=20)
FALCON = {"d_state": 16, "b_c_dt_rms": True, "mixer_rms_eps": 1e-6}
# fp32 budget of mamba-ssm's own kernel tests (rtol 6e-4, atol 2e-3), as tests/test_gpu.py
KERNEL_FP32 = dict(rtol=6e-4, atol=2e-3)


def _falcon(deci=None, d_model=256, n_layer=4, sharpen=False):
    m = randomize(DecimatingMambaModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=1000, ssm_cfg=FALCON,
                                                   tie_embeddings=True), decimation_config=deci))
    if sharpen:     # random weights give near-equal ‖Δ‖ per token; separate them as trained models do
        with torch.no_grad():
            for layer in m.backbone.layers:
                layer.mixer.dt_proj.weight.mul_(20)
    return m.to("cuda")


@requires_kernels
@pytest.mark.parametrize("deci", [None, DECI], ids=["vanilla", "deci"])
def test_falcon_kernel_equals_torch_fp32(deci):
    model = _falcon(deci)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    o_k, l_k, g_k = fwd_bwd(model, ids, "kernel")
    o_t, l_t, g_t = fwd_bwd(model, ids, "torch")
    for (i, a), (_, b) in zip(prompt_positions(o_k.kept_indices), prompt_positions(o_t.kept_indices)):
        assert torch.equal(a, b), f"kept indices differ at layer {i}"
    torch.testing.assert_close(o_k.logits, o_t.logits, **KERNEL_FP32)
    torch.testing.assert_close(l_k, l_t, **KERNEL_FP32)
    worst = max((rel_err(g_k[n], g_t[n]), n) for n in g_t)     # relative norm 1e-3: sums over 4K tokens
    assert worst[0] < 1e-3, worst


@requires_kernels
@pytest.mark.parametrize("deci", [None, {**DECI, "decimating_layers": [1]}], ids=["vanilla", "deci"])
def test_falcon_kernel_equals_torch_bf16_autocast(deci):
    model = _falcon(deci, sharpen=True)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    o_ref, _, _ = fwd_bwd(model, ids, "torch")                          # fp32 reference
    o_k, _, _ = fwd_bwd(model, ids, "kernel", autocast=True)
    o_t, _, _ = fwd_bwd(model, ids, "torch", autocast=True)
    for (_, a), (_, b) in zip(prompt_positions(o_k.kept_indices), prompt_positions(o_t.kept_indices)):
        assert len(set(a.tolist()) & set(b.tolist())) / len(b) >= 0.98   # only boundary flips
    # each bf16 path on its own against fp32, with the budget of tests/helpers.py (same 4-layer shape;
    # the Falcon norms add 3 roundings per layer, inside its headroom)
    assert not over_budget({"kernel": o_k.logits, "torch": o_t.logits}, o_ref.logits, LOGITS_BF16)


@requires_kernels
def test_falcon_bf16_weights_from_pretrained_kernel_equals_torch(tmp_path):
    """from_pretrained(dtype=bf16): bf16 weights, fp32 A_log / D / dt_proj.bias, on both paths."""
    _falcon(sharpen=True).save_pretrained(tmp_path)          # transformers format (Falcon-Mamba's default)
    ref = DecimatingMambaModel.from_pretrained(str(tmp_path), device="cuda", backend="torch")
    m = DecimatingMambaModel.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    assert m.backbone.layers[0].mixer.A_log.dtype == torch.float32
    assert m.backbone.layers[0].mixer.in_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    with torch.no_grad():
        want = ref(ids, num_last_tokens=8).logits
        m.set_backend("kernel")
        got_k = m(ids, num_last_tokens=8).logits
        m.set_backend("torch")
        got_t = m(ids, num_last_tokens=8).logits
    # bf16 weights as well as activations: about twice the roundings of autocast, so 2 x LOGITS_BF16
    assert not over_budget({"kernel": got_k, "torch": got_t}, want, 2 * LOGITS_BF16)


@requires_kernels
def test_falcon_generation_kernel_equals_torch():
    model = _falcon(DECI)
    ids = torch.randint(0, 1000, (2, 3000), device="cuda")
    model.set_backend("kernel")
    a = model.generate(ids, max_length=3010)
    model.set_backend("torch")
    b = model.generate(ids, max_length=3010)
    assert torch.equal(a, b)


@requires_kernels
def test_falcon_kernel_path_equals_transformers_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.FalconMambaConfig(vocab_size=1000, hidden_size=256, state_size=16, num_hidden_layers=4,
                                         eos_token_id=None, bos_token_id=None, pad_token_id=None)
    hf = randomize(transformers.FalconMambaForCausalLM(cfg)).to("cuda").eval()
    hf.save_pretrained(tmp_path)
    ours = DecimatingMambaModel.from_pretrained(str(tmp_path), device="cuda", backend="kernel")
    ids = torch.randint(0, 1000, (1, 2048), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **KERNEL_FP32)
