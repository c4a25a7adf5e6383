"""Whole-model behaviour: equivalence with independent implementations, decimation, decoding, I/O."""
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel
from models.hub import HubUnavailableError
from tests.helpers import make_pair, oracle_logits, oracle_prefill_then_steps, randomize, tiny_config

# fp32 model-level budget: several layers of fp32 matmuls and scans summed in different orders.
FP32 = dict(rtol=1e-4, atol=1e-4)
DECI = dict(activate=True, record_debug_params=False, type="max_p", beta=0.5, L_base=40,
            decimating_layers=[1, 2], min_seq_len=5)


def test_vanilla_logits_equal_transformers_mamba():
    from transformers import MambaConfig as HFConfig, MambaForCausalLM

    cfg = tiny_config()
    ours = randomize(MambaLMHeadModel(cfg))
    hf = MambaForCausalLM(HFConfig(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, state_size=8, num_hidden_layers=cfg.n_layer,
        expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, time_step_rank=math.ceil(cfg.d_model / 16),
        residual_in_fp32=True, tie_word_embeddings=False, layer_norm_epsilon=1e-5))
    # transformers names the embedding 'embeddings'; load the state dict directly (its
    # from_pretrained would silently leave that matrix random on mamba-ssm key names).
    hf.load_state_dict({k.replace("backbone.embedding.", "backbone.embeddings."): v
                        for k, v in ours.state_dict().items()}, strict=True)
    ids = torch.randint(0, 61, (2, 97))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **FP32)


@pytest.mark.parametrize("rms_norm", [True, False])
@pytest.mark.parametrize("layers,resp", [([1], 3), ([1, 2], 1), ([2, 0], 0)])
def test_decimated_forward_equals_oracle(rms_norm, layers, resp):
    deci = {**DECI, "decimating_layers": layers}
    _, model = make_pair(tiny_config(rms_norm=rms_norm), deci)
    ids = torch.randint(0, 61, (1, 120))
    out = model(ids, num_last_tokens=resp)
    ref, ref_kept = oracle_logits(model, ids, resp, deci)
    want = ref[:, -resp:] if resp else ref
    torch.testing.assert_close(out.logits, want, **FP32)
    assert [i for i, _ in out.kept_indices] == [i for i, _ in ref_kept]
    for (_, got), (_, exp) in zip(out.kept_indices, ref_kept):
        assert torch.equal(got, exp)
    if resp == 0:   # everything is decimatable: the head sees the decimated length
        assert out.logits.shape[1] == len(ref_kept[-1][1])


@pytest.mark.parametrize("deci", [
    dict(activate=False, decimating_layers=[1], L_base=10),
    dict(activate=True, decimating_layers=[], L_base=10),
    dict(activate=True, decimating_layers=[1], L_base=math.inf),
    dict(activate=True, decimating_layers=[1], L_base=500),        # budget above the length
])
def test_noop_decimation_equals_vanilla(deci):
    vanilla, model = make_pair(deci=deci)
    ids = torch.randint(0, 61, (1, 90))
    assert torch.equal(model(ids, num_last_tokens=5).logits, vanilla(ids, num_last_tokens=5).logits)


def test_kept_indices_report_listed_layers_in_order():
    _, model = make_pair(deci={**DECI, "decimating_layers": [2, 1]})
    ids = torch.randint(0, 61, (1, 90))
    out = model(ids, num_last_tokens=1)
    assert [i for i, _ in out.kept_indices] == [1, 2]
    # layer 1 is s=1 (list position): 40·β = 20 + 1 tail; layer 2 (s=0, budget 40) keeps all 21 left
    assert len(out.kept_indices[0][1]) == 21 and torch.equal(out.kept_indices[1][1], torch.arange(21))
    model.set_decimation({**DECI, "activate": False})
    off = model(ids, num_last_tokens=1).kept_indices
    assert [i for i, _ in off] == [1, 2] and all(torch.equal(k, torch.arange(90)) for _, k in off)


def test_backward_through_decimation_matches_oracle():
    _, model = make_pair(deci=DECI)
    ids = torch.randint(0, 61, (1, 80))
    labels = torch.randint(0, 61, (3,))
    loss = F.cross_entropy(model(ids, num_last_tokens=4).logits[0, :-1], labels)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(oracle_logits(model, ids, 4, DECI)[0][0, -4:-1], labels)
    ref.backward()
    torch.testing.assert_close(loss, ref, **FP32)
    for n, p in model.named_parameters():
        # gradients: 10x the fp32 forward budget (they sum over tokens and layers)
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-4, msg=n)


