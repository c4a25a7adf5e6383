"""transformers-format checkpoints (Mamba, Falcon-Mamba): load, run every path, save back.

transformers' MambaForCausalLM / FalconMambaForCausalLM are the independent reference: random
small models are built and saved by transformers itself, loaded here, and compared logit for
logit and token for token; what we save is loaded back by transformers' from_pretrained.
"""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from models import DecimatingMambaModel, MambaLMHeadModel
from models.hf_format import CheckpointFormatError
from models.streaming import streaming_prefill
from tests.helpers import randomize, tiny_config

transformers = pytest.importorskip("transformers")

# fp32 logits: three layers whose scans sum in different orders (our blocked two-level scan vs
# transformers' per-token loop) and whose matmuls block differently; measured <= 1.1e-6 on logits
# of magnitude ~2.5, so 1e-5 leaves a 10x margin and still fails on any wrong norm or weight.
FP32 = dict(rtol=1e-5, atol=1e-5)
VOCAB = 67
# (name, transformers config fields): odd widths, time_step_rank not ceil(d/16), conv bias and
# in/out-projection bias on and off, tied and untied embeddings
SHAPES = [
    ("odd_untied_rank5_noconvbias", dict(hidden_size=36, state_size=6, num_hidden_layers=3, time_step_rank=5,
                                         use_conv_bias=False, use_bias=True, tie_word_embeddings=False)),
    ("tied_default_rank", dict(hidden_size=32, state_size=8, num_hidden_layers=2, tie_word_embeddings=True)),
    ("odd23_expand3_conv3", dict(hidden_size=23, state_size=5, num_hidden_layers=3, expand=3, conv_kernel=3,
                                 time_step_rank=3, tie_word_embeddings=False, layer_norm_epsilon=1e-4)),
    # as tiiuae/falcon-mamba-7b's config: expand disagrees with intermediate_size, which transformers
    # builds (here 1.5 x hidden_size, a non-integer ratio)
    ("intermediate_overrides_expand", dict(hidden_size=24, expand=16, intermediate_size=36, state_size=4,
                                           num_hidden_layers=2, time_step_rank=8, tie_word_embeddings=False)),
]
KINDS = ["mamba", "falcon_mamba"]


def hf_classes(kind):
    if kind == "mamba":
        return transformers.MambaConfig, transformers.MambaForCausalLM
    return transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM


def hf_model(kind, fields, seed=0):
    cfg_cls, cls = hf_classes(kind)
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=VOCAB, eos_token_id=None, bos_token_id=None, pad_token_id=None, **fields)
    return randomize(cls(cfg), seed).eval()


@pytest.fixture(scope="module", params=[(k, s) for k in KINDS for s in SHAPES], ids=lambda p: f"{p[0]}-{p[1][0]}")
def saved(request, tmp_path_factory):
    kind, (name, fields) = request.param
    model = hf_model(kind, fields)
    path = tmp_path_factory.mktemp(f"{kind}_{name}")
    model.save_pretrained(path)
    return kind, model, str(path)


def ids_of(length, batch=1, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_equal_transformers(saved):
    kind, hf, path = saved
    ours = MambaLMHeadModel.from_pretrained(path)
    assert ours.checkpoint_format == "transformers"
    assert ours.config.ssm_cfg.get("b_c_dt_rms", False) == (kind == "falcon_mamba")
    ids = ids_of(45, batch=2)
    want = hf(ids).logits
    torch.testing.assert_close(ours(ids).logits, want, **FP32)
    # decimation off (listed layers, activate False) is exactly vanilla
    deci = DecimatingMambaModel.from_pretrained(path, decimation_config=dict(activate=False, decimating_layers=[1]))
    assert torch.equal(deci(ids, num_last_tokens=3).logits, ours(ids, num_last_tokens=3).logits)


@torch.no_grad()
def test_greedy_generation_equals_transformers(saved):
    _, hf, path = saved
    ours = MambaLMHeadModel.from_pretrained(path)
    prompt = ids_of(30)
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours.generate(prompt, max_length=42), want)
    assert torch.equal(ours.generate(prompt, max_length=42, prefill_chunk_size=7), want)   # streamed prefill


@torch.no_grad()
def test_saved_back_loads_in_transformers_with_equal_logits(saved, tmp_path):
    kind, hf, path = saved
    ours = MambaLMHeadModel.from_pretrained(path)
    ours.save_pretrained(tmp_path)                       # default: the format it came from
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == kind and cfg["vocab_size"] == VOCAB
    back, info = hf_classes(kind)[1].from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = ids_of(40)
    assert torch.equal(back.eval()(ids).logits, hf(ids).logits)      # the same weights, bit for bit
    again = MambaLMHeadModel.from_pretrained(str(tmp_path))
    assert torch.equal(again(ids).logits, ours(ids).logits)


