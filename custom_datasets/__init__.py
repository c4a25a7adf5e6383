"""Tasks keyed by the original ``dataset`` config values (imported lazily)."""
from __future__ import annotations


def get_task(name: str):
    if name == "niah_custom":
        from custom_datasets.niah import NiahTask

        return NiahTask
    if name == "squad_retrieve":
        from custom_datasets.squad_retrieve import SquadRetrieveTask

        return SquadRetrieveTask
    if name == "ppl_test":
        from custom_datasets.pg19 import PG19Task

        return PG19Task
    raise ValueError(f"dataset={name!r} is not valid; choose one of ['niah_custom', 'squad_retrieve', 'ppl_test']")