def test_batched_decimation_equals_one_by_one():
    _, model = make_pair(deci=DECI)
    ids = torch.randint(0, 61, (3, 100))
    out = model(ids, num_last_tokens=2)
    for i in range(3):
        one = model(ids[i:i + 1], num_last_tokens=2)
        torch.testing.assert_close(out.logits[i:i + 1], one.logits, **FP32)
        for (_, kb), (_, k1) in zip(out.kept_indices, one.kept_indices):
            assert torch.equal(kb[i], k1)


def test_prefix_then_steps_equal_full_forward():
    vanilla, _ = make_pair()
    ids = torch.randint(0, 61, (2, 70))
    full = vanilla(ids).logits
    caches = vanilla.allocate_inference_cache()
    got = [vanilla(ids[:, :50], num_last_tokens=1, caches=caches).logits[:, -1]]
    got += [vanilla.step(ids[:, t:t + 1], caches)[:, -1] for t in range(50, 70)]
    torch.testing.assert_close(torch.stack(got, 1), full[:, 49:], **FP32)


def test_decimated_prefill_then_steps_equal_oracle():
    # The prompt is decimated once (layer 1 keeps 40 of 49 candidates, layer 2 20 of those 40);
    # each step then continues the recurrent states the kept tokens left.
    _, model = make_pair(deci=DECI)
    ids = torch.randint(0, 61, (1, 70))
    caches = model.allocate_inference_cache()
    prefill = model(ids[:, :50], num_last_tokens=1, caches=caches)
    assert [len(k) for _, k in prefill.kept_indices] == [41, 21]
    got = [prefill.logits[:, -1]] + [model.step(ids[:, t:t + 1], caches)[:, -1] for t in range(50, 70)]
    torch.testing.assert_close(torch.stack(got, 1), oracle_prefill_then_steps(model, ids, 50, DECI), **FP32)


def test_greedy_generation_matches_argmax_of_full_forward():
    model, _ = make_pair()
    ids = torch.randint(0, 61, (2, 30))
    seq = model.generate(ids, max_length=40)
    assert seq.shape == (2, 40) and torch.equal(seq[:, :30], ids)
    for t in range(30, 40):   # each new token is the argmax given everything before it
        assert torch.equal(seq[:, t], model(seq[:, :t]).logits[:, -1].argmax(-1))


def test_deci_generation_uses_decimated_prefill_state():
    deci = {**DECI, "L_base": 20}
    _, model = make_pair(deci=deci)
    ids = torch.randint(0, 61, (1, 120))
    seq = model.generate(ids, max_length=125)
    assert seq.shape == (1, 125) and torch.equal(seq[:, :120], ids)
    # every new token is the argmax of the oracle's prediction after the decimated prompt + the tokens so far
    want = oracle_prefill_then_steps(model, seq[:, :-1], 120, deci).argmax(-1)
    assert torch.equal(seq[:, 120:], want)
    batch = model.generate(ids.repeat(2, 1), max_length=125)
    assert torch.equal(batch, seq.repeat(2, 1))


def test_generation_stops_at_eos_and_pads_finished_rows():
    model, _ = make_pair()
    ids = torch.randint(0, 61, (2, 20))
    free = model.generate(ids, max_length=30)
    eos = int(free[0, 22])
    seq = model.generate(ids, max_length=30, eos_token_id=eos)
    stop = (free[0, 20:] == eos).nonzero()[0].item() + 20
    assert torch.equal(seq[0, :stop + 1], free[0, :stop + 1])
    assert (seq[0, stop + 1:] == eos).all()


