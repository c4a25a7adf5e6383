"""results.jsonl (one self-describing record per evaluation cell) and metrics.json.

Records are appended one line at a time and flushed to disk, so an interrupted evaluation keeps
every finished cell; a rerun skips the cells already recorded for the same task, task version,
checkpoint, config hash and step.
"""
from __future__ import annotations

import json
import os

IDENTITY = ("task", "task_version", "checkpoint", "config_hash", "step")


class ResultsStore:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def records(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:      # a line cut by a crash: ignore it
                        continue
        return out

    def done(self, identity: dict, axes: tuple) -> dict:
        return {tuple(r[a] for a in axes): r for r in self.records()
                if all(r.get(k) == identity[k] for k in IDENTITY)}

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
