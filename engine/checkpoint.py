"""Checkpoints written atomically (a temp folder renamed into place) and training-state resume.

A checkpoint folder holds model.safetensors + config.json (loadable by from_pretrained),
tokenizer.json, the run config (finetune_ssm_config.json, flat keys) and, for periodic
checkpoints, the training state: optimizer, scheduler, RNG states, data position and best score.

The training state is stored so that reading it runs no code: its tensors (optimizer moments,
torch/CUDA RNG states) in training_state.safetensors, everything else (step, hyper-parameters,
the Python and NumPy RNG states) in training_state.json, which names each tensor. The old
training_state.pt (a pickle, readable only with weights_only=False) is refused, not loaded.

Writes: the folder is built as .tmp_<name>, every file fsynced, then swapped in (the old one
renamed to <name>.old first; a kill between the two renames is undone by
recover_interrupted_swaps). A full disk raises DiskFullError and leaves the last good checkpoint.
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.errors import BadFileError, DiskFullError, fsync_dir, fsync_file, is_disk_full, read_json
from engine.results import write_json_atomic

RUN_CONFIG = "finetune_ssm_config.json"
STATE_INDEX = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
LEGACY_STATE = "training_state.pt"
STATE_FORMAT, STATE_VERSION = "decimamba-training-state", 1
STATE_KEYS = ("optimizer", "scheduler", "rng", "step", "epoch", "pos", "best")
DAMAGED = "the checkpoint is damaged: delete this epoch_*_step_* folder and --resume from the one before it"


def save_checkpoint(path: str, model, tokenizer, run_cfg: dict, state: dict | None = None) -> None:
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    recover_interrupted_swaps(parent)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        write_json_atomic(os.path.join(tmp, RUN_CONFIG), run_cfg)
        if state is not None:
            _write_training_state(tmp, state)
        for name in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, name)):
                fsync_file(os.path.join(tmp, name))
        fsync_dir(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise DiskFullError(path, "checkpoint not written; the previous checkpoints are kept: "
                                      "free some space, then continue with --resume <run folder>") from exc
        raise
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_swaps(run_dir: str) -> list[str]:
    """Finish or undo checkpoint swaps that a kill cut short; returns the folders restored.

    X.old without X (killed between the two renames): X.old is the last good X, renamed back.
    X.old beside X (killed before the clean-up): X is complete, X.old is removed. .tmp_X: a
    checkpoint that was never swapped in, removed.
    """
    if not os.path.isdir(run_dir):
        return []
    restored = []
    for name in sorted(os.listdir(run_dir)):
        full = os.path.join(run_dir, name)
        if not os.path.isdir(full):
            continue
        if name.startswith(".tmp_"):
            shutil.rmtree(full, ignore_errors=True)
        elif name.endswith(".old") and len(name) > 4:
            target = full[:-4]
            if os.path.exists(target):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.replace(full, target)
                restored.append(target)
    if restored:
        fsync_dir(run_dir)
    return restored


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def latest_checkpoint(run_dir: str) -> str | None:
    """The periodic checkpoint with the highest step that holds a training state (an old-format
    one too, so that resuming from it says why it cannot be loaded)."""
    recover_interrupted_swaps(run_dir)
    best, best_step = None, -1
    for d in glob.glob(os.path.join(glob.escape(run_dir), "epoch_*_step_*")):
        m = re.search(r"step_(\d+)$", d)
        has_state = any(os.path.isfile(os.path.join(d, f)) for f in (STATE_INDEX, LEGACY_STATE))
        if m and has_state and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    return best


def load_training_state(ckpt: str) -> dict:
    """The state saved with save_checkpoint: a dict with keys STATE_KEYS. No code runs."""
    index = os.path.join(ckpt, STATE_INDEX)
    if not os.path.isfile(index):
        legacy = os.path.join(ckpt, LEGACY_STATE)
        if os.path.isfile(legacy):
            raise BadFileError(f"{legacy}: an old-format training state (a pickle) that cannot be loaded safely "
                               f"(loading it could run code); start a new run from its weights with "
                               f"--set load_cp={ckpt}, or resume a run saved by this version")
        raise BadFileError(f"{ckpt}: no {STATE_INDEX} (not a periodic checkpoint); resume from an epoch_*_step_* folder")
    doc = read_json(index, DAMAGED)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or "state" not in doc:
        raise BadFileError(f"{index}: not a DeciMamba training state; {DAMAGED}")
    if doc.get("version") != STATE_VERSION:
        raise BadFileError(f"{index}: training-state version {doc.get('version')!r}, this code reads "
                           f"version {STATE_VERSION}; resume it with the version of this tool that wrote it")
    tensors_path = os.path.join(ckpt, STATE_TENSORS)
    if not os.path.isfile(tensors_path):
        raise BadFileError(f"{tensors_path}: missing (its index {STATE_INDEX} is there); {DAMAGED}")
    try:
        tensors = load_file(tensors_path)
    except SafetensorError as exc:
        raise BadFileError(f"{tensors_path}: not a readable safetensors file ({exc}); {DAMAGED}") from None
    try:
        state = _decode(doc["state"], tensors)
    except (KeyError, TypeError, ValueError) as exc:
        raise BadFileError(f"{index}: damaged training state ({type(exc).__name__}: {exc}); {DAMAGED}") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise BadFileError(f"{index}: the training state lacks some of {list(STATE_KEYS)}; {DAMAGED}")
    return state


# ---------------------------------------------------------------------------- state <-> JSON + tensors
# JSON holds None/bool/int/float/str/list and string-keyed dicts as themselves; everything else as
# {"__type__": ...}: "tensor" (a name in the safetensors file), "tuple", "dict" (non-string keys,
# e.g. the optimizer's parameter ids) and "ndarray" (NumPy's RNG key, as a list of numbers).
def _write_training_state(directory: str, state: dict) -> None:
    tensors: dict = {}
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": _encode(state, "state", tensors, {})}
    save_file(tensors, os.path.join(directory, STATE_TENSORS), metadata={"format": "pt"})
    write_json_atomic(os.path.join(directory, STATE_INDEX), doc)


def _encode(obj, where: str, tensors: dict, names: dict):
    """``obj`` as JSON; its tensors go into ``tensors`` (name -> tensor; ``names``: id -> name)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        if id(obj) not in names:                 # one tensor referenced twice is stored once
            name = where if where not in tensors else f"{where}#{len(tensors)}"
            t = obj.detach().cpu()
            shares = t.numel() and any(x.numel() and x.data_ptr() == t.data_ptr() for x in tensors.values())
            tensors[name] = t.clone() if shares or _is_view(t) else t      # safetensors wants whole, unshared storage
            names[id(obj)] = name
        return {"__type__": "tensor", "name": names[id(obj)]}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"training state: cannot store a NumPy {obj.dtype} array at {where}")
        return {"__type__": "ndarray", "dtype": obj.dtype.str, "data": obj.tolist()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{where}.{i}", tensors, names) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"__type__": "tuple", "items": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__type__" not in obj:
            return {k: _encode(v, f"{where}.{k}", tensors, names) for k, v in obj.items()}
        return {"__type__": "dict", "items": [[_encode(k, f"{where}.key", tensors, names),
                                               _encode(v, f"{where}.{k}", tensors, names)] for k, v in obj.items()]}
    raise TypeError(f"training state: cannot store a {type(obj).__name__} at {where}")


def _is_view(t: torch.Tensor) -> bool:
    whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
    return not (t.is_contiguous() and t.storage_offset() == 0 and whole)


def _decode(obj, tensors: dict):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("__type__")
    if kind is None:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if kind == "tensor":
        return tensors[obj["name"]]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in obj["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["items"]}
    if kind == "ndarray":
        dtype = np.dtype(obj["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"array dtype {dtype} is not numeric")
        return np.array(obj["data"], dtype=dtype)
    raise ValueError(f"unknown entry type {kind!r}")
