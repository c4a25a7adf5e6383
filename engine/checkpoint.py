"""Checkpoints written atomically (a temp folder renamed into place) and training-state resume.

A checkpoint folder holds model.safetensors + config.json (loadable by from_pretrained),
tokenizer.json, the run config (finetune_ssm_config.json, flat keys) and, for periodic
checkpoints, training_state.pt: optimizer, scheduler, RNG states, data position and best score.
"""
from __future__ import annotations

import glob
import os
import random
import re
import shutil

import numpy as np
import torch

from engine.results import write_json_atomic


def save_checkpoint(path: str, model, tokenizer, run_cfg: dict, state: dict | None = None) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp_{os.path.basename(path)}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save(tmp)
    write_json_atomic(os.path.join(tmp, "finetune_ssm_config.json"), run_cfg)
    if state is not None:
        torch.save(state, os.path.join(tmp, "training_state.pt"))
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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
    """The periodic checkpoint with the highest step that holds a training state."""
    best, best_step = None, -1
    for d in glob.glob(os.path.join(run_dir, "epoch_*_step_*")):
        m = re.search(r"step_(\d+)$", d)
        if m and os.path.isfile(os.path.join(d, "training_state.pt")) and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    return best


def load_training_state(ckpt: str) -> dict:
    # weights_only=False: the state holds Python/NumPy RNG tuples; it is our own file.
    return torch.load(os.path.join(ckpt, "training_state.pt"), map_location="cpu", weights_only=False)