def hf_delta(hf, ids):
    """Δ of layer 0 computed from transformers' own modules (b, e, l): softplus(dt_proj(norm(dt)) + b)."""
    bb = hf.backbone
    layer = bb.layers[0]
    mx = layer.mixer
    h = layer.norm(bb.embeddings(ids))
    x = mx.in_proj(h).transpose(1, 2).chunk(2, dim=1)[0]
    x = F.silu(mx.conv1d(x)[..., :ids.shape[1]]).transpose(1, 2)
    dt = mx.x_proj(x)[..., :mx.time_step_rank]
    if hasattr(mx, "dt_layernorm"):                      # Falcon-Mamba: the Δ the scan uses is after its norm
        dt = mx.dt_layernorm(dt)
    return F.softplus(mx.dt_proj(dt)).transpose(1, 2)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_decimation_keeps_top_delta_tokens_and_the_tail(kind, tmp_path):
    hf = hf_model(kind, SHAPES[0][1])
    hf.save_pretrained(tmp_path)
    deci = dict(activate=True, decimating_layers=[0, 2], beta=0.5, L_base=24, min_seq_len=4)
    model = DecimatingMambaModel.from_pretrained(str(tmp_path), decimation_config=deci)
    ids, resp = ids_of(80), 3
    out = model(ids, num_last_tokens=resp)
    (l0, keep0), (l2, keep2) = out.kept_indices
    assert (l0, l2) == (0, 2) and len(keep0) == 24 + resp and len(keep2) == 12 + resp
    assert keep0[-resp:].tolist() == [77, 78, 79] and keep2[-resp:].tolist() == [24, 25, 26]
    score = torch.linalg.vector_norm(hf_delta(hf, ids)[0, :, :80 - resp], dim=0)           # (l_dec,)
    assert set(keep0[:-resp].tolist()) == set(torch.topk(score, 24).indices.tolist())
    assert out.logits.shape == (1, resp, VOCAB) and torch.isfinite(out.logits).all()
    streamed = streaming_prefill(model, ids, chunk_size=16, num_last_tokens=resp)
    torch.testing.assert_close(streamed.logits, out.logits, **FP32)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(streamed.kept_indices, out.kept_indices))
    seq = model.generate(ids, max_length=90)
    assert seq.shape == (1, 90) and torch.equal(seq[:, :80], ids)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_our_model_published_for_transformers(kind, tmp_path):
    """A model built (and, in the CLI, trained) here, saved with format='transformers'."""
    ssm = {"d_state": 8, "dt_rank": 3, "conv_bias": False}
    if kind == "falcon_mamba":
        ssm.update(b_c_dt_rms=True, mixer_rms_eps=1e-5)
    ours = randomize(MambaLMHeadModel(tiny_config(ssm_cfg=ssm, vocab_size=61, norm_epsilon=1e-6)))
    ours.save_pretrained(tmp_path, format="transformers")
    hf = hf_classes(kind)[1].from_pretrained(str(tmp_path)).eval()
    assert hf.config.vocab_size == ours.config.padded_vocab_size == 64 and hf.config.layer_norm_epsilon == 1e-6
    ids = torch.randint(0, 61, (2, 50))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **FP32)
    if kind == "falcon_mamba":
        assert hf.config.mixer_rms_eps == 1e-5
        assert MambaLMHeadModel(tiny_config(ssm_cfg=ssm)).checkpoint_format is None   # default: transformers
        ours.save_pretrained(tmp_path / "default")
        assert json.loads((tmp_path / "default" / "config.json").read_text())["model_type"] == "falcon_mamba"


@torch.no_grad()
def test_mamba_ssm_names_would_leave_transformers_embedding_random(tmp_path):
    """Why save_pretrained renames: transformers' from_pretrained ignores backbone.embedding.weight."""
    ours = randomize(MambaLMHeadModel(tiny_config(vocab_size=64)))
    ours.save_pretrained(tmp_path / "ssm", format="mamba_ssm")
    ours.save_pretrained(tmp_path / "hf", format="transformers")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "ssm" / "config.json").write_text(json.dumps(cfg))      # transformers config, mamba_ssm names
    naive = transformers.MambaForCausalLM.from_pretrained(str(tmp_path / "ssm"))
    assert not torch.equal(naive.backbone.embeddings.weight, ours.backbone.embedding.weight)
    good = transformers.MambaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert torch.equal(good.backbone.embeddings.weight, ours.backbone.embedding.weight)


