"""Shared helpers for benchmark scripts: machine description, timing, and result files."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return desc


def git_rev() -> str:
    rev = os.environ.get("GIT_REV") or os.environ.get("DECIMAMBA_COMMIT")
    if rev:                              # copies without the right .git (the GPU machine) pass it in
        return rev
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def timeit(fn, repeats=3, warmup=1, sync=None) -> float:
    """Median wall seconds of fn() over ``repeats`` runs (the faster of two) after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[(len(times) - 1) // 2]


def write_results(path_stem: str, rows: list[dict], columns: list[str], title: str, notes: str = "") -> None:
    """Write <stem>.json (rows + provenance) and <stem>.md (a table), each atomically."""
    meta = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "machine": machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": git_rev()}
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    _atomic(path_stem + ".json", json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"# {title}", "", f"- command: `{meta['command']}`", f"- machine: {meta['machine']}",
             f"- date: {meta['date']} (git {meta['git']})", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    _atomic(path_stem + ".md", "\n".join(lines) + "\n")


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
