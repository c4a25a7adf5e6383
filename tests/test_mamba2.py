"""Mamba-2 (CPU): the SSD scan against a per-token recurrence, the model against transformers'
Mamba2ForCausalLM (saved with save_pretrained), DeciMamba on Mamba-2 against an independent
per-token oracle, decoding, streamed prefill, checkpoints, config and the command line."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel
from models.hf_format import state_from_hf, state_to_hf
from models.hf_mamba2 import config_from_hf_mamba2, config_to_hf_mamba2
from models.streaming import streaming_prefill
from modules.mamba2_mixer import Mamba2Mixer
from modules.ssd import ssd_scan_ref, ssd_step
from tests.helpers import make_pair, randomize

# fp64 scan vs fp64 loop: only round-off of a few thousand fused multiply-adds separates them
FP64 = dict(rtol=1e-10, atol=1e-10)
# fp32 model-level budget (as tests/test_model.py): several layers of fp32 matmuls and scans,
# summed in different orders (chunked vs per token)
FP32 = dict(rtol=1e-4, atol=1e-4)
DECI = dict(activate=True, beta=0.5, L_base=40, decimating_layers=[1, 2], min_seq_len=5)
VOCAB = 61


# ---------------------------------------------------------------------------- independent oracles
def oracle_scan(x, dt, A, B, C, D=None, z=None, h0=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t B_tᵀ; y_t = h_t C_t + D x_t (· SiLU(z_t)), one token at a time.
    x (b, l, h, p), dt (b, l, h) already Δ, B/C (b, l, g, n). Returns y and the final state."""
    bsz, length, nheads, headdim = x.shape
    rep = nheads // B.shape[2]
    state = torch.zeros(bsz, nheads, headdim, B.shape[3], dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(length):
        Bt, Ct = B[:, t].repeat_interleave(rep, 1), C[:, t].repeat_interleave(rep, 1)      # (b, h, n)
        state = torch.exp(dt[:, t] * A)[:, :, None, None] * state \
            + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None, :]
        y = (state * Ct[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        ys.append(y if z is None else y * F.silu(z[:, t]))
    return torch.stack(ys, 1), state


def _rms(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def oracle_logits(model, ids, resp_len=0, deci=None, forced=None):
    """The Mamba-2 DeciMamba forward re-derived from mamba-ssm's Mamba2 and docs/MAMBA2.md (batch 1,
    per-token loops), sharing no code with modules/ beyond parameter access. forced {layer: kept
    positions} replaces the selection at that layer. Returns (logits (1, l', V), [(layer, kept)])."""
    bb = model.backbone
    hidden, residual, kept_all = bb.embedding.weight[ids[0]], None, []
    for i, layer in enumerate(bb.layers):
        residual = hidden if residual is None else hidden + residual
        mx = layer.mixer
        e, g, n, nh, p = mx.d_inner, mx.ngroups, mx.d_state, mx.nheads, mx.headdim
        zxbcdt = _rms(residual, layer.norm.weight) @ mx.in_proj.weight.t()
        z, xbc, dt = zxbcdt[:, :e], zxbcdt[:, e:-nh], zxbcdt[:, -nh:]
        w = mx.conv1d.weight[:, 0]                                                 # (e + 2gn, k)
        length = xbc.shape[0]
        xp = torch.cat([torch.zeros(w.shape[1] - 1, xbc.shape[1]), xbc])
        u = F.silu(torch.stack([(xp[t:t + w.shape[1]].t() * w).sum(-1) for t in range(length)]) + mx.conv1d.bias)
        delta = F.softplus(dt + mx.dt_bias)                                        # (l, h)
        keep = torch.arange(length)
        if deci and deci["activate"] and i in deci["decimating_layers"]:
            l_dec = length - resp_len
            s = deci["decimating_layers"].index(i)
            k = min(l_dec, int(max(min(l_dec, deci["L_base"] * deci["beta"] ** s), deci["min_seq_len"])))
            best = torch.sort(delta[:l_dec].norm(dim=-1), descending=True, stable=True).indices[:k]
            keep = torch.tensor(sorted(best.tolist()) + list(range(l_dec, length)), dtype=torch.long)
        if forced and i in forced:
            keep = forced[i]
        if deci and i in deci["decimating_layers"]:
            kept_all.append((i, keep))
        u, z, delta = u[keep], z[keep], delta[keep]
        x = u[:, :e].reshape(-1, 1, nh, p)
        B = u[:, e:e + g * n].reshape(-1, 1, g, n).transpose(0, 1)
        C = u[:, e + g * n:].reshape(-1, 1, g, n).transpose(0, 1)
        y, _ = oracle_scan(x.transpose(0, 1), delta[None], -torch.exp(mx.A_log), B, C, mx.D)
        y = y[0].reshape(-1, e) * F.silu(z)                                        # gate before the norm
        y = _rms(y.view(-1, g, e // g), mx.norm.weight.view(g, e // g)).reshape(-1, e)
        hidden, residual = y @ mx.out_proj.weight.t(), residual[keep]
    return (_rms(hidden + residual, bb.norm_f.weight) @ model.lm_head.weight.t())[None], kept_all


# ---------------------------------------------------------------------------- models
def tiny2(n_layer=4, **ssm):
    ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 16, **ssm}
    return MambaConfig(d_model=32, n_layer=n_layer, vocab_size=VOCAB, ssm_cfg=ssm, pad_vocab_size_multiple=8)


def pair(deci=None, cfg=None, seed=0):
    return make_pair(cfg or tiny2(), deci, seed)


def load_hf_dir(cls, path, **kw):
    """A transformers Mamba-2 directory through models/hf_mamba2.py's mapping."""
    cfg = config_from_hf_mamba2(json.load(open(path / "config.json")), str(path))
    model = cls(cfg, **kw)
    model.load_state_dict(state_from_hf(load_file(path / "model.safetensors"), cfg.tie_embeddings), strict=True)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers Mamba2ForCausalLM (ngroups 2, chunk 16) saved with save_pretrained."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(1)
    hf = Mamba2ForCausalLM(Mamba2Config(num_heads=8, head_dim=8, hidden_size=32, state_size=16, n_groups=2,
                                        num_hidden_layers=3, vocab_size=64, chunk_size=16))
    randomize(hf, seed=3)
    path = tmp_path_factory.mktemp("hf_mamba2")
    hf.save_pretrained(path)
    return path


def _hf(path):
    from transformers import Mamba2ForCausalLM

    return Mamba2ForCausalLM.from_pretrained(path).eval()


# ---------------------------------------------------------------------------- SSD scan
def _scan_inputs(length, bsz=2, nheads=4, headdim=8, ngroups=2, dstate=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)      # noqa: E731
    return dict(x=r(bsz, length, nheads, headdim), dt=r(bsz, length, nheads), A=-(torch.rand(nheads, generator=g, dtype=dtype) * 3 + 0.2),
                B=r(bsz, length, ngroups, dstate), C=r(bsz, length, ngroups, dstate), dt_bias=r(nheads) - 1,
                D=r(nheads), z=r(bsz, length, nheads, headdim), h0=r(bsz, nheads, headdim, dstate))


@pytest.mark.parametrize("length", [1, 127, 300])
@pytest.mark.parametrize("variant", ["plain", "gate+h0", "D per channel", "dt_limit"])
def test_ssd_scan_equals_per_token_recurrence(length, variant):
    t = _scan_inputs(length)
    D = t["D"] if variant != "D per channel" else torch.randn(4, 8, dtype=torch.float64)
    z, h0 = (t["z"], t["h0"]) if variant == "gate+h0" else (None, None)
    limit = (0.05, 0.8) if variant == "dt_limit" else (0.0, math.inf)
    y, last = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=D, z=z, dt_bias=t["dt_bias"],
                           initial_states=h0, dt_softplus=True, dt_limit=limit, return_final_states=True)
    delta = F.softplus(t["dt"] + t["dt_bias"]).clamp(*limit)
    want, want_last = oracle_scan(t["x"], delta, t["A"], t["B"], t["C"], D, z, h0)
    torch.testing.assert_close(y, want, **FP64)
    torch.testing.assert_close(last, want_last, **FP64)


def test_ssd_scan_gradients_equal_the_oracle():
    t = {k: v.requires_grad_() for k, v in _scan_inputs(150).items()}
    w = torch.randn(2, 150, 4, 8, dtype=torch.float64)
    w_last = torch.randn(2, 4, 8, 16, dtype=torch.float64)

    def grads(fn):
        y, last = fn()
        loss = (y * w).sum() + (last * w_last).sum()     # the final state's gradient path too
        return torch.autograd.grad(loss, list(t.values()))

    ours = grads(lambda: ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"],
                                      dt_bias=t["dt_bias"], initial_states=t["h0"], dt_softplus=True,
                                      return_final_states=True))
    ref = grads(lambda: oracle_scan(t["x"], F.softplus(t["dt"] + t["dt_bias"]), t["A"], t["B"], t["C"],
                                    t["D"], t["z"], t["h0"]))
    for name, a, b in zip(t, ours, ref):
        torch.testing.assert_close(a, b, **FP64, msg=name)


def oracle_scan_grads(x, dt, dt_bias, A, B, C, D, h0, gy):
    """Gradients of <gy, y> for y = oracle_scan(x, softplus(dt + dt_bias), A, B, C, D, None, h0), by
    the hand-derived reverse recurrence (autograd through an 8K-step loop takes minutes):
    G_t = gy_t C_tᵀ + a_{t+1} G_{t+1} is dL/dh_t, a_t = exp(Δ_t A)."""
    delta = F.softplus(dt + dt_bias)
    length, nheads, rep = x.shape[1], x.shape[2], x.shape[2] // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)                # (b, l, h, n)
    a = torch.exp(delta * A)                                                          # (b, l, h)
    states, state = [h0], h0
    for t in range(length):
        state = a[:, t, :, None, None] * state + (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        states.append(state)
    g = {k: torch.zeros_like(v) for k, v in dict(x=x, delta=delta, A=A, B=Bh, C=Ch, D=D).items()}
    carry = torch.zeros_like(h0)
    for t in reversed(range(length)):
        G = carry + gy[:, t, ..., None] * Ch[:, t, :, None]                           # (b, h, p, n)
        prev = states[t]
        g["C"][:, t] = (states[t + 1] * gy[:, t, ..., None]).sum(2)
        g["x"][:, t] = delta[:, t, :, None] * (G * Bh[:, t, :, None]).sum(-1) + D[:, None] * gy[:, t]
        g["B"][:, t] = (G * (delta[:, t, :, None] * x[:, t])[..., None]).sum(2)
        decay_term = (G * prev).sum((2, 3)) * a[:, t]                                 # Σ G ⊙ a h_{t-1}
        g["delta"][:, t] = (G * x[:, t, ..., None] * Bh[:, t, :, None]).sum((2, 3)) + decay_term * A
        g["A"] += (decay_term * delta[:, t]).sum(0)
        g["D"] += (gy[:, t] * x[:, t]).sum((0, 2))
        carry = a[:, t, :, None, None] * G
    gdt = g["delta"] * torch.sigmoid(dt + dt_bias)
    fold = lambda v: v.view(*v.shape[:2], B.shape[2], rep, -1).sum(3)               # noqa: E731  heads -> groups
    return dict(x=g["x"], dt=gdt, dt_bias=gdt.sum((0, 1)), A=g["A"], B=fold(g["B"]), C=fold(g["C"]), D=g["D"], h0=carry)


def test_ssd_scan_fp32_at_8k_tokens_matches_fp64_oracle_values_and_gradients():
    t = _scan_inputs(8192, bsz=1, nheads=4, headdim=8, ngroups=2, dstate=8, dtype=torch.float32)
    t32 = {k: v.clone().requires_grad_() for k, v in t.items()}
    y32 = ssd_scan_ref(t32["x"], t32["dt"], t32["A"], t32["B"], t32["C"], 256, D=t32["D"], dt_bias=t32["dt_bias"],
                       initial_states=t32["h0"], dt_softplus=True)
    t64 = {k: v.double() for k, v in t.items()}
    y64, _ = oracle_scan(t64["x"], F.softplus(t64["dt"] + t64["dt_bias"]), t64["A"], t64["B"], t64["C"],
                         t64["D"], None, t64["h0"])
    w = torch.randn_like(y64)
    (y32 * w.float()).sum().backward()
    want = oracle_scan_grads(t64["x"], t64["dt"], t64["dt_bias"], t64["A"], t64["B"], t64["C"], t64["D"], t64["h0"], w)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    # fp32 against exact, relative norm error: a few fp32 ulps (measured 8.5e-8 for y, at most 5.5e-7
    # for a gradient, D's, which sums all 8K tokens); the bounds leave about 10x
    assert rel(y32, y64) < 1e-6
    for k, v in want.items():
        assert rel(t32[k].grad, v) < 1e-5, k


def test_the_gradient_oracle_agrees_with_autograd_on_the_loop():
    t = _scan_inputs(60)
    leaves = {k: t[k].clone().requires_grad_() for k in ("x", "dt", "dt_bias", "A", "B", "C", "D", "h0")}
    y, _ = oracle_scan(leaves["x"], F.softplus(leaves["dt"] + leaves["dt_bias"]), leaves["A"], leaves["B"],
                       leaves["C"], leaves["D"], None, leaves["h0"])
    w = torch.randn_like(y)
    (y * w).sum().backward()
    want = oracle_scan_grads(*(t[k] for k in ("x", "dt", "dt_bias", "A", "B", "C", "D", "h0")), w)
    for k, v in want.items():
        torch.testing.assert_close(v, leaves[k].grad, **FP64, msg=k)


def test_recurrent_steps_equal_the_scan():
    t = _scan_inputs(40)
    y, last = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], dt_bias=t["dt_bias"],
                           initial_states=t["h0"], dt_softplus=True, return_final_states=True)
    state = t["h0"].clone()
    steps = [ssd_step(state, t["x"][:, i], t["dt"][:, i], t["A"], t["B"][:, i], t["C"][:, i], t["D"],
                      t["dt_bias"], True) for i in range(40)]
    torch.testing.assert_close(torch.stack(steps, 1), y, **FP64)
    torch.testing.assert_close(state, last, **FP64)


# ---------------------------------------------------------------------------- vs transformers
def test_logits_equal_transformers_mamba2(hf_dir):
    ours, hf = load_hf_dir(MambaLMHeadModel, hf_dir), _hf(hf_dir)
    ids = torch.randint(0, 64, (2, 75))             # 75: not a multiple of any chunk size used
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **FP32)