def test_mamba_ssm_config_stays_loadable_by_mamba_ssm(tmp_path):
    """norm_epsilon (not a mamba-ssm MambaConfig field) is written only when it is not the default."""
    MambaLMHeadModel(tiny_config()).save_pretrained(tmp_path / "a")
    assert "norm_epsilon" not in json.loads((tmp_path / "a" / "config.json").read_text())
    m = randomize(MambaLMHeadModel(tiny_config(norm_epsilon=1e-3)))
    m.save_pretrained(tmp_path / "b")
    back = MambaLMHeadModel.from_pretrained(str(tmp_path / "b"))
    assert back.config.norm_epsilon == 1e-3 and back.backbone.norm_f.eps == 1e-3
    ids = torch.randint(0, 61, (1, 20))
    assert torch.equal(back(ids).logits, m(ids).logits)


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model("falcon_mamba", SHAPES[0][1])
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    ids = ids_of(30)
    with torch.no_grad():
        torch.testing.assert_close(MambaLMHeadModel.from_pretrained(str(tmp_path))(ids).logits, hf(ids).logits, **FP32)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_keeps_A_D_and_dt_bias_fp32(kind, tmp_path):
    hf_model(kind, SHAPES[0][1]).save_pretrained(tmp_path)
    ref = MambaLMHeadModel.from_pretrained(str(tmp_path), backend="torch")
    m = MambaLMHeadModel.from_pretrained(str(tmp_path), dtype=torch.bfloat16, backend="torch")
    for name, p in m.named_parameters():
        fp32 = name.endswith(("A_log", "mixer.D", "dt_proj.bias"))
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert m.backbone.layers[0].mixer.A_log._no_weight_decay          # the same Parameter, attributes kept
    ids = ids_of(40)
    with torch.no_grad():
        got, want = m(ids).logits.float(), ref(ids).logits
        # bf16 weights and activations (8-bit mantissa, ~4e-3 relative per rounding) through 3
        # layers: logits of magnitude ~2.5 agree to ~0.1; a dtype clash would raise instead
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.15)
        assert m.generate(ids, max_length=50).shape == (1, 50)
    m.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


# ---------------------------------------------------------------- bad files: one line each
def _one_line_error(path, match):
    with pytest.raises(CheckpointFormatError) as err:
        MambaLMHeadModel.from_pretrained(str(path))
    msg = str(err.value)
    assert "\n" not in msg and match in msg, msg
    assert isinstance(err.value, ValueError)
    return msg


@pytest.fixture
def good_dir(tmp_path):
    MambaLMHeadModel(tiny_config()).save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


@pytest.mark.parametrize("size", [0, 7, 300])
def test_truncated_safetensors(good_dir, size):
    f = good_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:size])
    msg = _one_line_error(good_dir, str(f))
    assert "truncated or corrupt" in msg and "re-download or re-save" in msg


def test_invalid_config_json(good_dir):
    (good_dir / "config.json").write_text('{"d_model": 32,, }')
    msg = _one_line_error(good_dir, str(good_dir / "config.json"))
    assert "invalid JSON" in msg and "line 1 column" in msg


def test_pickle_bin_refused_without_suggesting_weights_only_false(good_dir):
    os.remove(good_dir / "model.safetensors")
    state = MambaLMHeadModel(tiny_config()).state_dict()
    torch.save({"model": state, "note": object()}, good_dir / "pytorch_model.bin")   # not tensors only
    msg = _one_line_error(good_dir, "pytorch_model.bin")
    assert "weights_only=True" in msg and "weights_only=False" not in msg and "safetensors" in msg


