"""Evaluation over a task's grid: resumable, one record per cell, a printed table, metrics and plots.

A recorded cell is reused only for the same IDENTITY (engine/results.py: task, version, checkpoint
label, weights' content, config hash, backend, dtype, device type, step); the run says how many it
reuses, and ``fresh=True`` (``--fresh-eval``) evaluates every cell again (new records are appended,
the old ones stay).
"""
from __future__ import annotations

import datetime
import os
import time

import torch
from tqdm import tqdm

from configs import schema
from engine.results import ResultsStore, code_commit, state_digest, write_json_atomic


def evaluate(task, model, device, run_dir: str, identity: dict, train_len=None, quiet=False, fresh=False,
             provenance: dict | None = None):
    """Run (or resume) every cell of ``task.eval_cells()``; returns (score, table, records).

    identity: engine.results.IDENTITY's fields of this evaluation; provenance: fields written into
    each new record but not matched (device name, commit).
    """
    store = ResultsStore(os.path.join(run_dir, "results.jsonl"))
    cells = task.eval_cells()
    done = store.done(identity, task.axes)
    recorded = sum(tuple(c[a] for a in task.axes) in done for c in cells)
    if recorded and fresh:
        print(f"--fresh-eval: not reusing {recorded} recorded cell(s) in {store.path}; appending new records")
        done = {}
    elif recorded:
        print(f"reusing {recorded} recorded cell(s) from {store.path} (same weights, settings, backend, dtype, "
              f"device; --fresh-eval evaluates them again)")
    was_training = model.training
    model.eval()
    try:
        pending = [c for c in cells if tuple(c[a] for a in task.axes) not in done]
        groups = cell_groups(task, pending)
        bar = tqdm(total=len(cells), initial=len(cells) - len(pending), desc=f"eval {task.name} step {identity['step']}",
                   unit="cell", disable=quiet)
        for group in groups:
            t = time.perf_counter()
            with torch.no_grad():
                results = task.run_cells(model, group, device) if len(group) > 1 else [task.run_cell(model, group[0], device)]
            share = round((time.perf_counter() - t) / len(group), 3)          # a batched group's time, split evenly
            for cell, res in zip(group, results):
                rec = {**identity, **(provenance or {}), **cell, **res, "seconds": share,
                       "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                store.append(rec)
                done[tuple(cell[a] for a in task.axes)] = rec
            bar.update(len(group))
            bar.set_postfix(score=f"{results[-1]['score']:.3g}")
        bar.close()
        records = [done[tuple(c[a] for a in task.axes)] for c in cells]
    finally:
        model.train(was_training)
    score, table = task.summarize(records)
    step = identity["step"]
    metrics = {**identity, **(provenance or {}), "metric": task.primary_metric,
               "higher_is_better": task.higher_is_better, "score": score, "cells": len(records), "table": table}
    write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)
    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    plot_path = os.path.join(run_dir, "plots", f"{task.name}_step{step}.png")
    try:
        task.plot(records, plot_path, train_len)
        if not quiet:
            print(f"plot: {plot_path}")
    except Exception as exc:  # noqa: BLE001 - a plot must never lose the numbers
        print(f"warning: plot {plot_path} failed: {exc}")
    return score, table, records


def cell_groups(task, cells):
    """Cells a task can run as one batch (same group_key), in first-appearance order; else singletons."""
    if not hasattr(task, "run_cells"):
        return [[c] for c in cells]
    out = {}
    for c in cells:
        out.setdefault(task.group_key(c), []).append(c)
    return list(out.values())