def test_gradients_equal_transformers_mamba2(hf_dir):
    ours, hf = load_hf_dir(MambaLMHeadModel, hf_dir), _hf(hf_dir)
    ids = torch.randint(0, 64, (1, 75))
    F.cross_entropy(ours(ids).logits[0, :-1], ids[0, 1:]).backward()
    F.cross_entropy(hf(ids).logits[0, :-1], ids[0, 1:]).backward()
    theirs = {k.replace("backbone.embeddings.", "backbone.embedding."): p.grad for k, p in hf.named_parameters()}
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name], **FP32, msg=name)


def test_greedy_generation_equals_transformers_token_for_token(hf_dir):
    ours, hf = load_hf_dir(DecimatingMambaModel, hf_dir), _hf(hf_dir)
    ids = torch.randint(0, 64, (2, 37))
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(ids, max_length=49), want)


def test_from_pretrained_reads_a_transformers_mamba2_directory(hf_dir):
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        got = MambaLMHeadModel.from_pretrained(str(hf_dir))(ids).logits
        torch.testing.assert_close(got, load_hf_dir(MambaLMHeadModel, hf_dir)(ids).logits, rtol=0, atol=0)


def test_transformers_loads_what_we_write_in_its_format(tmp_path):
    model = randomize(MambaLMHeadModel(tiny2(n_layer=2)))
    state = state_to_hf({k: v.contiguous() for k, v in model.state_dict().items()})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf_mamba2(model.config, "float32")))
    ids = torch.randint(0, VOCAB, (1, 50))
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path)(ids).logits, model(ids).logits, **FP32)
    assert load_hf_dir(MambaLMHeadModel, tmp_path).config.ssm_cfg == {**model.config.ssm_cfg, **{
        "d_conv": 4, "expand": 2, "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4,
        "dt_limit": [0.0, math.inf], "bias": False, "conv_bias": True}}


