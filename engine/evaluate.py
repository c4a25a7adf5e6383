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
    records = []
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(cells, desc=f"eval {task.name} step {identity['step']}", unit="cell", disable=quiet)
        for cell in bar:
            axis = tuple(cell[a] for a in task.axes)
            if axis in done:
                records.append(done[axis])
                continue
            t = time.perf_counter()
            with torch.no_grad():
                res = task.run_cell(model, cell, device)
            rec = {**identity, **cell, **res, "seconds": round(time.perf_counter() - t, 3),
                   "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            store.append(rec)
            records.append(rec)
            bar.set_postfix(score=f"{res['score']:.3g}")
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
