"""Evaluation over a task's grid: resumable, one record per cell, a printed table, metrics and plots."""
from __future__ import annotations

import datetime
import os
import time

import torch
from tqdm import tqdm

from engine.results import ResultsStore, write_json_atomic


def evaluate(task, model, device, run_dir: str, identity: dict, train_len=None, quiet=False):
    """Run (or resume) every cell of ``task.eval_cells()``; returns (score, table, records).

    identity: task, task_version, checkpoint, config_hash and step of this evaluation.
    """
    store = ResultsStore(os.path.join(run_dir, "results.jsonl"))
    done = store.done(identity, task.axes)
    cells = task.eval_cells()
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
                rec = {**identity, **cell, **res, "seconds": share,
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
    metrics = {**identity, "metric": task.primary_metric, "higher_is_better": task.higher_is_better,
               "score": score, "cells": len(records), "table": table}
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
