"""Mamba language model (embedding → blocks → norm_f → lm_head) and its DeciMamba variant.

Official implementation: state-spaces/mamba ``mamba_ssm/models/mixer_seq_simple.py`` and the
DeciMamba patch of it. Parameter names equal mamba-ssm's, so ``state-spaces/mamba-*`` and
``assafbk/*`` checkpoints load with no renaming.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import hf_format
from models.config import MambaConfig
from models.generation import generate as _generate
from models.hf_format import FORMATS, MAMBA_SSM, TRANSFORMERS, CheckpointFormatError
from models.hub import resolve_file, resolve_first
from modules.block import Block, add_norm, make_norm
from modules.decimation import DecimationConfig, gather_tokens
from modules.kernels import BACKENDS
from modules.mamba2_mixer import Mamba2Mixer
from modules.mamba_mixer import MambaMixer

# in order of preference; an index names shards (transformers' sharded checkpoints)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# kept fp32 whatever the model dtype (mamba-ssm creates A_log and D in fp32; Δ's bias is used in fp32)
KEEP_FP32 = ("A_log", "D", "dt_proj.bias", "dt_bias")


@dataclass
class LMOutput:
    """logits (b, k, V): the last k = num_last_tokens positions, or every position that reached
    the head when k == 0 (a decimating model returns the decimated length then).
    kept_indices: [(layer_idx, kept positions in that layer's input)] for each layer listed in
    ``decimating_layers``, in layer order (every position when decimation is off); a LongTensor
    (k,) for batch 1, (b, k) otherwise. debug_params: per-layer dicts of A, B, C,
    Δ and kept indices when the forward is called with ``record=True``, else None."""

    logits: torch.Tensor
    kept_indices: list = field(default_factory=list)
    debug_params: list | None = None


class LayerCache:
    """Recurrent state of one mixer: conv_state (b, e, d_conv) raw inputs, ssm_state (b, e, n) fp32."""

    def __init__(self):
        self.conv_state = None
        self.ssm_state = None

    def extend_conv_input(self, x: torch.Tensor, d_conv: int) -> tuple[torch.Tensor, int]:
        """A prefill chunk's conv input x (b, c, l) -> (x with the last d_conv - 1 inputs of the
        previous chunk prepended, how many were prepended); keeps the last d_conv raw inputs of
        the result (zero-padded left) as the new conv_state."""
        prev = 0
        if self.conv_state is not None:
            prev = d_conv - 1
            x = torch.cat([self.conv_state[:, :, 1:].to(x.dtype), x], dim=2)
        self.conv_state = F.pad(x, (d_conv - x.shape[2], 0)).detach().clone()
        return x, prev


class MixerModel(nn.Module):
    """The backbone. Residual rows are subsampled wherever a layer decimated."""

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        d = config.d_model
        self.embedding = nn.Embedding(config.padded_vocab_size, d, **fk)
        mixer_cls = Mamba2Mixer if config.layer == "Mamba2" else MambaMixer
        self.layers = nn.ModuleList(
            Block(d, mixer_cls(d, layer_idx=i, **config.mixer_kwargs(), **fk), config.rms_norm,
                  config.residual_in_fp32, norm_eps=config.norm_epsilon, **fk)
            for i in range(config.n_layer))
        self.norm_f = make_norm(d, config.rms_norm, eps=config.norm_epsilon, **fk)

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
    checkpoint_format = None     # "mamba_ssm" | "transformers" once loaded: save_pretrained's default
    _hf_base_config = None       # the transformers config.json it was loaded from (token ids etc. carried over)

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
    def forward(self, input_ids, num_last_tokens: int = 0, caches=None, record: bool = False):
        """input_ids (b, l) -> LMOutput. ``caches`` (from allocate_inference_cache) is filled
        with the prompt's final states (prefill). ``record``: also return every layer's A, B, C,
        Δ and kept indices (debug_params) of this call; only a caller that keeps them asks
        (custom_datasets/debug_params.py) -- the config's record_debug_params never records here."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        resp_len = num_last_tokens if self.decimating else 0
        hidden, kept, debug = self.backbone(input_ids, resp_len, self.decimation, caches, record=record)
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
        """Load a checkpoint from a local directory or a hub id: mamba_ssm format
        (state-spaces/mamba-130m, assafbk/decimamba-130m-niah) or transformers format
        (model_type "mamba" or "falcon_mamba": state-spaces/mamba-130m-hf, tiiuae/falcon-mamba-7b),
        told apart by config.json (models/hf_format.py). Weights: model.safetensors,
        pytorch_model.bin (weights_only) or their sharded index. ``dtype`` casts every weight but
        A_log, D and dt_proj.bias, which stay fp32 (KEEP_FP32). ``config_overrides`` are
        MambaConfig fields, applied after the format's config is read."""
        hint = "a local directory holding config.json and model.safetensors or pytorch_model.bin"
        cfg_path = resolve_file(name_or_path, "config.json", cache_dir, "checkpoint", hint)
        if cfg_path is None:
            raise FileNotFoundError(f"checkpoint {name_or_path!r} has no config.json; pass {hint}")
        raw = _read_json(cfg_path)
        fmt = hf_format.detect_format(raw, cfg_path)
        try:
            config = hf_format.config_from_hf(raw, cfg_path) if fmt == TRANSFORMERS else MambaConfig.from_dict(raw)
            if config_overrides:
                config = MambaConfig.from_dict({**dataclasses.asdict(config), **config_overrides})
        except CheckpointFormatError:
            raise
        except (ValueError, TypeError) as exc:
            raise CheckpointFormatError(f"{cfg_path}: {exc}") from None
        state = _load_weights(name_or_path, cache_dir, hint)
        if fmt == TRANSFORMERS:
            hf_format.state_from_hf(state, config.tie_embeddings)
        with torch.random.fork_rng(devices=[]):      # the random init is overwritten: leave the caller's RNG alone
            model = cls(config, decimation_config=decimation_config, backend=backend, dtype=dtype)
        _keep_fp32(model)
        if config.tie_embeddings and hf_format.EMBEDDING[0] in state:
            head, emb = state.get("lm_head.weight"), state[hf_format.EMBEDDING[0]]
            if head is not None and not (head.shape == emb.shape and torch.equal(head, emb.to(head.dtype))):
                # transformers would keep the stored head and untie; neither choice is the checkpoint's own
                raise CheckpointFormatError(
                    f"{name_or_path}: config.json ties the output head to the embedding, but the stored "
                    f"lm_head.weight differs from it; set tie_word_embeddings (or tie_embeddings) to false in "
                    f"config.json to use the stored head, or drop lm_head.weight to use the embedding")
            state["lm_head.weight"] = emb
        own = model.state_dict()
        bad = [f"{k} {tuple(v.shape)} (config: {tuple(own[k].shape)})" for k, v in state.items()
               if k in own and own[k].shape != v.shape]
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected or bad:
            raise CheckpointFormatError(
                f"checkpoint {name_or_path!r} does not match its config.json: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, shape mismatch {bad[:3]}; the weights and config.json disagree")
        model.load_state_dict(state)
        model.checkpoint_format = fmt
        model._hf_base_config = raw if fmt == TRANSFORMERS else None
        return model.to(device=device)

    def save_pretrained(self, save_dir, format: str | None = None) -> None:
        """Write config.json and model.safetensors, each atomically (temp file, fsync, rename).

        format: "mamba_ssm" (mamba-ssm's names; loads in mamba_ssm and here) or "transformers"
        (loads with transformers' MambaForCausalLM / FalconMambaForCausalLM.from_pretrained, and
        here). Default: the format the model was loaded from; else mamba_ssm for Mamba and
        transformers for Falcon-Mamba (mamba-ssm has no Falcon-Mamba mixer)."""
        from safetensors.torch import save_file

        falcon = bool(self.config.ssm_cfg.get("b_c_dt_rms", False))
        fmt = format or self.checkpoint_format or (TRANSFORMERS if falcon else MAMBA_SSM)
        if fmt not in FORMATS:
            raise ValueError(f"format={fmt!r} is not valid; choose one of {FORMATS}")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight")
        if fmt == TRANSFORMERS:
            dtype_name = str(self.backbone.embedding.weight.dtype).removeprefix("torch.")
            cfg = hf_format.config_to_hf(self.config, dtype_name, self._hf_base_config)
            hf_format.state_to_hf(state)
        else:
            cfg = self.config.to_dict()
        os.makedirs(save_dir, exist_ok=True)
        atomic_write(save_dir, "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
        atomic_write(save_dir, "config.json", lambda p: _write_text(p, json.dumps(cfg, indent=2) + "\n"))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())


class DecimatingMambaModel(MambaLMHeadModel):
    """DeciMamba: as MambaLMHeadModel, but ``num_last_tokens`` is the protected response length
    and the decimation config is honoured. The original forces fused_add_norm off for this
    class; here the add and norm are always unfused, so the outputs are the same either way."""

    decimating = True


def keeps_fp32(name: str) -> bool:
    """Whether parameter ``name`` is one of KEEP_FP32 (A_log, D, Δ's bias), which stay fp32 in half models."""
    return any(name == k or name.endswith("." + k) for k in KEEP_FP32)


def _keep_fp32(model) -> None:
    """KEEP_FP32 parameters in fp32 (in place: the same Parameters, attributes kept)."""
    for name, p in model.named_parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and keeps_fp32(name):
            p.data = p.data.float()                  # fp64 models stay fp64


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                                    f"fix or re-create the file") from None
    except UnicodeDecodeError:
        raise CheckpointFormatError(f"{path}: not UTF-8 text; it should be a JSON file") from None
    if not isinstance(data, dict):
        raise CheckpointFormatError(f"{path}: holds a JSON {type(data).__name__}, not an object of settings")
    return data