# ---------------------------------------------------------------------------- state-spaces format
def test_mamba_ssm_names_shapes_and_round_trip(tmp_path):
    model = randomize(DecimatingMambaModel(tiny2(n_layer=3)))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("backbone.layers.1.")}
    # mamba-ssm 2.3.2 Mamba2: in_proj (2e + 2gn + h, d), conv over e + 2gn channels, per-head dt_bias/A_log/D
    assert shapes == {"backbone.layers.1.norm.weight": (32,), "backbone.layers.1.mixer.in_proj.weight": (200, 32),
                      "backbone.layers.1.mixer.conv1d.weight": (128, 1, 4), "backbone.layers.1.mixer.conv1d.bias": (128,),
                      "backbone.layers.1.mixer.dt_bias": (8,), "backbone.layers.1.mixer.A_log": (8,),
                      "backbone.layers.1.mixer.D": (8,), "backbone.layers.1.mixer.norm.weight": (64,),
                      "backbone.layers.1.mixer.out_proj.weight": (32, 64)}
    model.save_pretrained(str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["ssm_cfg"]["layer"] == "Mamba2"
    loaded = DecimatingMambaModel.from_pretrained(str(tmp_path), decimation_config=DECI)
    assert isinstance(loaded.backbone.layers[0].mixer, Mamba2Mixer)
    ids = torch.randint(0, VOCAB, (1, 60))
    model.set_decimation(DECI)
    assert torch.equal(loaded(ids, num_last_tokens=2).logits, model(ids, num_last_tokens=2).logits)


def test_config_accepts_mamba2_fields_and_refuses_the_rest():
    state_spaces_130m = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                         "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                         "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                         "tie_embeddings": True}
    assert MambaConfig.from_dict(state_spaces_130m).padded_vocab_size == 50288
    with pytest.raises(ValueError, match=r"\['dt_rank'\] are unknown for layer 'Mamba2'"):
        tiny2(dt_rank=4)
    with pytest.raises(ValueError, match=r"\['headdim'\] are unknown for layer 'Mamba1'"):
        MambaConfig(d_model=32, n_layer=1, ssm_cfg={"headdim": 8})
    with pytest.raises(ValueError, match="heads\\*headdim"):
        tiny2(headdim=12)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        tiny2(ngroups=3)
    with pytest.raises(ValueError, match="choose 'Mamba1' or 'Mamba2'"):
        MambaConfig(d_model=32, n_layer=1, ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(ValueError, match="d_ssm"):
        tiny2(d_ssm=32)


def test_kernel_backend_is_refused_on_cpu_with_the_reason():
    model = MambaLMHeadModel(tiny2(n_layer=1), backend="kernel")
    with pytest.raises(RuntimeError, match="Mamba-2 kernels|CUDA"):
        model(torch.zeros(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------------- decimation
@pytest.mark.parametrize("deci", [
    dict(activate=False, decimating_layers=[1], L_base=10),
    dict(activate=True, decimating_layers=[1], L_base=math.inf),
    dict(activate=True, decimating_layers=[1], L_base=500),        # budget above the length
])
def test_decimation_off_equals_vanilla(deci):
    vanilla, model = pair(deci)
    ids = torch.randint(0, VOCAB, (1, 90))
    assert torch.equal(model(ids, num_last_tokens=5).logits, vanilla(ids, num_last_tokens=5).logits)


@pytest.mark.parametrize("layers,resp", [([1], 3), ([1, 2], 1), ([2, 0], 0)])
def test_decimated_forward_equals_oracle(layers, resp):
    deci = {**DECI, "decimating_layers": layers}
    _, model = pair(deci)
    ids = torch.randint(0, VOCAB, (1, 120))
    out = model(ids, num_last_tokens=resp)
    with torch.no_grad():
        want, want_kept = oracle_logits(model, ids, resp, deci)
    torch.testing.assert_close(out.logits, want[:, -resp:] if resp else want, **FP32)
    assert [i for i, _ in out.kept_indices] == sorted(layers)
    for (_, got), (_, exp) in zip(out.kept_indices, sorted(want_kept, key=lambda t: t[0])):
        assert torch.equal(got, exp)
    assert len(out.kept_indices[0][1]) < 120                        # it did decimate


def test_batched_decimation_is_per_row():
    _, model = pair(DECI)
    ids = torch.randint(0, VOCAB, (3, 100))
    out = model(ids, num_last_tokens=2)
    for i in range(3):
        one = model(ids[i:i + 1], num_last_tokens=2)
        torch.testing.assert_close(out.logits[i:i + 1], one.logits, **FP32)
        for (_, kb), (_, k1) in zip(out.kept_indices, one.kept_indices):
            assert torch.equal(kb[i], k1)


# ---------------------------------------------------------------------------- decoding and streaming
def test_prefix_then_steps_equal_full_forward():
    vanilla, _ = pair()
    ids = torch.randint(0, VOCAB, (2, 70))
    full = vanilla(ids).logits
    caches = vanilla.allocate_inference_cache()
    got = [vanilla(ids[:, :50], num_last_tokens=1, caches=caches).logits[:, -1]]
    got += [vanilla.step(ids[:, t:t + 1], caches)[:, -1] for t in range(50, 70)]
    torch.testing.assert_close(torch.stack(got, 1), full[:, 49:], **FP32)


def test_steps_after_a_decimated_prefill_equal_the_oracle():
    # The deeper layers continue from the state of the kept prompt tokens: the oracle is the
    # forward over prompt + new tokens with the decimating layer keeping (kept prompt) ∪ (new).
    deci = {**DECI, "decimating_layers": [1], "L_base": 30}
    _, model = pair(deci)
    ids = torch.randint(0, VOCAB, (1, 100))
    seq = model.generate(ids, max_length=108)
    caches = model.allocate_inference_cache()
    prefill = model(ids, num_last_tokens=1, caches=caches)
    kept = prefill.kept_indices[0][1]
    assert len(kept) == 31
    steps = [model.step(seq[:, t:t + 1], caches)[:, -1] for t in range(100, 107)]
    with torch.no_grad():
        want, _ = oracle_logits(model, seq[:, :107], 0, None, forced={1: torch.cat([kept, torch.arange(100, 107)])})
    torch.testing.assert_close(torch.cat([prefill.logits[:, -1:], torch.stack(steps, 1)], 1), want[:, -8:], **FP32)
    assert torch.equal(seq[0, 100:], want[0, -8:].argmax(-1))


@pytest.mark.parametrize("deci", [None, DECI, {**DECI, "decimating_layers": [2]}], ids=["vanilla", "deci", "deci-one"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_streamed_prefill_equals_one_shot(deci, chunk):
    _, model = pair(deci)
    ids = torch.randint(0, VOCAB, (2, 201))
    one = model(ids, num_last_tokens=3)
    got = streaming_prefill(model, ids, chunk_size=chunk, num_last_tokens=3)
    torch.testing.assert_close(got.logits, one.logits, **FP32)
    for (_, a), (_, b) in zip(got.kept_indices, one.kept_indices, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(model.generate(ids, 209, prefill_chunk_size=chunk), model.generate(ids, 209))


# ---------------------------------------------------------------------------- command line
def test_cli_trains_a_scratch_mamba2_deci_model_then_evaluates_it_from_load_cp(tmp_path):
    import finetune_ssm

    scratch = {"d_model": 16, "n_layer": 3, "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2}}
    cfg = {"activate_logging": False, "model_device": "cpu", "dataset": "niah_custom", "mamba_arch": "deci",
           "scratch_model_config": scratch, "eval_steps": 2, "save_steps": 2, "grad_accum_steps": 2,
           "train_micro_batch_size": 2, "epochs": 1, "niah_train_set_size": 4, "niah_context_len_train": 120,
           "niah_noise_split_train": "validation", "niah_needle_depths_eval": [0.5], "niah_context_lens_eval": [150],
           "niah_samples_per_cell": 1, "decimating_layers": [1], "decimation_max_p_L_base": 60, "lr": 1e-3,
           "max_step": 2, "output_dir": str(tmp_path)}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert finetune_ssm.main(["--config", str(tmp_path / "c.json"), "--run-name", "m2"]) == 0
    ckpt = tmp_path / "m2" / "epoch_0_step_2"
    assert json.load(open(ckpt / "config.json"))["ssm_cfg"]["layer"] == "Mamba2"
    args = ["--eval", "2", "--device", "cpu", "--set", f"load_cp={ckpt}", "--set", f"output_dir={tmp_path}",
            "--set", "niah_context_lens_eval=[200]", "--set", "niah_needle_depths_eval=[0.5]",
            "--set", "decimating_layers=[1]", "--set", "decimation_max_p_L_base=50", "--run-name", "ev"]
    assert finetune_ssm.main(args) == 0
    recs = [json.loads(x) for x in open(tmp_path / "ev" / "results.jsonl")]
    assert recs and all(r["task"] == "niah_custom" and 0 <= r["score"] <= 1 for r in recs)


def test_kernel_dispatch_runs_int32_overflowing_sequences_in_exact_segments(monkeypatch):
    # mamba-ssm's SSD kernels index in int32: ssd_scan must split a sequence whose tensors would
    # pass 2³¹ elements, each segment starting from the last one's state. Checked here with a
    # stand-in kernel (the torch scan) that records the lengths it is called on and a 2³¹ scaled down.
    from modules import kernels, ssd

    calls = []

    def fake_kernel(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                    dt_softplus=False, dt_limit=None, return_final_states=False):
        assert all(t.is_contiguous() for t in (x, dt, B, C)) and ssd.max_offset(x) <= ssd.INT32_MAX
        calls.append(x.shape[1])
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                            dt_limit, return_final_states)

    monkeypatch.setattr(kernels, "use_ssd_kernels", lambda backend, t: True)
    monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", fake_kernel)
    monkeypatch.setattr(ssd, "INT32_MAX", 2 * 4 * 8 * 100)      # batch 2 × 4 heads × headdim 8: 100 tokens
    t = _scan_inputs(350)
    y, last = ssd.ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], 16, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                           initial_states=t["h0"], dt_softplus=True, return_final_states=True)
    assert calls == [96, 96, 96, 62]                             # whole chunks of 16 under the bound
    want, want_last = oracle_scan(t["x"], F.softplus(t["dt"] + t["dt_bias"]), t["A"], t["B"], t["C"],
                                  t["D"], t["z"], t["h0"])
    torch.testing.assert_close(y, want, **FP64)
    torch.testing.assert_close(last, want_last, **FP64)


def test_conv_kernel_gets_only_layouts_causal_conv1d_accepts(monkeypatch):
    # causal-conv1d reads a channel-last view (in_proj's rows) only when stride(0) and stride(2) are
    # multiples of 8; d_model 128 with 2 groups × d_state 128 gives rows of 1,028 (on the H200 it raised).
    # Stand-in kernels: a conv that enforces that rule, then computes the causal conv in torch, and the
    # torch SSD scan; the mixer's output must equal its torch path.
    from modules import kernels

    calls = []

    def fake_conv(x, weight, bias=None, activation=None):
        calls.append(x.shape)
        if x.stride(1) == 1 and x.stride(2) > 1:
            assert x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0, x.stride()
        y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., :x.shape[2]]
        return F.silu(y)

    def fake_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                  dt_softplus=False, dt_limit=None, return_final_states=False):
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                            dt_limit, return_final_states)

    torch.manual_seed(0)
    mixer = Mamba2Mixer(128, d_state=128, ngroups=2, headdim=64, chunk_size=16, layer_idx=0, use_mem_eff_path=False)
    assert mixer.in_proj.out_features == 1028
    hidden = torch.randn(2, 40, 128)
    mixer.backend = "torch"
    want = mixer(hidden)[0]
    monkeypatch.setattr(kernels, "use_ssd_kernels", lambda backend, t: True)
    monkeypatch.setattr(kernels, "causal_conv1d_fn", fake_conv)
    monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", fake_scan)
    torch.testing.assert_close(mixer(hidden)[0], want, rtol=1e-5, atol=1e-5)   # same fp32 ops, reordered
    assert len(calls) == 1
    from modules import ssd
    monkeypatch.setattr(ssd, "INT32_MAX", 1000)      # an input even a copy cannot pass to the kernel: torch's conv
    torch.testing.assert_close(mixer(hidden)[0], want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1


def test_ssd_kernels_serve_without_causal_conv1d(monkeypatch):
    # mamba-ssm installed without causal-conv1d: the SSD kernel (a stand-in: the torch scan, recording
    # its calls) runs the scan, the conv runs in torch, and the fused kernel (which calls causal-conv1d)
    # is not chosen even on its mem-efficient path; the output equals the torch path's
    from modules import kernels

    calls = []

    def fake_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                  dt_softplus=False, dt_limit=None, return_final_states=False):
        calls.append(x.shape[1])
        return ssd_scan_ref(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, dt_softplus,
                            dt_limit, return_final_states)

    def no_fused(*args, **kwargs):
        raise AssertionError("the fused kernel needs causal-conv1d")

    torch.manual_seed(0)
    mixer = Mamba2Mixer(64, d_state=16, headdim=16, chunk_size=16, layer_idx=0, use_mem_eff_path=True)
    hidden = torch.randn(2, 40, 64)
    mixer.backend = "torch"
    want = mixer(hidden)[0]
    mixer.backend = "auto"
    monkeypatch.setattr(kernels, "use_ssd_kernels", lambda backend, t: True)
    monkeypatch.setattr(kernels, "causal_conv1d_fn", None)
    monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", fake_scan)
    monkeypatch.setattr(kernels, "mamba_split_conv1d_scan_combined", no_fused)
    torch.testing.assert_close(mixer(hidden)[0], want, rtol=1e-5, atol=1e-5)   # same fp32 ops, reordered
    assert calls == [40]


def test_ssd_kernels_do_not_need_causal_conv1d(monkeypatch):
    import types

    from modules import kernels

    cuda_tensor = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(kernels, "_ssd_warned", False)          # the fallback warns once per process
    monkeypatch.setattr(kernels, "causal_conv1d_fn", None)
    monkeypatch.setattr(kernels, "_ssd_kernels", lambda: (object(), object(), None))
    assert kernels.use_ssd_kernels("auto", cuda_tensor) and not kernels.has_conv_kernel()
    monkeypatch.setattr(kernels, "_ssd_kernels", lambda: (None, None, "ImportError: no mamba_ssm"))
    with pytest.warns(UserWarning, match="pure-PyTorch SSD"):
        assert not kernels.use_ssd_kernels("auto", cuda_tensor)


def test_conv_input_follows_causal_conv1d_layout_rules(monkeypatch):
    from modules import ssd

    def view(rows, d, b=2, length=5):       # (b, d, l) channel-last view into (b, l, rows), as in_proj's output
        return torch.randn(b, length, rows)[..., :d].transpose(1, 2)

    ok = view(1544, 1024)
    assert ssd.conv_input(ok) is ok                                        # valid channel-last: no copy
    for bad in (view(1028, 512), view(520, 260), view(1028, 768, b=1, length=1)):
        fixed = ssd.conv_input(bad)                                        # rows, channels, a 1-token batch of 1
        assert fixed.stride() == (bad.shape[1] * bad.shape[2], bad.shape[2], 1) and torch.equal(fixed, bad)
    monkeypatch.setattr(ssd, "INT32_MAX", 100)                             # a copy too large for uint32 offsets
    assert ssd.conv_input(view(1544, 1024)) is None
