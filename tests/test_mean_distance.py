"""tools/mean_distance.py end to end on a tiny random model: its JSON names no machine path, records
the model's digest, and its first_global_layer is its own rule applied to its own mean distances."""
import errno
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest

from custom_datasets.tokenize_corpus import main as tokenize_main
from engine import results
from models import MambaConfig, MambaLMHeadModel
from tests.helpers import files_digest, one_line_stderr, randomize, usage_error_is_one_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import mean_distance as md  # noqa: E402

BOOK = "It was a dark and stormy night; the rain fell in torrents. " * 20
GLOBAL_FRAC = 0.6


@pytest.fixture()
def corpus(tmp_path):
    data = BOOK.encode()
    with tarfile.open(tmp_path / "validation.tar.xz", "w:xz") as tar:
        info = tarfile.TarInfo("validation/101.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "corpus"
    assert tokenize_main(["--split", "validation", "--out", str(out), str(tmp_path / "validation.tar.xz")]) == 0
    return out


def _argv(tmp_path, corpus, out, *extra):
    """A tiny 2-layer model in tmp_path/m and the argv of a 1 x 48-token run writing ``out``."""
    if not (tmp_path / "m").exists():
        cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=50277, ssm_cfg={"d_state": 4}, pad_vocab_size_multiple=8)
        randomize(MambaLMHeadModel(cfg), seed=3).save_pretrained(str(tmp_path / "m"))
    return ["--model", str(tmp_path / "m"), "--corpus", str(corpus), "--tokens", "48", "--windows", "1",
            "--channels", "2", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture()
def named_commit(monkeypatch):
    """code_commit is computed once per process: clear it around a test that names the commit."""
    monkeypatch.setenv("DECIMAMBA_COMMIT", "abc1234")
    results.code_commit.cache_clear()
    yield "abc1234 (DECIMAMBA_COMMIT)"
    results.code_commit.cache_clear()


def test_json_is_public_and_self_consistent(tmp_path, corpus, named_commit):
    cfg = MambaConfig(d_model=16, n_layer=4, vocab_size=50277, ssm_cfg={"d_state": 4}, pad_vocab_size_multiple=8)
    randomize(MambaLMHeadModel(cfg), seed=13).save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "md.json"
    argv = [f"--model={tmp_path / 'm'}", "--corpus", str(corpus), "--tokens", "48", "--windows", "2",
            "--channels", "4", "--global-frac", str(GLOBAL_FRAC), "--device", "cpu", "--out", str(out)]
    assert md.main(argv) == 0
    text = out.read_text()
    assert str(tmp_path) not in text
    res = json.loads(text)
    assert res["command"] == ("python tools/mean_distance.py --model=<model> --corpus <corpus> --tokens 48 "
                              f"--windows 2 --channels 4 --global-frac {GLOBAL_FRAC} --device cpu --out <out>")
    assert res["model"] == "<model>"
    assert res["model_digest"] == files_digest(tmp_path / "m")
    assert res["commit"] == named_commit and res["machine"]
    dist = np.array(res["mean_distance"])
    assert len(dist) == 4 and len(res["per_window"]) == 2
    first = int(np.argmax(dist >= GLOBAL_FRAC * dist.max()))
    assert res["first_global_layer"] == first
    # seed 13's layers reach about 0.48, 0.74, 0.60 and 1 of the largest: the rule picks layer 1, neither
    # layer 0 nor the largest layer, so a tool that wrote either would fail here
    assert 0 < first < int(np.argmax(dist))
    assert {"tokens", "windows", "channels", "global_frac", "mean_distance", "per_window",
            "first_global_layer"} <= set(res)


def test_missing_model_folder_is_one_line_naming_it(tmp_path, corpus, capsys):
    missing = tmp_path / "no_model_here"
    assert md.main(["--model", str(missing), "--corpus", str(corpus), "--device", "cpu"]) == 1
    one_line_stderr(capsys, "error:", "--model", str(missing))


def test_corpus_without_the_split_is_one_line_naming_it(tmp_path, corpus, capsys):
    (tmp_path / "m").mkdir()
    assert md.main(["--model", str(tmp_path / "m"), "--corpus", str(corpus), "--split", "test",
                    "--device", "cpu"]) == 1
    one_line_stderr(capsys, "error:", str(corpus), "--split test", "splits there: validation")


def test_missing_corpus_folder_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    missing = tmp_path / "no_corpus_here"
    assert md.main(["--model", str(tmp_path / "m"), "--corpus", str(missing), "--device", "cpu"]) == 1
    one_line_stderr(capsys, "error:", "--corpus", str(missing))


@pytest.mark.parametrize("opt,value", [("--windows", "0"), ("--tokens", "abc"), ("--channels", "-3")])
def test_bad_number_is_one_line(opt, value, capsys):
    usage_error_is_one_line(md.main, ["--model", "m", "--corpus", "c", opt, value], capsys, "error:", opt, value)


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_global_frac_outside_0_1_is_one_line(tmp_path, value, capsys):
    assert md.main(["--model", str(tmp_path), "--corpus", str(tmp_path), "--global-frac", value]) == 1
    one_line_stderr(capsys, "error:", "--global-frac", value, "(0, 1]")


def test_corpus_shorter_than_a_window_is_one_line(tmp_path, corpus, capsys):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=50277, ssm_cfg={"d_state": 4}, pad_vocab_size_multiple=8)
    MambaLMHeadModel(cfg).save_pretrained(str(tmp_path / "m"))
    assert md.main(["--model", str(tmp_path / "m"), "--corpus", str(corpus), "--tokens", "100000",
                    "--device", "cpu"]) == 1
    one_line_stderr(capsys, "error:", "--tokens 100000")