def _load_weights(name_or_path: str, cache_dir, hint: str) -> dict:
    """The state dict of the first of WEIGHT_FILES the checkpoint has (all shards of an index)."""
    found = resolve_first(name_or_path, WEIGHT_FILES, cache_dir, "checkpoint", hint)
    if found is None:
        raise FileNotFoundError(f"checkpoint {name_or_path!r} has none of {WEIGHT_FILES}; pass {hint}")
    fname, path = found
    if not fname.endswith(".index.json"):
        return _load_state_dict(path)
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{path}: has no 'weight_map' of parameter -> shard file; re-download it")
    state = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointFormatError(f"{path}: shard {shard!r} is not a file name in the checkpoint directory")
        shard_path = resolve_file(name_or_path, shard, cache_dir, "checkpoint", hint)
        if shard_path is None:
            raise FileNotFoundError(f"checkpoint {name_or_path!r}: shard {shard} named in {fname} is missing; "
                                    f"re-download the checkpoint")
        state.update(_load_state_dict(shard_path))
    return state


def _load_state_dict(path: str) -> dict:
    """Tensors of a .safetensors or a weights-only .bin file; a bad file is one CheckpointFormatError line."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as exc:
            raise CheckpointFormatError(f"{path}: not a readable safetensors file ({exc}); it is truncated or "
                                        f"corrupt: re-download or re-save the checkpoint") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run the file's code: not offered here
        raise CheckpointFormatError(
            f"{path}: holds Python objects besides tensors, which the safe loader (weights_only=True) refuses; "
            f"convert it to model.safetensors from a trusted copy") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointFormatError(f"{path}: not a readable PyTorch checkpoint ({first}); it is truncated or "
                                    f"corrupt: re-download or re-save the checkpoint") from None
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointFormatError(f"{path}: holds a {type(state).__name__} that is not a state dict of "
                                    f"name -> tensor; save model.state_dict() instead")
    return state


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write(directory: str, name: str, write) -> None:
    """Write directory/name through ``write(tmp_path)``, fsync it, then rename it into place
    (never half a file, even after a power cut) and fsync the directory (the rename itself)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)            # mkstemp makes 0600 files; checkpoints are shared
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:                              # e.g. Windows cannot open a directory: nothing to sync
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
