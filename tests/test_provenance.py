"""Provenance: tools/provenance.py (paths and command lines as results files show them, no machine paths)
and engine/results.py (what ties a recorded cell to what produced it, and when it is reused)."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tools.provenance import public_command, public_path  # noqa: E402

OPTIONS = {"--model": "<model>", "--corpus": "<corpus>", "--out": "<out>"}


def test_public_path_inside_the_repository_is_relative():
    assert public_path(os.path.join(REPO, "data", "wikitext-2-raw", "wiki.valid.raw"), "<text>") == \
        os.path.join("data", "wikitext-2-raw", "wiki.valid.raw")
    assert public_path(REPO, "<model>") == "."
    assert public_path(os.path.join(REPO, "tools", "..", "checkpoints", "x"), "<model>") == \
        os.path.join("checkpoints", "x")
    assert public_path(None, "<model>") is None


def test_public_path_outside_the_repository_is_the_placeholder(tmp_path, monkeypatch):
    assert public_path(str(tmp_path / "m"), "<model>") == "<model>"
    assert public_path(REPO + "_sibling" + os.sep + "m", "<model>") == "<model>"   # shares the prefix only
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.bin").write_bytes(b"")
    assert public_path("local.bin", "<model>") == "<model>"                        # relative, on disk
    assert public_path(os.path.join("..", "elsewhere", "m"), "<model>") == "<model>"
    assert public_path("mamba-130m", "<model>") == "mamba-130m"                      # no path: a name


def test_public_command_both_option_forms(tmp_path):
    argv = ["--model", str(tmp_path / "m"), f"--corpus={tmp_path / 'c'}", "--split=validation",
            "--out", os.path.join(REPO, "benchmarks", "results", "md.json"), f"--out={tmp_path / 'o.json'}",
            "--tokens", "64"]
    got = public_command("tools/mean_distance.py", argv, OPTIONS)
    assert got == ("python tools/mean_distance.py --model <model> --corpus=<corpus> --split=validation "
                   f"--out {os.path.join('benchmarks', 'results', 'md.json')} --out=<out> --tokens 64")
    assert str(tmp_path) not in got


def test_public_command_leaves_other_options_alone(tmp_path):
    argv = ["--tokenizer", str(tmp_path / "t.json"), "--model"]          # not a path option; a trailing flag
    assert public_command("tools/x.py", argv, OPTIONS) == f"python tools/x.py --tokenizer {tmp_path / 't.json'} --model"


# ---------------------------------------------------------------------------- engine/results.py
# The reuse key the module promises, written out here (not read from results.IDENTITY, so that a key
# dropped there is caught): a cell is reused only when every one of these is the same.
REUSE_KEY = ("task", "task_version", "checkpoint", "weights", "config_hash", "backend", "dtype", "device", "step")


def _store(tmp_path):
    from engine.results import ResultsStore

    return ResultsStore(str(tmp_path / "results.jsonl"))


def test_a_cell_is_reused_only_when_every_identity_field_matches(tmp_path):
    store = _store(tmp_path)
    ident = {k: f"{k}-0" for k in REUSE_KEY}
    store.append({**ident, "ctx_len": 1, "score": 1.0})
    assert list(store.done(ident, ("ctx_len",))) == [(1,)]
    for k in REUSE_KEY:
        assert store.done({**ident, k: f"{k}-1"}, ("ctx_len",)) == {}, k


def test_a_record_lacking_an_identity_field_is_not_reused(tmp_path):
    # e.g. a record written before a field joined the key: it cannot be shown to match, so it is not reused
    ident = {k: f"{k}-0" for k in REUSE_KEY}
    for k in REUSE_KEY:
        store = _store(tmp_path / k)
        store.append({**{f: v for f, v in ident.items() if f != k}, "ctx_len": 1, "score": 1.0})
        assert store.done(ident, ("ctx_len",)) == {}, k


def test_the_later_record_of_a_cell_wins(tmp_path):
    # --fresh-eval appends new records beside the old ones: the newest is the cell's result
    store = _store(tmp_path)
    ident = {k: "x" for k in REUSE_KEY}
    for score in (1.0, 2.0, 3.0):
        store.append({**ident, "ctx_len": 1, "score": score})
    assert store.done(ident, ("ctx_len",))[(1,)]["score"] == 3.0


def test_a_line_cut_by_a_crash_loses_no_record_after_it(tmp_path):
    # a crash cuts the last line; the rerun appends after it, so the cut line ends up mid-file
    store = _store(tmp_path)
    ident = {k: "x" for k in REUSE_KEY}
    store.append({**ident, "ctx_len": 1, "score": 1.0})
    with open(store.path, "a") as f:
        f.write('{"task": "x", "ctx_len": 2, "sco')
        f.write("\n")
    store.append({**ident, "ctx_len": 3, "score": 3.0})
    assert [r["ctx_len"] for r in store.records()] == [1, 3]
    assert sorted(store.done(ident, ("ctx_len",))) == [(1,), (3,)]


def test_file_digest_tells_apart_files_of_equal_size_and_mtime(tmp_path, monkeypatch):
    # two checkpoints copied with their times kept (cp -p, rsync -t) and of equal size must not share a digest
    import hashlib

    from engine import results

    monkeypatch.setattr(results, "_MEMO", {})
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    os.utime(a, ns=(10**18, 10**18))
    os.utime(b, ns=(10**18, 10**18))
    assert results.file_digest(str(a)) == hashlib.sha256(b"a" * 100).hexdigest()
    assert results.file_digest(str(b)) == hashlib.sha256(b"b" * 100).hexdigest()
    b.write_bytes(b"b" * 101)                                  # rewritten, its mtime set back: the size tells
    os.utime(b, ns=(10**18, 10**18))
    assert results.file_digest(str(b)) == hashlib.sha256(b"b" * 101).hexdigest()


def test_sharded_checkpoint_digest_covers_every_shard(tmp_path, monkeypatch):
    # the digest of a sharded checkpoint, written out by hand: sha256 over "name:sha256(bytes)" lines of
    # config.json, the index, then its shards in sorted order; first 16 hex digits
    import hashlib
    import json

    from engine import results

    monkeypatch.setattr(results, "_MEMO", {})
    (tmp_path / "config.json").write_text('{"d_model": 8}')
    shards = {"model-00002-of-00002.safetensors": b"two", "model-00001-of-00002.safetensors": b"one"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                        "c": "model-00002-of-00002.safetensors"}}))
    for name, data in shards.items():
        (tmp_path / name).write_bytes(data)

    def by_hand():
        h = hashlib.sha256()
        for name in ["config.json", "model.safetensors.index.json", *sorted(shards)]:
            h.update(f"{name}:{hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}\n".encode())
        return "files-sha256:" + h.hexdigest()[:16]

    before = results.weights_digest(str(tmp_path))
    assert before == by_hand()
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"TWO")     # one shard's weights change
    after = results.weights_digest(str(tmp_path))
    assert after == by_hand() and after != before


def test_code_commit_marks_a_changed_tree_dirty(monkeypatch):
    # git's answers stubbed: HEAD is abc; `status --porcelain` lists a change or nothing
    import subprocess

    from engine import results

    monkeypatch.delenv("DECIMAMBA_COMMIT", raising=False)
    status = {"out": " M modules/decimation.py\n"}

    def fake_run(cmd, **kw):
        out = "abc\n" if "rev-parse" in cmd else status["out"]
        return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

    monkeypatch.setattr(results.subprocess, "run", fake_run)
    assert results.code_commit.__wrapped__() == "abc-dirty"
    status["out"] = "?? new_file.py\n"                                      # an untracked file counts too
    assert results.code_commit.__wrapped__() == "abc-dirty"
    status["out"] = ""
    assert results.code_commit.__wrapped__() == "abc"