def test_corpus_of_another_vocabulary_is_one_line(tmp_path, corpus, capsys):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=61, ssm_cfg={"d_state": 4}, pad_vocab_size_multiple=8)
    MambaLMHeadModel(cfg).save_pretrained(str(tmp_path / "m"))
    assert md.main(["--model", str(tmp_path / "m"), "--corpus", str(corpus), "--tokens", "48",
                    "--device", "cpu"]) == 1
    one_line_stderr(capsys, "error:", str(corpus), "64 embeddings")


def test_existing_out_is_refused_before_any_work(tmp_path, corpus, capsys):
    out = tmp_path / "mean_distance.json"
    out.write_text('{"committed": 1}')
    (tmp_path / "empty_model").mkdir()                  # would fail at loading: the --out check comes first
    argv = _argv(tmp_path, corpus, out)
    argv[1] = str(tmp_path / "empty_model")
    assert md.main(argv) == 1
    one_line_stderr(capsys, "error:", f"--out {out} already exists", "--overwrite")
    assert out.read_text() == '{"committed": 1}'


def test_overwrite_replaces_out(tmp_path, corpus):
    out = tmp_path / "res" / "mean_distance.json"
    out.parent.mkdir()
    out.write_text('{"committed": 1}')
    assert md.main(_argv(tmp_path, corpus, out, "--overwrite")) == 0
    res = json.loads(out.read_text())
    assert len(res["mean_distance"]) == 2 and res["first_global_layer"] in (0, 1)
    assert os.listdir(out.parent) == ["mean_distance.json"]                  # no temp file left


def test_a_failed_write_keeps_the_previous_out(tmp_path, corpus, capsys, monkeypatch):
    """A full disk while --out is written (--overwrite): the previous file is whole, no temp file is left."""
    out = tmp_path / "res" / "mean_distance.json"
    out.parent.mkdir()
    out.write_text('{"committed": 1}')
    real_fsync = os.fsync

    def fsync(fd):                                      # fails only for files in out's folder
        if os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")) == str(out.parent):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to tell which file is synced")
    monkeypatch.setattr(os, "fsync", fsync)
    assert md.main(_argv(tmp_path, corpus, out, "--overwrite")) == 1
    one_line_stderr(capsys, "error:", f"no space left on device: {out}")
    assert out.read_text() == '{"committed": 1}' and os.listdir(out.parent) == ["mean_distance.json"]


def test_mamba2_model_mean_distance_per_head(tmp_path, corpus):
    """A Mamba-2 model: the tool maps heads, and each layer's value equals the mean distance computed here
    from the recorded Δ, A, B, C with the map written out densely in float64 (α_h[i, j] = (C_i · B_j) ·
    exp(A_h (S_i − S_j)) · Δ_j, one head of each group's B and C), rows of the second half."""
    import torch

    from custom_datasets.lm_corpus import split_tokens, window_starts

    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50277, pad_vocab_size_multiple=8,
                      ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 16})
    model = randomize(MambaLMHeadModel(cfg), seed=4).eval()
    model.save_pretrained(str(tmp_path / "m"))
    out = tmp_path / "md.json"
    assert md.main(["--model", str(tmp_path / "m"), "--corpus", str(corpus), "--tokens", "40", "--windows", "1",
                    "--channels", "3", "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["channel_unit"] == "head" and res["channels"] == [0, 2, 3]     # 4 heads (64 / 16), 3 spread
    toks = split_tokens(str(corpus), "validation")
    s = window_starts(len(toks), 40, 1)[0]
    with torch.no_grad():
        rec = model(torch.from_numpy(toks[s:s + 40].astype("int64"))[None], num_last_tokens=1, record=True).debug_params
    want = []
    for layer in rec:
        delta, A = layer["delta"][0].double(), layer["A"].double()             # (h, l), (h,)
        B, C = layer["B"][0].double(), layer["C"][0].double()                  # (g, n, l)
        S = torch.cumsum(delta, -1)
        dist = (torch.arange(40.0)[:, None] - torch.arange(40.0)[None, :]).clamp_min(0).double()
        per_head = []
        for h in res["channels"]:
            g = h // 2                                                          # 4 heads in 2 groups
            gap = (S[h][:, None] - S[h][None, :]).clamp_min(0)
            att = ((C[g].T @ B[g]) * torch.exp(A[h] * gap) * delta[h][None, :]).tril().abs()
            p = att / att.sum(-1, keepdim=True)
            per_head.append((p * dist).sum(-1)[20:])
        want.append(float(torch.stack(per_head).mean()))
    # fp32 maps in the tool against this float64 one: 1e-4 relative; the tool rounds to 0.01 (abs 0.006)
    assert res["mean_distance"] == pytest.approx([round(w, 2) for w in want], rel=1e-4, abs=0.006)