def test_corrupt_bin(good_dir):
    os.remove(good_dir / "model.safetensors")
    (good_dir / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    _one_line_error(good_dir, "not a readable PyTorch checkpoint")


def test_unsupported_model_type_and_mismatched_weights(good_dir, tmp_path):
    (good_dir / "config.json").write_text(json.dumps({"model_type": "jamba", "hidden_size": 32}))
    _one_line_error(good_dir, "model_type 'jamba' is not supported")
    (good_dir / "config.json").write_text(json.dumps(tiny_config(d_model=48).to_dict()))
    _one_line_error(good_dir, "does not match its config.json")
    with pytest.raises(CheckpointFormatError, match="LayerNorm"):
        MambaLMHeadModel(tiny_config(rms_norm=False)).save_pretrained(tmp_path / "x", format="transformers")


def test_cli_prints_one_error_line(good_dir, tmp_path, capsys):
    import finetune_ssm

    (good_dir / "config.json").write_text("{")
    rc = finetune_ssm.main(["--eval", "2", "--device", "cpu", "--set", f"load_cp={good_dir}",
                            "--set", f"output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error: ") and "config.json: invalid JSON" in err[-1]


# ---------------------------------------------------------------- the shipped checkpoint, converted
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "passkey_small_deci")


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHIPPED, "model.safetensors")), reason="no shipped checkpoint")
def test_shipped_checkpoint_through_transformers_and_the_cli(tmp_path, capsys):
    import finetune_ssm

    ours = MambaLMHeadModel.from_pretrained(SHIPPED)
    ours.save_pretrained(tmp_path / "hf", format="transformers")
    hf = transformers.MambaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = torch.randint(0, 50277, (1, 300), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **FP32)
        assert torch.equal(ours.generate(ids, max_length=310), hf.generate(ids, max_new_tokens=10, do_sample=False))
    scores = {}
    for name, ck in (("ssm", SHIPPED), ("hf", str(tmp_path / "hf"))):
        out = tmp_path / name
        args = ["--eval", "2", "--device", "cpu", "--set", f"load_cp={ck}", "--set", f"output_dir={out}",
                "--set", "niah_context_lens_eval=[300]", "--set", "niah_needle_depths_eval=[0.5]",
                "--set", "decimating_layers=[3]", "--set", "decimation_max_p_L_base=100"]
        assert finetune_ssm.main(args) == 0
        run = next(p for p in out.iterdir() if p.is_dir())
        scores[name] = [json.loads(x)["score"] for x in open(run / "results.jsonl")]
    capsys.readouterr()
    assert scores["ssm"] == scores["hf"] and len(scores["hf"]) == 1 and not math.isnan(scores["hf"][0])


def test_hub_id_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A hub id resolves from the huggingface_hub cache with no network: a sharded transformers
    checkpoint whose model.safetensors was never fetched (the cache is searched for every candidate)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = hf_model("falcon_mamba", SHAPES[1][1])
    snap = tmp_path / "models--someone--tiny-falcon" / "snapshots" / ("0" * 40)
    hf.save_pretrained(snap, max_shard_size="20KB")
    (tmp_path / "models--someone--tiny-falcon" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-falcon" / "refs" / "main").write_text("0" * 40)
    ours = MambaLMHeadModel.from_pretrained("someone/tiny-falcon", cache_dir=str(tmp_path))
    ids = ids_of(20)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, **FP32)


# ---------------------------------------------------------------- the mapping, field by field
# transformers key -> (our MambaConfig attribute, or ssm_cfg key), written out here from transformers'
# MambaConfig / FalconMambaConfig documentation (not read from models/hf_format.py)
TOP_MAP = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
           "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings",
           "layer_norm_epsilon": "norm_epsilon"}
SSM_MAP = {"state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "time_step_rank": "dt_rank",
           "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_init_scheme": "dt_init",
           "time_step_scale": "dt_scale", "time_step_floor": "dt_init_floor", "use_conv_bias": "conv_bias",
           "use_bias": "bias"}
# every mapped field away from transformers' default
ODD_FIELDS = dict(hidden_size=40, num_hidden_layers=3, vocab_size=72, residual_in_fp32=False,
                  tie_word_embeddings=False, layer_norm_epsilon=1e-4, state_size=6, conv_kernel=3, expand=3,
                  time_step_rank=7, time_step_min=0.002, time_step_max=0.2, time_step_init_scheme="constant",
                  time_step_scale=0.5, time_step_floor=2e-4, use_conv_bias=False, use_bias=True)


@pytest.mark.parametrize("kind", KINDS)
def test_every_config_field_maps_both_ways(kind):
    from models.hf_format import config_from_hf, config_to_hf

    cfg_cls, _ = hf_classes(kind)
    fields = {**ODD_FIELDS, **({"mixer_rms_eps": 1e-5} if kind == "falcon_mamba" else {})}
    hf_cfg = cfg_cls(**fields).to_dict()                     # as transformers writes config.json
    ours = config_from_hf(hf_cfg, "config.json")
    for hf, attr in TOP_MAP.items():
        assert getattr(ours, attr) == fields[hf], hf
    for hf, key in SSM_MAP.items():
        assert ours.ssm_cfg[key] == fields[hf], hf
    assert ours.ssm_cfg.get("b_c_dt_rms", False) == (kind == "falcon_mamba")
    if kind == "falcon_mamba":
        assert ours.ssm_cfg["mixer_rms_eps"] == 1e-5
    back = config_to_hf(ours, "float32", base=None)            # no base: nothing carried over
    assert back["model_type"] == kind and back["intermediate_size"] == 3 * 40
    for hf, value in fields.items():
        assert back[hf] == value, hf
        assert getattr(cfg_cls(**back), hf) == value, hf       # and transformers reads it so


