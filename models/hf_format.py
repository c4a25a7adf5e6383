"""transformers-format checkpoints (Mamba, Falcon-Mamba) <-> our MambaConfig and state dict: the one mapping.

A checkpoint directory is one of two formats, told apart by its config.json:
    "mamba_ssm"     state-spaces/mamba's: d_model, n_layer, ssm_cfg, ...; weights named as in
                    mamba_ssm (backbone.embedding.weight). What ``save_pretrained`` writes by default.
    "transformers"  ``model_type`` is "mamba" (MambaForCausalLM), "falcon_mamba"
                    (FalconMambaForCausalLM) or "mamba2" (Mamba2ForCausalLM, its fields in
                    models/hf_mamba2.py): hidden_size, num_hidden_layers, state_size, ...;
                    weights named as there (backbone.embeddings.weight).
Everything that differs between them is in FIELDS, SSM_FIELDS, MODEL_TYPES and EMBEDDING below.
Falcon-Mamba is Mamba-1 plus weightless RMS norms of B, C and the low-rank dt in every mixer
(``ssm_cfg`` b_c_dt_rms / mixer_rms_eps here; see modules/mamba_mixer.py).
"""
from __future__ import annotations

from models.config import MambaConfig

MAMBA_SSM, TRANSFORMERS = "mamba_ssm", "transformers"
FORMATS = (MAMBA_SSM, TRANSFORMERS)

# model_type -> (transformers class, is Falcon-Mamba)
MODEL_TYPES = {"mamba": ("MambaForCausalLM", False), "falcon_mamba": ("FalconMambaForCausalLM", True)}
MAMBA2_TYPE = "mamba2"     # Mamba2ForCausalLM: its config fields are mapped in models/hf_mamba2.py

# transformers key -> MambaConfig field
FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
          "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings",
          "layer_norm_epsilon": "norm_epsilon"}
# transformers key -> ssm_cfg key (the MambaMixer argument)
SSM_FIELDS = {"state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "time_step_rank": "dt_rank",
              "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_init_scheme": "dt_init",
              "time_step_scale": "dt_scale", "time_step_floor": "dt_init_floor", "use_conv_bias": "conv_bias",
              "use_bias": "bias"}
FALCON_FIELDS = {"mixer_rms_eps": "mixer_rms_eps"}
# transformers' defaults where a config.json leaves a key out (MambaConfig / FalconMambaConfig)
HF_DEFAULTS = {"vocab_size": 50280, "hidden_size": 768, "state_size": 16, "num_hidden_layers": 32,
               "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
               "hidden_act": "silu", "residual_in_fp32": True, "time_step_rank": "auto", "time_step_scale": 1.0,
               "time_step_min": 0.001, "time_step_max": 0.1, "time_step_init_scheme": "random",
               "time_step_floor": 1e-4, "tie_word_embeddings": True, "mixer_rms_eps": 1e-6}
# Parameter names: ours (mamba_ssm) <-> transformers. Nothing else differs.
EMBEDDING = ("backbone.embedding.weight", "backbone.embeddings.weight")
# Keys transformers may store that hold no weights of ours: Falcon's weightless norms (all ones,
# non-persistent in transformers, present in some older checkpoints).
IGNORED_HF_WEIGHTS = ("mixer.b_layernorm.weight", "mixer.c_layernorm.weight", "mixer.dt_layernorm.weight")


class CheckpointFormatError(ValueError):
    """A checkpoint file is unreadable or describes a model we cannot build; the message is one
    line naming the file, what is wrong and what to do."""


def detect_format(cfg: dict, where: str) -> str:
    """MAMBA_SSM or TRANSFORMERS from a parsed config.json (``where`` names it in errors)."""
    if "model_type" in cfg:
        if cfg["model_type"] not in MODEL_TYPES and cfg["model_type"] != MAMBA2_TYPE:
            raise CheckpointFormatError(
                f"{where}: model_type {cfg['model_type']!r} is not supported; valid: {sorted([*MODEL_TYPES, MAMBA2_TYPE])} "
                f"(transformers format) or a mamba_ssm config with d_model/n_layer")
        return TRANSFORMERS
    if "d_model" in cfg:
        return MAMBA_SSM
    raise CheckpointFormatError(
        f"{where}: neither a transformers config (model_type {sorted(MODEL_TYPES)}) nor a mamba_ssm one "
        f"(d_model, n_layer, ...); pass a Mamba or Falcon-Mamba checkpoint directory")