def resolved_backend(backend: str, device, mamba2: bool = False, d_state: int = 16, dtype=torch.float32) -> str:
    """The path that runs: 'auto' is 'kernel' on CUDA with the kernels importable, else 'torch'; on CUDA
    where the Mamba-1 scan is Triton's (DECIMAMBA_SCAN=triton, or its default 'auto' without mamba-ssm's
    kernels; modules.selective_scan.cuda_scan): 'triton_scan' ('kernel+triton_scan' beside the other
    kernels) where it takes the model's d_state and dtype. Mamba-2 models (mamba2): 'kernel' with mamba-ssm's
    SSD kernels and causal-conv1d, 'ssd_kernel' with the SSD kernels and the conv in torch, else 'torch'."""
    from modules import kernels
    from modules.selective_scan import cuda_scan, triton_takes

    if backend == "torch":
        return "torch"
    cuda = torch.device(device).type == "cuda"
    if mamba2:
        if not (cuda or backend == "kernel") or kernels._ssd_kernels()[2] is not None:
            return "torch" if backend == "auto" else backend
        return "kernel" if kernels.has_conv_kernel() else "ssd_kernel"
    path = backend if backend != "auto" else ("kernel" if kernels.HAS_KERNELS and cuda else "torch")
    if cuda and cuda_scan(backend) == "triton" and triton_takes(d_state, dtype):
        return "kernel+triton_scan" if path == "kernel" else "triton_scan"
    return path


def _config(model):
    return getattr(getattr(model, "module", model), "config", None)        # DDP wraps the model in .module


def _is_mamba2(model) -> bool:
    return getattr(_config(model), "layer", None) == "Mamba2"


def _d_state(model) -> int:
    return int((getattr(_config(model), "ssm_cfg", None) or {}).get("d_state", 16))


def eval_identity(task, model, cfg, device, checkpoint: str, step: int, weights: str | None = None) -> tuple[dict, dict]:
    """(identity, provenance) of evaluating ``model`` now. weights: the checkpoint files' digest when
    ``model`` is exactly a loaded checkpoint; None: the digest of its in-memory parameters."""
    dev = torch.device(device)
    dtype = next(iter(model.parameters())).dtype
    identity = {"task": task.name, "task_version": task.version, "checkpoint": checkpoint,
                "weights": weights or state_digest(model), "config_hash": schema.config_hash(cfg),
                "backend": resolved_backend(cfg["backend"], dev, _is_mamba2(model), _d_state(model), dtype),
                "dtype": str(dtype).replace("torch.", ""),
                "device": dev.type, "step": step}
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return identity, {"device_name": name, "commit": code_commit()}


def run_eval(task, model, cfg, run_dir, device, checkpoint, step, label, weights=None, fresh=False):
    identity, provenance = eval_identity(task, model, cfg, device, checkpoint, step, weights)
    print(f"Evaluating over {task.name}, step {step}")
    score, table, _ = evaluate(task, model, device, run_dir, identity, fresh=fresh, provenance=provenance)
    print(table)
    print(f"Validation Set - {label} | Score: {score:.3f}")
    return score


def better(task, score, best):
    if best is None or score != score:
        return best is None and score == score
    return score > best if task.higher_is_better else score < best


def find_deci_layer(task, model, cfg, run_dir, device, weights=None, fresh=False):
    """Sweep the (single) decimating layer on the eval set; install the best layer number in
    ``model`` and ``cfg``. Each layer's cells carry that layer in their config hash."""
    n = model.config.n_layer
    cands = cfg["find_deci_layer_candidates"] or (list(range(8, min(n, 25))) if n > 8 else list(range(n)))
    if any(not 0 <= layer < n for layer in cands):      # a hub model's depth is known only once it is loaded
        raise ValueError(f"find_deci_layer_candidates={cands} but the model has {n} layers (0..{n - 1}): sweep layers "
                         f"that exist, or pass null for the default sweep")
    saved = list(model.decimation.decimating_layers)
    scores = {}
    for layer in cands:
        model.decimation.decimating_layers = [layer]
        scores[layer] = run_eval(task, model, {**cfg, "decimating_layers": [layer]}, os.path.join(run_dir, "find_deci_layer"),
                                 device, f"sweep_layer_{layer}", 0, f"decimating layer {layer}", weights, fresh)
    pick = (max if task.higher_is_better else min)(scores, key=scores.get) if scores else saved[0]
    model.decimation.decimating_layers = [pick] if scores else saved
    write_json_atomic(os.path.join(run_dir, "find_deci_layer.json"), {"scores": scores, "chosen_layer": pick})
    print(f"find_deci_layer: scores {scores}; chosen layer {pick}")
    cfg["decimating_layers"] = [pick]
