"""GPU tests for Falcon-Mamba: the kernel path (causal-conv1d and selective_scan_fn kernels with
the B/C/dt RMS norms in PyTorch between them; never mamba_inner_fn, which has no such norms)
against the torch path, fp32 and bf16, and against transformers' FalconMambaForCausalLM on CUDA.
Skipped without CUDA and the mamba-ssm / causal-conv1d kernels."""
import pytest
import torch
import torch.nn.functional as F

from models import DecimatingMambaModel, MambaConfig
from tests.conftest import requires_kernels
from tests.helpers import randomize

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


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _fwd_bwd(model, ids, backend, resp=8, autocast=False):
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, num_last_tokens=resp)
    loss = F.cross_entropy(out.logits[0, :-1].float(), ids[0, -resp + 1:])
    loss.backward()
    return out, loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@requires_kernels
@pytest.mark.parametrize("deci", [None, DECI], ids=["vanilla", "deci"])
def test_falcon_kernel_equals_torch_fp32(deci):
    model = _falcon(deci)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    o_k, l_k, g_k = _fwd_bwd(model, ids, "kernel")
    o_t, l_t, g_t = _fwd_bwd(model, ids, "torch")
    for (i, a), (_, b) in zip(o_k.kept_indices, o_t.kept_indices):
        assert torch.equal(a, b), f"kept indices differ at layer {i}"
    torch.testing.assert_close(o_k.logits, o_t.logits, **KERNEL_FP32)
    torch.testing.assert_close(l_k, l_t, **KERNEL_FP32)
    worst = max((_rel(g_k[n], g_t[n]), n) for n in g_t)     # relative norm 1e-3: sums over 4K tokens
    assert worst[0] < 1e-3, worst


@requires_kernels
@pytest.mark.parametrize("deci", [None, {**DECI, "decimating_layers": [1]}], ids=["vanilla", "deci"])
def test_falcon_kernel_equals_torch_bf16_autocast(deci):
    model = _falcon(deci, sharpen=True)
    ids = torch.randint(0, 1000, (1, 4096), device="cuda")
    o_ref, _, _ = _fwd_bwd(model, ids, "torch")                          # fp32 reference
    o_k, _, _ = _fwd_bwd(model, ids, "kernel", autocast=True)
    o_t, _, _ = _fwd_bwd(model, ids, "torch", autocast=True)
    for (_, a), (_, b) in zip(o_k.kept_indices, o_t.kept_indices):
        assert len(set(a.tolist()) & set(b.tolist())) / len(b) >= 0.98   # only boundary flips
    # each path's bf16 rounding moves it from fp32; the paths agree within twice the larger of the two
    noise = max(_rel(o_k.logits, o_ref.logits), _rel(o_t.logits, o_ref.logits))
    assert _rel(o_k.logits, o_t.logits) <= 2 * noise + 1e-3, (noise, _rel(o_k.logits, o_t.logits))


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
    noise = max(_rel(got_k, want), _rel(got_t, want))
    assert noise < 0.1, noise                       # bf16 weights and activations: a few % relative
    assert _rel(got_k, got_t) <= 2 * noise + 1e-3


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
