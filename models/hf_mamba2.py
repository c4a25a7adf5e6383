"""transformers' Mamba-2 checkpoints (``model_type: "mamba2"``, Mamba2ForCausalLM) <-> our MambaConfig.

The mixer's parameter names are the same in both formats (in_proj, conv1d, dt_bias, A_log, D,
norm.weight, out_proj); only the embedding differs (backbone.embeddings.weight there), as for
Mamba-1, so the weights go through models/hf_format.py's ``state_from_hf`` / ``state_to_hf``.
transformers' Mamba-2 is mamba-ssm's Mamba2 with d_ssm unset, D per head, RMSNorm gated before
the norm (norm_before_gate False) and its layer_norm_epsilon for every norm.
"""
from __future__ import annotations

import math

from models.config import MambaConfig
from models.hf_format import CheckpointFormatError, build_config
from modules.mamba2_mixer import NORM_EPS

MODEL_TYPE, ARCHITECTURE = "mamba2", "Mamba2ForCausalLM"

# transformers key -> MambaConfig field
FIELDS = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
          "residual_in_fp32": "residual_in_fp32", "tie_word_embeddings": "tie_embeddings",
          "layer_norm_epsilon": "norm_epsilon"}
# transformers key -> ssm_cfg key (the Mamba2Mixer argument)
SSM_FIELDS = {"state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim",
              "n_groups": "ngroups", "chunk_size": "chunk_size", "time_step_min": "dt_min",
              "time_step_max": "dt_max", "time_step_floor": "dt_init_floor", "time_step_limit": "dt_limit",
              "use_bias": "bias", "use_conv_bias": "conv_bias"}
# transformers' Mamba2Config defaults, where a config.json leaves a key out
HF_DEFAULTS = {"num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
               "num_hidden_layers": 64, "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "n_groups": 8,
               "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
               "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
               "time_step_limit": (0.0, math.inf), "chunk_size": 256, "tie_word_embeddings": False}


def _json_float(v) -> float:
    """transformers 5 writes inf in config.json as {"__float__": "Infinity"}; older ones as Infinity."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def is_hf_mamba2(cfg: dict) -> bool:
    return cfg.get("model_type") == MODEL_TYPE


def config_from_hf_mamba2(cfg: dict, where: str) -> MambaConfig:
    """MambaConfig (ssm_cfg.layer "Mamba2") of a transformers Mamba2 config.json. Keys that only
    steer transformers (token ids, init, use_cache, ...) are ignored, as transformers ignores them."""
    get = {**HF_DEFAULTS, **cfg}.get
    if get("hidden_act") != "silu":
        raise CheckpointFormatError(f"{where}: hidden_act={get('hidden_act')!r}; only 'silu' is supported")
    d_inner = int(get("expand") * get("hidden_size"))
    if get("num_heads") * get("head_dim") != d_inner:
        raise CheckpointFormatError(f"{where}: num_heads*head_dim = {get('num_heads') * get('head_dim')} must "
                                    f"equal expand*hidden_size = {d_inner}")
    if get("layer_norm_epsilon") != NORM_EPS:   # transformers also uses it in the gated norm, ours is fixed
        raise CheckpointFormatError(f"{where}: layer_norm_epsilon={get('layer_norm_epsilon')!r}; Mamba-2 models "
                                    f"are supported with {NORM_EPS} (mamba-ssm's gated-norm eps)")
    ssm = {"layer": "Mamba2", **{ours: get(hf) for hf, ours in SSM_FIELDS.items()}}
    ssm["dt_limit"] = [_json_float(v) for v in ssm["dt_limit"]]
    return build_config(where, {ours: get(hf) for hf, ours in FIELDS.items()}, ssm)


def config_to_hf_mamba2(config: MambaConfig, dtype_name: str, base: dict | None = None) -> dict:
    """transformers config.json for a Mamba-2 ``config``; ``base``: a config to carry other keys from."""
    ssm = config.ssm_cfg
    unsupported = {k: ssm[k] for k in ("D_has_hdim", "norm_before_gate") if ssm.get(k)}
    if not config.rms_norm or ssm.get("rmsnorm", True) is False or unsupported:
        raise CheckpointFormatError(f"this Mamba-2 model (rms_norm={config.rms_norm}, ssm_cfg {ssm}) has no "
                                    f"transformers equivalent; save it with format='mamba_ssm'")
    defaults = {"state_size": 128, "conv_kernel": 4, "expand": 2, "head_dim": 64, "n_groups": 1,
                "chunk_size": 256, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4,
                "time_step_limit": [0.0, math.inf], "use_bias": False, "use_conv_bias": True}   # mamba-ssm's
    out = dict(base or {})
    out.pop("torch_dtype", None)
    out.update({"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "dtype": dtype_name, "hidden_act": "silu"})
    for hf, ours in FIELDS.items():
        out[hf] = getattr(config, ours)
    out["vocab_size"] = config.padded_vocab_size          # the embedding's rows
    for hf, ours in SSM_FIELDS.items():
        out[hf] = ssm.get(ours, defaults[hf])
    out["time_step_limit"] = [float(v) for v in out["time_step_limit"]]
    out["num_heads"] = int(out["expand"] * config.d_model) // out["head_dim"]
    return out
