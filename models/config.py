"""MambaConfig: the fields of a state-spaces ``config.json``, typed and checked.

Official implementation: state-spaces/mamba ``mamba_ssm/models/config_mamba.py``. Field names are
the checkpoint keys, so ``config.json`` of ``state-spaces/mamba-*`` and of the released
``assafbk/*`` DeciMamba checkpoints load as they are.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

SSM_CFG_KEYS = ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale",
                "dt_init_floor", "conv_bias", "bias", "use_fast_path", "layer")


@dataclass
class MambaConfig:
    """d_model: residual width · n_layer: blocks · vocab_size: tokenizer size (padded up to a
    multiple of pad_vocab_size_multiple for the embedding and head) · ssm_cfg: mixer options
    (d_state, d_conv, expand, dt_rank, ...) · rms_norm: RMSNorm (else LayerNorm) ·
    residual_in_fp32: keep the residual stream in fp32 · fused_add_norm: upstream's fused Triton
    add+norm flag (same math here; kept for round trips) · tie_embeddings: share embedding and LM
    head (False: DeciMamba unties them) · d_intermediate, attn_layer_idx, attn_cfg: mamba-ssm 2.x
    hybrid fields, only their empty defaults are supported."""

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

    def __post_init__(self):
        problems = []
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                problems.append(f"{name}={v!r} must be a positive integer")
        unknown = set(self.ssm_cfg) - set(SSM_CFG_KEYS)
        if unknown:
            problems.append(f"ssm_cfg keys {sorted(unknown)} are unknown; valid: {list(SSM_CFG_KEYS)}")
        if self.ssm_cfg.get("layer", "Mamba1") != "Mamba1":
            problems.append(f"ssm_cfg.layer={self.ssm_cfg['layer']!r}: only 'Mamba1' is supported")
        if self.d_intermediate or self.attn_layer_idx or self.attn_cfg:
            problems.append("d_intermediate / attn_layer_idx / attn_cfg (hybrid MLP or attention layers) are not supported")
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
        return asdict(self)
