"""Local path or Hugging Face hub id -> local file, failing in seconds when the hub is unreachable.

huggingface_hub retries a dead connection for 20-50 s before it gives up; a research tool should
instead say at once what to pass. We probe the endpoint with a short TCP connect first, and use
the local cache when offline (HF_HUB_OFFLINE=1) or unreachable.
"""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


class HubUnavailableError(OSError):
    """The hub cannot be reached and the file is not cached; the message says what to pass."""


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as exc:
        return False, f"{host}:{port} unreachable ({exc})"


def looks_like_repo_id(name: str) -> bool:
    parts = str(name).split("/")
    return len(parts) == 2 and all(parts) and not str(name).startswith((".", "/", "~"))


def resolve_file(name_or_path: str, filename: str, cache_dir=None, what: str = "checkpoint",
                 local_hint: str = "a local directory") -> str | None:
    """Path of ``filename`` in a local directory or hub repo; None if the repo lacks it."""
    if os.path.isdir(name_or_path):
        p = os.path.join(name_or_path, filename)
        return p if os.path.isfile(p) else None
    if not looks_like_repo_id(name_or_path):
        raise FileNotFoundError(
            f"{what} {name_or_path!r} is neither an existing directory nor a hub id of the form 'owner/name'; "
            f"pass {local_hint}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError

    cached = try_to_load_from_cache(name_or_path, filename, cache_dir=cache_dir)
    if isinstance(cached, str):
        return cached
    ok, why = hub_reachable()
    if not ok:
        raise HubUnavailableError(
            f"cannot fetch {what} {name_or_path!r} ({filename}): the Hugging Face hub is not reachable ({why}) "
            f"and the file is not in the local cache. Pass {local_hint} instead.")
    try:
        return hf_hub_download(name_or_path, filename, cache_dir=cache_dir, etag_timeout=10)
    except EntryNotFoundError:
        return None


def resolve_first(name_or_path: str, filenames, cache_dir=None, what: str = "checkpoint",
                  local_hint: str = "a local directory") -> tuple[str, str] | None:
    """(filename, path) of the first of ``filenames`` the directory or hub repo has; None if none.

    A hub repo's local cache is searched for every candidate before the network is tried, so an
    offline machine finds a cached pytorch_model.bin even when model.safetensors was never fetched."""
    if not os.path.isdir(name_or_path) and looks_like_repo_id(name_or_path):
        from huggingface_hub import try_to_load_from_cache

        for fname in filenames:
            cached = try_to_load_from_cache(name_or_path, fname, cache_dir=cache_dir)
            if isinstance(cached, str):
                return fname, cached
    for fname in filenames:
        path = resolve_file(name_or_path, fname, cache_dir, what, local_hint)
        if path is not None:
            return fname, path
    return None