def test_sampling_is_seeded_and_respects_top_k():
    model, _ = make_pair()
    ids = torch.randint(0, 61, (1, 10))
    a = model.generate(ids, 30, top_k=5, temperature=0.8, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 30, top_k=5, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_save_load_round_trip(tmp_path, fmt):
    _, model = make_pair(tiny_config(rms_norm=False), deci=DECI)
    model.save_pretrained(tmp_path)
    if fmt == "bin":   # the original's format: pytorch_model.bin loaded with weights_only
        os.remove(tmp_path / "model.safetensors")
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]     # no temp files left
    loaded = DecimatingMambaModel.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32,
                                                  decimation_config=DECI)
    ids = torch.randint(0, 61, (1, 64))
    assert torch.equal(loaded(ids, num_last_tokens=2).logits, model(ids, num_last_tokens=2).logits)


def test_from_pretrained_leaves_the_global_rng_alone(tmp_path):
    make_pair()[0].save_pretrained(tmp_path)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    MambaLMHeadModel.from_pretrained(str(tmp_path))
    assert torch.equal(torch.rand(3), expected)


def test_tied_embeddings_round_trip(tmp_path):
    model = randomize(MambaLMHeadModel(tiny_config(tie_embeddings=True)))
    assert model.lm_head.weight is model.backbone.embedding.weight
    model.save_pretrained(tmp_path)
    loaded = MambaLMHeadModel.from_pretrained(str(tmp_path))
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_state_spaces_names_and_vocab_padding():
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50277))
    keys = set(model.state_dict())
    assert model.backbone.embedding.weight.shape == (50280, 16)
    for k in ("A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight",
              "dt_proj.weight", "dt_proj.bias", "out_proj.weight"):
        assert f"backbone.layers.1.mixer.{k}" in keys
    assert {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight",
            "backbone.layers.0.norm.weight"} <= keys


def test_bad_config_and_missing_checkpoint_messages(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        MambaConfig.from_dict({"d_model": 8, "n_layer": 1, "hidden_size": 8})
    with pytest.raises(ValueError, match="Mamba3"):
        MambaConfig(d_model=64, n_layer=1, ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(ValueError, match=r"\['dt_rank'\] are unknown for layer 'Mamba2'"):
        MambaConfig(d_model=64, n_layer=1, ssm_cfg={"layer": "Mamba2", "dt_rank": 4})
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a hub id"):
        MambaLMHeadModel.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"decimating_layers \[9\] are outside"):
        DecimatingMambaModel(tiny_config(), decimation_config=dict(activate=True, decimating_layers=[9]))


def test_unreachable_hub_fails_fast_naming_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing listens on port 9
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    t = time.time()
    with pytest.raises(HubUnavailableError, match="state-spaces/mamba-130m.*local directory"):
        MambaLMHeadModel.from_pretrained("state-spaces/mamba-130m", cache_dir=str(tmp_path))
    assert time.time() - t < 10


def test_vanilla_class_refuses_to_decimate():
    with pytest.warns(UserWarning, match="never decimates"):
        model = MambaLMHeadModel(tiny_config(), decimation_config=dict(activate=True, decimating_layers=[1]))
    assert not model.decimation.activate


def test_record_debug_params():
    _, model = make_pair(deci=DECI)
    out = model(torch.randint(0, 61, (1, 90)), num_last_tokens=1, record=True)
    assert len(out.debug_params) == 4
    d1 = out.debug_params[1]
    assert d1["delta"].shape == (1, 64, 41) and d1["B"].shape == (1, 8, 41) and d1["A"].shape == (64, 8)
    assert torch.equal(d1["kept_indices"][0], out.kept_indices[0][1])


def test_record_debug_params_flag_alone_records_nothing(monkeypatch):
    # The flag only tells the passkey eval to record (custom_datasets/debug_params.py): a forward,
    # a generation (prefill and steps) or a training step with it on records nothing.
    from modules.mamba_mixer import MambaMixer

    recorded, forward = [], MambaMixer.forward

    def counting(self, *args, record=False, **kw):
        if record:
            recorded.append(self.layer_idx)
        return forward(self, *args, record=record, **kw)

    monkeypatch.setattr(MambaMixer, "forward", counting)
    _, model = make_pair(deci={**DECI, "record_debug_params": True})
    ids = torch.randint(0, 61, (1, 60))
    assert model(ids, num_last_tokens=1).debug_params is None
    assert model.generate(ids, max_length=66).shape == (1, 66)
    model(ids, num_last_tokens=4).logits.sum().backward()
    assert recorded == []
    assert len(model(ids, num_last_tokens=1, record=True).debug_params) == 4 and recorded == [0, 1, 2, 3]
