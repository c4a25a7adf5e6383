"""Δ-based token decimation (DeciMamba, arXiv 2406.14528 §4): pure functions, no parameters.

Symbols: L  tokens at this layer's input;  resp_len  protected tail (the response / last prompt
token, never dropped: the model must still see what it answers from);  L_dec = L − resp_len
candidates;  s  position of this layer in ``decimating_layers``;  β  geometric shrink per
decimating layer;  L_base  token budget at the first decimating layer;  min_seq_len  floor.

A candidate's score is the L2 norm over channels of Δ = softplus(dt + dt_bias); the
k = int(max(min(L_dec, L_base·β^s), min_seq_len)) highest-scoring candidates are kept (never more
than L_dec, which the original did not guard: bug B11), sorted back into sequence order, and the
response tail is appended. ``top_k_candidates`` is the one selection rule, used by the one-shot
forward (every scan path) and by the streamed prefill's running buffer (models/streaming.py).

Ties: the original takes ``torch.topk`` (spec §2.4 step 7: ties arbitrary; topk is not stable).
Here an exact tie goes to the earlier position (higher score first, then earlier token), so the
kept set is deterministic and the same in one shot and streamed, on every device.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

DECIMATION_TYPES = ("max_p",)


@dataclass
class DecimationConfig:
    """Decimation settings shared by every mixer of a model (the original's dict, typed).

    activate: master switch; False is exact vanilla Mamba.
    record_debug_params: the passkey evaluation records A, B, C, Δ and the kept indices of each
        prompt (custom_datasets/debug_params.py); a forward records only when called with record=True.
    type: selection rule; only "max_p" (largest ‖Δ‖₂) exists.
    beta: β in (0, 1], budget shrink per successive decimating layer.
    L_base: budget at the first decimating layer; ``math.inf`` keeps everything.
    decimating_layers: 0-based layer indices that decimate; order defines s.
    min_seq_len: lower bound on kept non-response tokens.
    """

    activate: bool = False
    record_debug_params: bool = False
    type: str = "max_p"
    beta: float = 0.5
    L_base: float = 2000
    decimating_layers: list = field(default_factory=list)
    min_seq_len: int = 20

    def __post_init__(self):
        problems = []
        # accept NumPy / torch scalars (e.g. np.int64 layer ids, np.inf) as plain Python numbers
        self.decimating_layers = [_as_int(i) for i in (self.decimating_layers or [])]
        self.min_seq_len = _as_int(self.min_seq_len)
        if isinstance(self.beta, numbers.Real) and not isinstance(self.beta, bool):
            self.beta = float(self.beta)
        if isinstance(self.L_base, numbers.Real) and not isinstance(self.L_base, bool):
            self.L_base = float(self.L_base) if math.isinf(float(self.L_base)) else self.L_base
        if self.type not in DECIMATION_TYPES:
            problems.append(f"type={self.type!r} is not valid; choose one of {DECIMATION_TYPES}")
        if not (isinstance(self.beta, (int, float)) and 0 < self.beta <= 1):
            problems.append(f"beta={self.beta!r} must be a number in (0, 1]")
        if self.L_base is None:
            self.L_base = math.inf
        if not (isinstance(self.L_base, (int, float)) and self.L_base > 0):
            problems.append(f"L_base={self.L_base!r} must be a positive number or inf")
        layers = list(self.decimating_layers or [])
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
            problems.append(f"decimating_layers={layers!r} must be non-negative integers")
        elif len(set(layers)) != len(layers):
            problems.append(f"decimating_layers={layers!r} repeats a layer")
        self.decimating_layers = layers
        if not (isinstance(self.min_seq_len, int) and self.min_seq_len >= 0):
            problems.append(f"min_seq_len={self.min_seq_len!r} must be a non-negative integer")
        if problems:
            raise ValueError("invalid decimation config: " + "; ".join(problems))

    @classmethod
    def from_any(cls, cfg) -> "DecimationConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        if isinstance(cfg, dict):
            unknown = set(cfg) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown decimation config keys {sorted(unknown)}; valid: {sorted(cls.__dataclass_fields__)}")
            return cls(**cfg)
        raise TypeError(f"decimation_config must be a dict or DecimationConfig, got {type(cfg).__name__}")

    def decimates(self, layer_idx: int) -> bool:
        return self.activate and layer_idx in self.decimating_layers

    def check_layers(self, n_layer: int) -> None:
        bad = [i for i in self.decimating_layers if i >= n_layer]
        if bad:
            raise ValueError(f"decimating_layers {bad} are outside [0, {n_layer}) for this {n_layer}-layer model")


def _as_int(v):
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return int(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_floating_point():
        return int(v.item())
    return v


def num_kept(l_dec: int, s: int, beta: float, L_base: float, min_seq_len: int) -> int:
    """Non-response tokens kept by the s-th decimating layer (see module docstring)."""
    if math.isinf(L_base):
        return l_dec
    k = int(max(min(l_dec, L_base * beta**s), min_seq_len))
    return min(k, l_dec)


def token_scores(delta: torch.Tensor) -> torch.Tensor:
    """(b, d, l) Δ after softplus -> (b, l) fp32 L2 norm over channels."""
    return torch.linalg.vector_norm(delta.float(), dim=1)


def kept_indices(delta: torch.Tensor, resp_len: int, layer_idx: int, cfg: DecimationConfig) -> torch.Tensor | None:
    """Kept positions (b, k + resp_len), ascending, for a decimating layer; None elsewhere.

    delta: (b, d, l) softplus(dt + dt_bias). Every row keeps the same count (k depends on l only),
    so a batch is decimated per row with one top-k call.
    """
    return kept_from_scores(token_scores(delta), resp_len, layer_idx, cfg) if cfg.decimates(layer_idx) else None


def kept_from_scores(scores: torch.Tensor, resp_len: int, layer_idx: int, cfg: DecimationConfig) -> torch.Tensor | None:
    """``kept_indices`` from the per-token scores (b, l) = ‖Δ‖₂ over channels."""
    if not cfg.decimates(layer_idx):
        return None
    bsz, length = scores.shape
    resp = min(max(int(resp_len or 0), 0), length)
    l_dec = length - resp
    k = num_kept(l_dec, cfg.decimating_layers.index(layer_idx), cfg.beta, cfg.L_base, cfg.min_seq_len)
    device = scores.device
    tail = torch.arange(l_dec, length, device=device).expand(bsz, resp)
    head = torch.sort(top_k_candidates(scores[:, :l_dec], k), dim=1).values
    return torch.cat([head, tail], dim=1)


def top_k_candidates(scores: torch.Tensor, k: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (b, min(k, m)) into the candidate axis of ``scores`` (b, m): its k best candidates.

    Best = higher score; an exact tie goes to the earlier sequence position. ``positions`` (b, m)
    are the candidates' distinct sequence positions (a streamed buffer holds them in any order);
    None means the candidate axis is in sequence order. The result is in no particular order.
    """
    bsz, m = scores.shape
    if k >= m:
        return torch.arange(m, device=scores.device).expand(bsz, m)
    by_pos = None if positions is None else torch.argsort(positions, dim=1)         # (b, m)
    ordered = scores if by_pos is None else scores.gather(1, by_pos)
    best = torch.sort(ordered, dim=1, descending=True, stable=True).indices[:, :k]  # stable: ties by position
    return best if by_pos is None else by_pos.gather(1, best)


def gather_tokens(x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """Select positions ``keep`` (b, k) along ``dim`` of a batch-first tensor x."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = keep.shape
    size = list(x.shape)
    size[dim] = keep.shape[1]
    return x.gather(dim, keep.view(shape).expand(size))
