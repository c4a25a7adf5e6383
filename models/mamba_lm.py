"""Mamba language model (embedding → blocks → norm_f → lm_head) and its DeciMamba variant.

Official implementation: state-spaces/mamba ``mamba_ssm/models/mixer_seq_simple.py`` and the
DeciMamba patch of it. Parameter names equal mamba-ssm's, so ``state-spaces/mamba-*`` and
``assafbk/*`` checkpoints load with no renaming.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.config import MambaConfig
from models.generation import generate as _generate
from models.hub import resolve_file
from modules.block import Block, add_norm, make_norm
from modules.decimation import DecimationConfig, gather_tokens
from modules.kernels import BACKENDS
from modules.mamba_mixer import MambaMixer

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LMOutput:
    """logits (b, k, V): the last k = num_last_tokens positions, or every position that reached
    the head when k == 0 (a decimating model returns the decimated length then).
    kept_indices: [(layer_idx, kept positions in that layer's input)] for each layer listed in
    ``decimating_layers``, in layer order (every position when decimation is off); a LongTensor
    (k,) for batch 1, (b, k) otherwise. debug_params: per-layer dicts of A, B, C,
    Δ and kept indices when ``record_debug_params`` is on, else None."""

    logits: torch.Tensor
    kept_indices: list = field(default_factory=list)
    debug_params: list | None = None


class LayerCache:
    """Recurrent state of one mixer: conv_state (b, e, d_conv) raw inputs, ssm_state (b, e, n) fp32."""

    def __init__(self):
        self.conv_state = None
        self.ssm_state = None


class MixerModel(nn.Module):
    """The backbone. Residual rows are subsampled wherever a layer decimated."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d, **fk)
        self.layers = nn.ModuleList(
            Block(d, MambaMixer(d, layer_idx=i, **config.mixer_kwargs(), **fk), config.rms_norm,
                  config.residual_in_fp32, **fk)
            for i in range(config.n_layer))
        self.norm_f = make_norm(d, config.rms_norm, **fk)

    def forward(self, input_ids, resp_len, decimation, caches=None, record=False):
        hidden, residual = self.embedding(input_ids), None                                   # (b, l, d)
        kept, debug = [], ([] if record else None)
        for i, layer in enumerate(self.layers):
            length = hidden.shape[1]
            hidden, residual, keep, dbg = layer(hidden, residual, resp_len=resp_len, decimation=decimation,
                                                cache=None if caches is None else caches[i], record=record)
            if keep is not None and keep.shape[1] < residual.shape[1]:
                residual = gather_tokens(residual, keep, 1)                                  # (b, l', d)
            if i in decimation.decimating_layers:      # listed layers report their kept set (all, if off)
                if keep is None:
                    keep = torch.arange(length, device=hidden.device).expand(hidden.shape[0], -1)
                kept.append((i, keep[0] if keep.shape[0] == 1 else keep))
            if record:
                dbg["kept_indices"] = None if keep is None else keep.cpu()
                debug.append(dbg)
        return self._final_norm(hidden, residual), kept, debug

    def _final_norm(self, hidden, residual):
        backend = self.layers[0].mixer.backend
        return add_norm(self.norm_f, hidden, residual, self.layers[0].residual_in_fp32, backend, prenorm=False)

    def step(self, input_ids, caches):
        hidden, residual = self.embedding(input_ids), None                                   # (b, 1, d)
        for layer, cache in zip(self.layers, caches):
            hidden, residual = layer.step(hidden, residual, cache)
        return self._final_norm(hidden, residual)


class MambaLMHeadModel(nn.Module):
    """Vanilla Mamba LM. ``decimation_config`` is accepted for a common signature but a vanilla
    model never decimates (as the original forces it off for mamba_arch 'vanilla')."""

    decimating = False

    def __init__(self, config: MambaConfig, decimation_config=None, device=None, dtype=None, backend="auto"):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config, device=device, dtype=dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.decimation = DecimationConfig()
        self.set_decimation(decimation_config)
        self.set_backend(backend)
        self._init_weights(config.n_layer)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    # ---------------------------------------------------------------- configuration
    def set_decimation(self, decimation_config) -> None:
        cfg = DecimationConfig.from_any(decimation_config)
        if cfg.activate and not self.decimating:
            warnings.warn("MambaLMHeadModel never decimates; use DecimatingMambaModel for DeciMamba. "
                          "Decimation is off for this model.", stacklevel=2)
            cfg.activate = False
        cfg.check_layers(self.config.n_layer)
        self.decimation = cfg

    def set_backend(self, backend: str) -> None:
        """"auto": CUDA kernels when importable and on GPU; "torch": always the reference path;
        "kernel": require the kernels (an error when they cannot run)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
        for layer in self.backbone.layers:
            layer.mixer.backend = backend

    def _init_weights(self, n_layer: int) -> None:
        # As upstream _init_weights: N(0, 0.02) embeddings, zero biases (dt_proj keeps its own),
        # out_proj rescaled by 1/sqrt(n_layer) (GPT-2 style prenorm residual scaling).
        nn.init.normal_(self.backbone.embedding.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
            if name.endswith("out_proj"):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                with torch.no_grad():
                    module.weight /= math.sqrt(n_layer)

    # ---------------------------------------------------------------- forward / decoding
    def forward(self, input_ids, num_last_tokens: int = 0, caches=None):
        """input_ids (b, l) -> LMOutput. ``caches`` (from allocate_inference_cache) is filled
        with the prompt's final states (prefill)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        resp_len = num_last_tokens if self.decimating else 0
        hidden, kept, debug = self.backbone(input_ids, resp_len, self.decimation, caches,
                                            record=self.decimation.record_debug_params)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return LMOutput(self.lm_head(hidden), kept, debug)

    def allocate_inference_cache(self):
        return [LayerCache() for _ in self.backbone.layers]

    def step(self, input_ids, caches):
        """One recurrent step: input_ids (b, 1) -> logits (b, 1, V)."""
        return self.lm_head(self.backbone.step(input_ids, caches))

    def generate(self, input_ids, max_length, top_k=1, top_p=0.0, temperature=1.0, eos_token_id=None,
                 generator=None, prefill_chunk_size=None):
        """Greedy by default; see models/generation.py."""
        return _generate(self, input_ids, max_length, top_k=top_k, top_p=top_p, temperature=temperature,
                         eos_token_id=eos_token_id, generator=generator, prefill_chunk_size=prefill_chunk_size)

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, name_or_path, device=None, dtype=None, decimation_config=None, cache_dir=None,
                        backend="auto", **config_overrides):
        """Load ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (weights_only)
        from a local directory or a hub id (state-spaces/mamba-130m, assafbk/decimamba-130m-niah)."""
        hint = "a local directory holding config.json and model.safetensors or pytorch_model.bin"
        cfg_path = resolve_file(name_or_path, "config.json", cache_dir, "checkpoint", hint)
        if cfg_path is None:
            raise FileNotFoundError(f"checkpoint {name_or_path!r} has no config.json; pass {hint}")
        with open(cfg_path) as f:
            config = MambaConfig.from_dict({**json.load(f), **config_overrides})
        state = None
        for fname in WEIGHT_FILES:
            path = resolve_file(name_or_path, fname, cache_dir, "checkpoint", hint)
            if path is not None:
                state = _load_state_dict(path)
                break
        if state is None:
            raise FileNotFoundError(f"checkpoint {name_or_path!r} has none of {WEIGHT_FILES}; pass {hint}")
        with torch.random.fork_rng(devices=[]):      # the random init is overwritten: leave the caller's RNG alone
            model = cls(config, decimation_config=decimation_config, backend=backend)
        if config.tie_embeddings:
            state.setdefault("lm_head.weight", state["backbone.embedding.weight"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {name_or_path!r} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, save_dir) -> None:
        """Write config.json and model.safetensors, each atomically (temp file + rename)."""
        from safetensors.torch import save_file

        os.makedirs(save_dir, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        atomic_write(save_dir, "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(save_dir, "config.json",
                      lambda p: open(p, "w").write(json.dumps(self.config.to_dict(), indent=2)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class DecimatingMambaModel(MambaLMHeadModel):
    """DeciMamba: as MambaLMHeadModel, but ``num_last_tokens`` is the protected response length
    and the decimation config is honoured. The original forces fused_add_norm off for this
    class; here the add and norm are always unfused, so the outputs are the same either way."""

    decimating = True


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_write(directory: str, name: str, write) -> None:
    """Write directory/name through ``write(tmp_path)``, then rename it into place (never half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)            # mkstemp makes 0600 files; checkpoints are shared
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
