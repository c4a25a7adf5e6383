"""Tasks keyed by the original ``dataset`` config values, imported lazily: one registry."""
from __future__ import annotations

import importlib

TASKS = {
    "niah_custom": "custom_datasets.niah:NiahTask",
    "squad_retrieve": "custom_datasets.squad_retrieve:SquadRetrieveTask",
    "ppl_test": "custom_datasets.pg19:PG19Task",
    "lm_corpus": "custom_datasets.lm_corpus:LMCorpusTask",
}
TASK_NAMES = tuple(TASKS)


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"dataset={name!r} is not valid; choose one of {list(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