@pytest.mark.parametrize("kind", KINDS)
def test_fields_a_config_leaves_out_take_transformers_defaults(kind):
    # a transformers config.json may omit any key (tie_word_embeddings=True, a PretrainedConfig default,
    # is left out of a diff-saved config): each then means transformers' own default
    from models.hf_format import config_from_hf, config_to_hf

    cfg_cls, _ = hf_classes(kind)
    want = cfg_cls().to_dict()
    back = config_to_hf(config_from_hf({"model_type": kind}, "config.json"), "float32")
    keys = [*TOP_MAP, *SSM_MAP, "intermediate_size", "hidden_act", *(["mixer_rms_eps"] if kind == "falcon_mamba" else [])]
    for hf in keys:
        assert back[hf] == want[hf], hf


@torch.no_grad()
def test_published_with_auto_rank_and_a_fractional_expand(tmp_path):
    # dt_rank "auto" is ceil(d_model / 16) = ceil(36 / 16) = 3 (not 36 // 16 = 2); expand 1.5 gives
    # d_inner 54, which transformers builds only from intermediate_size (its expand is an int)
    ours = randomize(MambaLMHeadModel(tiny_config(d_model=36, n_layer=2, ssm_cfg={"d_state": 4, "expand": 1.5})))
    ours.save_pretrained(tmp_path, format="transformers")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["time_step_rank"], cfg["intermediate_size"]) == (3, 54)
    hf, info = transformers.MambaForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, 61, (1, 30))
    torch.testing.assert_close(ours(ids).logits, hf.eval()(ids).logits, **FP32)


def test_a_non_silu_activation_is_refused():
    # the mixer is SiLU-only: a gelu checkpoint would load and give wrong logits
    from models.hf_format import config_from_hf

    with pytest.raises(CheckpointFormatError, match="hidden_act='gelu'"):
        config_from_hf({"model_type": "mamba", "hidden_act": "gelu"}, "config.json")


def _add_to_safetensors(folder, extra):
    from safetensors.torch import load_file, save_file

    f = os.path.join(folder, "model.safetensors")
    state = load_file(f)
    state.update(extra)
    save_file(state, f, metadata={"format": "pt"})


@torch.no_grad()
def test_falcon_checkpoint_storing_its_weightless_norms_loads(tmp_path):
    # older Falcon-Mamba checkpoints store the (all-ones) B, C and dt norms; they hold no weights of ours
    fields = SHAPES[0][1]
    hf = hf_model("falcon_mamba", fields)
    hf.save_pretrained(tmp_path)
    n, r = fields["state_size"], fields["time_step_rank"]
    _add_to_safetensors(tmp_path, {f"backbone.layers.{i}.mixer.{name}_layernorm.weight": torch.ones(size)
                                   for i in range(fields["num_hidden_layers"]) for name, size in
                                   (("b", n), ("c", n), ("dt", r))})
    ids = ids_of(30)
    torch.testing.assert_close(MambaLMHeadModel.from_pretrained(str(tmp_path))(ids).logits, hf(ids).logits, **FP32)



@torch.no_grad()
def test_a_tied_checkpoint_storing_another_head_is_refused(tmp_path):
    # tie_word_embeddings true but a stored lm_head.weight unlike the embedding: the checkpoint contradicts
    # itself (transformers keeps the stored head, our loader used to drop it silently): one clear error;
    # a stored head equal to the embedding (as tied checkpoints often save it) loads
    hf = hf_model("mamba", SHAPES[1][1])
    hf.save_pretrained(tmp_path / "same")
    emb = hf.get_input_embeddings().weight.detach().clone()
    _add_to_safetensors(tmp_path / "same", {"lm_head.weight": emb})
    MambaLMHeadModel.from_pretrained(str(tmp_path / "same"))
    hf.save_pretrained(tmp_path / "other")
    _add_to_safetensors(tmp_path / "other", {"lm_head.weight": emb + 1})
    with pytest.raises(CheckpointFormatError, match="stored lm_head.weight differs"):
        MambaLMHeadModel.from_pretrained(str(tmp_path / "other"))
