"""results.jsonl (one self-describing record per evaluation cell), metrics.json, and what ties a
result to what produced it.

Records are appended one line at a time and flushed to disk, so an interrupted evaluation keeps
every finished cell. A rerun reuses a recorded cell only when everything that can change its
score is the same (IDENTITY): the task and its version, the checkpoint label, the weights' content
(``weights``: a digest of the checkpoint's files, or of the in-memory parameters of a model being
trained), the config hash (every key that can change a score, backend and prefill chunking
included), the resolved scan backend, the parameter dtype, the device type and the step. Each
record also says which device and code commit produced it (``device_name``, ``commit``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess

IDENTITY = ("task", "task_version", "checkpoint", "weights", "config_hash", "backend", "dtype", "device", "step")
DIGEST_CACHE = ".weight_digests.json"      # in output_dir: file digests keyed by path hash, size and mtime
_HASH_BLOCK = 1 << 23


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
        """Recorded cells of exactly this identity, by axis values (a later record wins)."""
        missing = [k for k in IDENTITY if k not in identity]
        if missing:
            raise ValueError(f"evaluation identity lacks {missing}")
        return {tuple(r[a] for a in axes): r for r in self.records()
                if all(r.get(k) == identity[k] for k in IDENTITY) and all(a in r for a in axes)}

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path: str, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through ``path.tmp``: written, fsynced, renamed, directory
    fsynced; a failed write removes the temp file and keeps the previous ``path``. A full disk
    raises DiskFullError ("no space left on device: PATH ...")."""
    from engine.errors import discard_partial, fsync_dir

    data = memoryview(json.dumps(obj, indent=2).encode("utf-8"))   # before any file is touched
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            while data:                          # os.write may write less than asked (a nearly full disk)
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        discard_partial(tmp, path, exc, "not written; the previous version, if any, is kept")
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ---------------------------------------------------------------------------- provenance
def file_digest(path: str, cache_path: str | None = None) -> str:
    """sha256 of a file's bytes, remembered by (real path, size, mtime) in memory and in ``cache_path``
    (JSON), so a 1 GB checkpoint is hashed once; any rewrite of the file changes size or mtime. The
    path enters the key as its own hash: the cache, in a run folder people share, names no machine path."""
    st = os.stat(path)
    where = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:16]
    key = f"{where}|{st.st_size}|{st.st_mtime_ns}"
    if key in _MEMO:
        return _MEMO[key]
    cache = _read_cache(cache_path)
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_HASH_BLOCK), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        if cache_path is not None:
            try:
                write_json_atomic(cache_path, cache)
            except OSError:          # a read-only or full output folder: hash again next time
                pass
    _MEMO[key] = cache[key]
    return cache[key]


_MEMO: dict = {}


def _read_cache(cache_path):
    if cache_path is None or not os.path.isfile(cache_path):
        return {}
    try:
        with open(cache_path) as f:
            data = json.load(f)
    except (OSError, ValueError):     # damaged: rebuilt
        return {}
    return data if isinstance(data, dict) else {}


def checkpoint_files(source: str, cache_dir=None) -> list[str]:
    """The files a checkpoint is loaded from (config.json, then the weight file(s) the loader picks:
    the first of models.mamba_lm.WEIGHT_FILES, with every shard of an index)."""
    from models.hub import resolve_file, resolve_first
    from models.mamba_lm import WEIGHT_FILES

    files = [resolve_file(source, "config.json", cache_dir)]
    found = resolve_first(source, WEIGHT_FILES, cache_dir)
    if found is not None:
        fname, path = found
        files.append(path)
        if fname.endswith(".index.json"):
            with open(path) as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            files += [resolve_file(source, shard, cache_dir) for shard in shards]
    return [f for f in files if f is not None]


def weights_digest(source: str, cache_dir=None, cache_path: str | None = None) -> str:
    """'files-sha256:<16 hex>': the content of checkpoint ``source`` (local directory or hub id)."""
    h = hashlib.sha256()
    for path in checkpoint_files(source, cache_dir):
        h.update(f"{os.path.basename(path)}:{file_digest(path, cache_path)}\n".encode())
    return "files-sha256:" + h.hexdigest()[:16]


def state_digest(model) -> str:
    """'state-sha256:<16 hex>': the in-memory parameters and buffers (names, dtypes, shapes, bytes),
    the identity of a model being trained at the moment it is evaluated."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}\n".encode())
        h.update(t.view(torch.uint8).numpy())
    return "state-sha256:" + h.hexdigest()[:16]


@functools.cache
def code_commit() -> str:
    """``git rev-parse HEAD`` of this code, '-dirty' when the tree differs from it (tracked changes or
    new files); 'unknown' without git or outside a checkout. Computed once per process. A copy whose
    ``.git`` is not this code's (the GPU machine's) is named by its caller: DECIMAMBA_COMMIT=<rev>,
    recorded as '<rev> (DECIMAMBA_COMMIT)'."""
    if os.environ.get("DECIMAMBA_COMMIT"):
        return f"{os.environ['DECIMAMBA_COMMIT']} (DECIMAMBA_COMMIT)"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "-C", repo, "status", "--porcelain"], capture_output=True, text=True,
                                timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())
    return head.stdout.strip() + ("-dirty" if dirty else "")
