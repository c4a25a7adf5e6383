"""Recording the SSM parameters of a prompt's prefill (record_debug_params, eval 6).

Per example one safetensors file holding, for every layer, A (e, n), B and C (n, l'), Δ (e, l')
and the kept indices, plus JSON metadata (needle position, lengths). Safe to load anywhere
(no pickle); modules/hidden_attention.py turns them into attention maps.
"""
from __future__ import annotations

import json
import os

import torch

from models.mamba_lm import atomic_write


def record_prompt_params(model, input_ids, directory: str, name: str, meta: dict) -> str:
    """One prefill forward of input_ids (1, l) with recording on; writes params_<name>.safetensors
    under directory and returns its path. Generation and training never record (record_debug_params
    only tells the passkey evaluation to call this, once per prompt)."""
    from safetensors.torch import save_file

    with torch.no_grad():
        out = model(input_ids, num_last_tokens=1, record=True)        # the only forward that records
    tensors = {}
    for i, layer in enumerate(out.debug_params):
        tensors[f"layer{i}.A"] = layer["A"].contiguous()
        for key in ("B", "C", "delta"):
            tensors[f"layer{i}.{key}"] = layer[key][0].contiguous()
        if layer["kept_indices"] is not None:
            tensors[f"layer{i}.kept_indices"] = layer["kept_indices"][0].contiguous()
    os.makedirs(directory, exist_ok=True)
    fname = f"params_{name}.safetensors"
    meta = {**meta, "n_layer": len(out.debug_params), "prompt_tokens": int(input_ids.shape[1])}
    atomic_write(directory, fname, lambda p: save_file(tensors, p, metadata={"meta": json.dumps(meta)}))
    return os.path.join(directory, fname)


def load_recorded(path: str) -> tuple[list[dict], dict]:
    """-> ([{A, B, C, delta, kept_indices?} per layer], metadata)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
        layers = [{} for _ in range(meta["n_layer"])]
        for key in f.keys():
            i, name = key.split(".", 1)
            layers[int(i[5:])][name] = f.get_tensor(key)
    return layers, meta
