"""tools/provenance.py: paths and command lines as results files show them (no machine paths)."""
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