def config_from_hf(cfg: dict, where: str) -> MambaConfig:
    """MambaConfig of a transformers config.json. Keys that only steer transformers (token ids,
    init, use_cache, ...) are ignored, as transformers itself ignores unknown keys."""
    if cfg["model_type"] == MAMBA2_TYPE:
        from models.hf_mamba2 import config_from_hf_mamba2      # imports this module: not at the top

        return config_from_hf_mamba2(cfg, where)
    get = {**HF_DEFAULTS, **cfg}.get
    falcon = MODEL_TYPES[cfg["model_type"]][1]
    if get("hidden_act") != "silu":
        raise CheckpointFormatError(f"{where}: hidden_act={get('hidden_act')!r}; only 'silu' is supported")
    hidden = get("hidden_size")
    ssm = {ours: get(hf) for hf, ours in SSM_FIELDS.items()}
    # transformers builds the mixer at intermediate_size when the config has it, whatever
    # expand says (tiiuae/falcon-mamba-7b: expand 16, intermediate_size 8192 = 2 x 4096)
    d_inner = cfg.get("intermediate_size", int(get("expand") * hidden))
    if d_inner != int(get("expand") * hidden):
        ssm["expand"] = d_inner // hidden if d_inner % hidden == 0 else d_inner / hidden
    if not (isinstance(d_inner, int) and isinstance(hidden, int) and int(ssm["expand"] * hidden) == d_inner):
        raise CheckpointFormatError(f"{where}: intermediate_size={d_inner!r} is not a width this mixer can "
                                    f"build from hidden_size={hidden!r} (d_inner = int(expand * d_model))")
    if falcon:
        ssm["b_c_dt_rms"] = True
        ssm.update({ours: get(hf) for hf, ours in FALCON_FIELDS.items()})
    return build_config(where, {ours: get(hf) for hf, ours in FIELDS.items()}, ssm)


def build_config(where: str, top: dict, ssm: dict) -> MambaConfig:
    """Our MambaConfig from a transformers config's mapped fields; its refusals name ``where``."""
    try:
        # transformers' vocab_size is the embedding's row count: no further padding
        return MambaConfig(**top, ssm_cfg=ssm, rms_norm=True, pad_vocab_size_multiple=1)
    except (ValueError, TypeError) as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None


def config_to_hf(config: MambaConfig, dtype_name: str, base: dict | None = None) -> dict:
    """transformers config.json for ``config``. ``base``: a transformers config this model was
    loaded from, whose other keys (token ids, ...) are carried over."""
    if not config.rms_norm:
        raise CheckpointFormatError("a LayerNorm model (rms_norm=false) has no transformers equivalent "
                                    "(Mamba and Falcon-Mamba use RMSNorm); save it with format='mamba_ssm'")
    ssm = config.ssm_cfg
    if ssm.get("layer", "Mamba1") == "Mamba2":
        from models.hf_mamba2 import config_to_hf_mamba2

        return config_to_hf_mamba2(config, dtype_name, base)
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointFormatError(f"ssm_cfg.layer={ssm['layer']!r} has no transformers mapping; "
                                    f"save it with format='mamba_ssm'")
    falcon = bool(ssm.get("b_c_dt_rms", False))
    model_type = "falcon_mamba" if falcon else "mamba"
    out = dict(base or {})
    out.pop("torch_dtype", None)
    out.update({"model_type": model_type, "architectures": [MODEL_TYPES[model_type][0]], "dtype": dtype_name})
    for hf, ours in FIELDS.items():
        out[hf] = getattr(config, ours)
    out["vocab_size"] = config.padded_vocab_size          # the embedding's rows
    for hf, ours in SSM_FIELDS.items():
        out[hf] = ssm.get(ours, HF_DEFAULTS[hf])
    if out["time_step_rank"] == "auto":
        out["time_step_rank"] = -(-config.d_model // 16)
    out["intermediate_size"] = int(out["expand"] * config.d_model)    # what transformers builds
    # transformers types expand as an int; intermediate_size above is what it uses when present
    out["expand"] = int(out["expand"]) if float(out["expand"]).is_integer() else max(1, round(out["expand"]))
    out["hidden_act"] = "silu"
    if falcon:
        for hf, ours in FALCON_FIELDS.items():
            out[hf] = ssm.get(ours, HF_DEFAULTS[hf])
    else:
        for hf in FALCON_FIELDS:
            out.pop(hf, None)
    return out


def state_from_hf(state: dict, tied: bool) -> dict:
    """transformers parameter names -> ours (in place). A tied checkpoint's lm_head, if stored, is left
    for the loader to check against the embedding (models.mamba_lm: the head is the embedding)."""
    for k in [k for k in state if k.endswith(IGNORED_HF_WEIGHTS)]:
        del state[k]
    if EMBEDDING[1] in state:
        state[EMBEDDING[0]] = state.pop(EMBEDDING[1])
    return state


def state_to_hf(state: dict) -> dict:
    """Our parameter names -> transformers' (in place)."""
    if EMBEDDING[0] in state:
        state[EMBEDDING[1]] = state.pop(EMBEDDING[0])
    return state
