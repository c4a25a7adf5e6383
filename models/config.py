"""MambaConfig: the fields of a state-spaces ``config.json``, typed and checked.

Official implementation: state-spaces/mamba ``mamba_ssm/models/config_mamba.py``. Field names are
the checkpoint keys, so ``config.json`` of ``state-spaces/mamba-*`` and of the released
``assafbk/*`` DeciMamba checkpoints load as they are.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

SSM_CFG_KEYS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                "dt_init_floor", "conv_bias", "bias", "use_fast_path", "layer",
                "b_c_dt_rms", "mixer_rms_eps")   # Falcon-Mamba's weightless RMS norms of B, C and dt (models/hf_format.py)
# ssm_cfg keys of a layer "Mamba2" model: mamba-ssm's Mamba2 arguments (modules/mamba2_mixer.py)
MAMBA2_SSM_CFG_KEYS = ("layer", "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups",
                       "A_init_range", "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max",
                       "dt_init_floor", "dt_limit", "bias", "conv_bias", "chunk_size", "use_mem_eff_path")
# Fields mamba-ssm's own MambaConfig lacks: written to config.json only when they differ from the
# default, so a plain Mamba checkpoint we save still loads in mamba-ssm.
NON_MAMBA_SSM_DEFAULTS = {"norm_epsilon": 1e-5}


@dataclass
class MambaConfig:
    """d_model: residual width · n_layer: blocks · vocab_size: tokenizer size (padded up to a
    multiple of pad_vocab_size_multiple for the embedding and head) · ssm_cfg: mixer options
    (d_state, d_conv, expand, dt_rank, ...) · rms_norm: RMSNorm (else LayerNorm) ·
    residual_in_fp32: keep the residual stream in fp32 · fused_add_norm: upstream's fused Triton
    add+norm flag (same math here; kept for round trips) · tie_embeddings: share embedding and LM
    head (False: DeciMamba unties them) · d_intermediate, attn_layer_idx, attn_cfg: mamba-ssm 2.x
    hybrid fields, only their empty defaults are supported · norm_epsilon: eps of the block norms
    and norm_f. Falcon-Mamba sets ssm_cfg b_c_dt_rms (weightless RMS norms of B, C and the
    low-rank dt before dt_proj) and mixer_rms_eps."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = False
    norm_epsilon: float = 1e-5          # eps of every block norm and norm_f (mamba-ssm's MixerModel argument)

    @property
    def layer(self) -> str:
        """The mixer of every layer: "Mamba1" (the default) or "Mamba2" (ssm_cfg.layer)."""
        return self.ssm_cfg.get("layer", "Mamba1")

    def __post_init__(self):
        problems = []
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name}={v!r} must be a positive integer")
        layer = self.layer
        valid = MAMBA2_SSM_CFG_KEYS if layer == "Mamba2" else SSM_CFG_KEYS
        unknown = set(self.ssm_cfg) - set(valid)
        if unknown:
            problems.append(f"ssm_cfg keys {sorted(unknown)} are unknown for layer {layer!r}; valid: {list(valid)}")
        if layer not in ("Mamba1", "Mamba2"):
            problems.append(f"ssm_cfg.layer={layer!r}: choose 'Mamba1' or 'Mamba2' (every layer is of that kind)")
        if layer == "Mamba2":
            problems += _mamba2_problems(self.d_model, self.ssm_cfg)
        if self.d_intermediate or self.attn_layer_idx or self.attn_cfg:
            problems.append("d_intermediate / attn_layer_idx / attn_cfg (hybrid MLP or attention layers) are not supported")
        if not (isinstance(self.norm_epsilon, (int, float)) and not isinstance(self.norm_epsilon, bool)
                and self.norm_epsilon > 0):
            problems.append(f"norm_epsilon={self.norm_epsilon!r} must be a positive number")
        if not isinstance(self.ssm_cfg.get("b_c_dt_rms", False), bool):
            problems.append(f"ssm_cfg.b_c_dt_rms={self.ssm_cfg['b_c_dt_rms']!r} must be true or false")
        eps = self.ssm_cfg.get("mixer_rms_eps", 1e-6)
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
            problems.append(f"ssm_cfg.mixer_rms_eps={eps!r} must be a positive number")
        if problems:
            raise ValueError("invalid MambaConfig: " + "; ".join(problems))

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def mixer_kwargs(self) -> dict:
        return {k: v for k, v in self.ssm_cfg.items() if k != "layer"}

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"config.json has unknown keys {sorted(unknown)}; valid: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "MambaConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, default in NON_MAMBA_SSM_DEFAULTS.items():
            if d.get(k) == default:
                d.pop(k)
        return d


def _mamba2_problems(d_model: int, ssm: dict) -> list:
    """Shape checks of a Mamba-2 ssm_cfg (defaults as mamba-ssm's Mamba2)."""
    expand, headdim, ngroups = ssm.get("expand", 2), ssm.get("headdim", 64), ssm.get("ngroups", 1)
    ints = {"d_state": ssm.get("d_state", 128), "headdim": headdim, "ngroups": ngroups,
            "chunk_size": ssm.get("chunk_size", 256), "d_conv": ssm.get("d_conv", 4)}
    bad = [f"ssm_cfg.{k}={v!r} must be a positive integer" for k, v in ints.items()
           if not isinstance(v, int) or isinstance(v, bool) or v <= 0]
    if bad:
        return bad
    d_inner = int(expand * d_model)
    if d_inner % headdim or (d_inner // headdim) % ngroups:
        return [f"Mamba2: d_inner = expand*d_model = {d_inner} must be heads*headdim ({headdim}) with heads a "
                f"multiple of ngroups ({ngroups})"]
    if ssm.get("d_ssm") not in (None, d_inner):
        return [f"ssm_cfg.d_ssm={ssm['d_ssm']!r}: a gated MLP beside the SSM is not supported; leave d_ssm unset"]
    return []
