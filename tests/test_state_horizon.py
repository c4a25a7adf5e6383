"""tools/state_horizon.py: per-channel half-lives h_d = ln2 / (Δ_d · min_n |A_dn|) against closed forms.

A layer with dt_proj.weight = 0 has Δ_t,d = softplus(dt_proj.bias_d) at every token, so its
half-lives are known exactly; A_log_dn = log(a_d · (n + 1)) makes min_n |A_dn| = a_d (and max 4·a_d:
taking the max over n instead of the min fails these tests).
"""
import errno
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import MambaConfig, MambaLMHeadModel
from tests.helpers import files_digest, one_line_stderr, randomize, usage_error_is_one_line

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import state_horizon as sh  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN = 1                                                   # the layer with closed-form half-lives
D_STATE = 4


def _targets(e):
    """Half-lives from 10 to 10⁸ tokens (log-spaced), each far from the 2K / 128K / 1M thresholds."""
    h = np.geomspace(10.0, 1e8, e)
    for t in sh.THRESHOLDS:
        assert np.abs(np.log(h / t)).min() > 0.05
    return h


def _model(vocab_size=61, seed=0):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=vocab_size, ssm_cfg={"d_state": D_STATE},
                      pad_vocab_size_multiple=8)
    model = randomize(MambaLMHeadModel(cfg), seed).eval()
    mx = model.backbone.layers[KNOWN].mixer
    e = mx.d_inner
    a = 0.5 + (torch.arange(e, dtype=torch.float64) % 3)               # min_n |A_dn|: 0.5, 1.5, 2.5, ...
    delta = math.log(2) / (torch.from_numpy(_targets(e)) * a)            # the Δ giving the target half-life
    with torch.no_grad():
        mx.dt_proj.weight.zero_()
        mx.dt_proj.bias.copy_(delta + torch.log(-torch.expm1(-delta)))   # inverse softplus
        mx.A_log.copy_(torch.log(a[:, None] * torch.arange(1, D_STATE + 1, dtype=torch.float64)))
    return model


def _expected(model):
    """Closed form from the stored (fp32) parameters, in float64: ln2 / (softplus(bias) · a)."""
    mx = model.backbone.layers[KNOWN].mixer
    delta = F.softplus(mx.dt_proj.bias.detach().double())
    a = torch.exp(mx.A_log.detach().double()).min(dim=-1).values
    return (math.log(2) / (delta * a)).numpy()


def _windows(n=2, length=40, vocab=61, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


# Tolerance: the tool takes Δ = softplus in fp32 (modules/mamba_mixer.py) and A = −exp(A_log) in fp32;
# each is within a few fp32 ulps (≤ 2⁻²³ ≈ 1.2e-7 relative each) of the float64 closed form, and the
# mean / 1st percentile of a constant fp32 row is that value exactly, so h agrees to ~3e-7 relative.
# rtol 2e-6 leaves margin while a wrong formula (max over n: 4x; a missing ln2: 1.44x) is far outside it.
RTOL = 2e-6


def test_half_lives_match_the_closed_form():
    model = _model()
    layers = sh.measure(model, _windows())
    want = _expected(model)
    for regime in sh.REGIMES:                       # constant Δ: the mean and the 1st percentile agree
        np.testing.assert_allclose(layers[KNOWN]["h"][regime], want, rtol=RTOL)
    np.testing.assert_allclose(layers[KNOWN]["h"]["mean"], _targets(len(want)), rtol=1e-5)   # fp32 bias


def test_fractions_median_and_whole_model():
    model = _model()
    rows, whole = sh.layer_rows(sh.measure(model, _windows()))
    want = _expected(model)
    row = rows[KNOWN]
    for regime in sh.REGIMES:
        s = row[regime]
        assert s["median_half_life"] == pytest.approx(float(np.median(want)), rel=RTOL)
        assert s["max_half_life"] == pytest.approx(float(want.max()), rel=RTOL)
        for t in sh.THRESHOLDS:
            assert s[f"frac_ge_{t}"] == float((want >= t).mean())
    # 10^(1 + 7k/31), k = 0..31: k ≥ 11 is ≥ 2048 (log10 3.31), k ≥ 19 ≥ 131072 (5.12), k ≥ 23 ≥ 1048576 (6.02)
    assert [row["mean"][f"frac_ge_{t}"] for t in sh.THRESHOLDS] == [21 / 32, 13 / 32, 9 / 32]
    # the whole model: both layers have d_inner channels, so its fractions are the layers' mean
    for regime in sh.REGIMES:
        for t in sh.THRESHOLDS:
            key = f"frac_ge_{t}"
            assert whole[regime][key] == pytest.approx(np.mean([r[regime][key] for r in rows]))


def test_recorded_delta_is_the_step_size_of_the_scan():
    """The random layer 0: Δ recomputed here from the mixer's input, written out step by step."""
    model = _model()
    mx = model.backbone.layers[0].mixer
    seen = []
    handle = mx.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    ids = _windows(n=1)
    layers = sh.measure(model, ids)
    handle.remove()
    h = seen[0][0]                                                          # (l, d)
    x = (h @ mx.in_proj.weight.t()).chunk(2, dim=-1)[0]                     # (l, e)
    w = mx.conv1d.weight[:, 0]                                              # (e, k)
    xp = torch.cat([torch.zeros(w.shape[1] - 1, x.shape[1]), x])
    u = F.silu(torch.stack([(xp[t:t + w.shape[1]].t() * w).sum(-1) for t in range(x.shape[0])]) + mx.conv1d.bias)
    dt = (u @ mx.x_proj.weight.t())[:, :mx.dt_rank]
    delta = F.softplus(dt @ mx.dt_proj.weight.t() + mx.dt_proj.bias).double()     # (l, e)
    a = torch.exp(mx.A_log.detach().double()).min(-1).values
    np.testing.assert_allclose(layers[0]["steps"]["mean"], delta.mean(0).detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(layers[0]["h"]["mean"], (math.log(2) / (delta.mean(0) * a)).detach().numpy(),
                               rtol=1e-5)


def test_mean_and_first_percentile_over_tokens():
    delta = np.stack([np.arange(1, 102, dtype=np.float32), np.full(101, 0.25, dtype=np.float32)])
    steps = sh.channel_steps(delta)
    np.testing.assert_allclose(steps["mean"], [51.0, 0.25])
    np.testing.assert_allclose(steps["p1"], [2.0, 0.25])          # linear: index 0.01 · 100 = 1
    h = sh.half_lives(np.array([0.5, 0.0]), np.array([2.0, 1.0]))
    assert h[0] == pytest.approx(math.log(2)) and math.isinf(h[1])


def test_cli_end_to_end(tmp_path, capsys):
    model = _model(vocab_size=50277)
    model.save_pretrained(str(tmp_path / "m"))
    with open(os.path.join(REPO, "data", "wikitext-2-raw", "wiki.valid.raw"), encoding="utf-8") as f:
        (tmp_path / "t.txt").write_text(f.read(4000), encoding="utf-8")
    out = tmp_path / "sub" / "sh.json"
    argv = ["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--tokens", "64", "--windows", "2",
            "--out", str(out)]
    assert sh.main(argv) == 0
    table = capsys.readouterr().out
    assert "ignore regime" in table and table.count("\n") >= 6
    text = out.read_text()
    assert str(tmp_path) not in text and "/tmp/" not in text and REPO not in text
    res = json.loads(text)
    assert res["command"].startswith("python tools/state_horizon.py --model <model> --text <text>")
    assert res["model"] == "<model>" and res["text"]["tokenizer"] == "data/gpt-neox-20b/tokenizer.json"
    assert res["tokens"] == 64 and res["windows"] == 2 and len(res["rows"]) == 2
    assert {"command", "machine", "date", "git", "model_fractions", "model_digest"} <= set(res)
    want = _expected(model)
    assert res["rows"][KNOWN]["mean"]["median_half_life"] == pytest.approx(float(np.median(want)), rel=RTOL)
    assert res["rows"][KNOWN]["p1"]["frac_ge_131072"] == float((want >= 131072).mean())
    assert res["model_digest"] == files_digest(tmp_path / "m")


def _cli(tmp_path, *extra):
    """A tiny model and 4,000 characters of WikiText in tmp_path; the argv of a 2 x 64-token run."""
    if not (tmp_path / "m").exists():
        _model(vocab_size=50277).save_pretrained(str(tmp_path / "m"))
        with open(os.path.join(REPO, "data", "wikitext-2-raw", "wiki.valid.raw"), encoding="utf-8") as f:
            (tmp_path / "t.txt").write_text(f.read(4000), encoding="utf-8")
    return ["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--tokens", "64", "--windows", "2",
            *extra]


def test_existing_out_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "state_horizon.json"
    out.write_text('{"committed": 1}\n')
    assert sh.main(_cli(tmp_path, "--out", str(out))) == 1
    one_line_stderr(capsys, "error:", f"--out {out} already exists", "--overwrite")
    assert out.read_text() == '{"committed": 1}\n'
    assert sorted(os.listdir(tmp_path)) == ["m", "state_horizon.json", "t.txt"]        # no temp file left


def test_overwrite_replaces_out_atomically(tmp_path, capsys):
    out = tmp_path / "state_horizon.json"
    out.write_text('{"committed": 1}\n')
    assert sh.main(_cli(tmp_path, "--out", str(out), "--overwrite")) == 0
    res = json.loads(out.read_text())
    assert res["tokens"] == 64 and len(res["rows"]) == 2 and "--overwrite" in res["command"]
    assert sorted(os.listdir(tmp_path)) == ["m", "state_horizon.json", "t.txt"]
    assert f"wrote {out}" in capsys.readouterr().out


def test_out_created_during_the_run_is_kept_and_so_is_the_run(tmp_path, capsys):
    """--out appears after the start-up check (another run): neither file is lost; the error names both."""
    out = tmp_path / "sh.json"
    out.write_text("theirs\n")
    with pytest.raises(FileExistsError) as exc:
        sh.write_json(str(out), {"rows": [1, 2], "h": math.inf}, overwrite=False)
    assert out.read_text() == "theirs\n"
    kept = [n for n in os.listdir(tmp_path) if n != "sh.json"]
    assert len(kept) == 1 and str(tmp_path / kept[0]) in str(exc.value) and str(out) in str(exc.value)
    assert json.loads((tmp_path / kept[0]).read_text()) == {"rows": [1, 2], "h": None}    # JSON has no inf


def test_a_failed_write_keeps_the_previous_out(tmp_path, monkeypatch):
    out = tmp_path / "sh.json"
    out.write_text("previous\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as exc:
        sh.write_json(str(out), {"rows": [1]}, overwrite=True)
    assert str(exc.value).startswith(f"no space left on device: {out}")
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) == ["sh.json"]


def test_token_id_beyond_the_vocabulary_is_one_line_naming_it(tmp_path, capsys):
    model = _model(vocab_size=61)                           # padded to 64 embedding rows: ids 0..63
    sh.check_vocab(model, np.array([0, 63, 5]), "--text t")             # the last row: accepted
    with pytest.raises(ValueError) as exc:
        sh.check_vocab(model, np.array([0, 64, 5]), "--text t")
    assert "--text t" in str(exc.value) and "token id 64" in str(exc.value) and "64 embeddings" in str(exc.value)
    # end to end: WikiText through GPT-NeoX ids (up to 50276) into a 64-row model
    model.save_pretrained(str(tmp_path / "small"))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(os.path.join(REPO, "data", "gpt-neox-20b", "tokenizer.json")).encode(
        text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    assert sh.main(["--model", str(tmp_path / "small"), "--text", str(text), "--tokens", "16"]) == 1
    one_line_stderr(capsys, "error:", f"--text {text}", f"token id {max(ids)}", "64 embeddings", "ids 0..63")


def test_missing_model_folder_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_model_here"
    assert sh.main(["--model", str(missing), "--text", "data/wikitext-2-raw/wiki.valid.raw"]) == 1
    one_line_stderr(capsys, "error:", str(missing))


@pytest.mark.parametrize("opt,value", [("--tokens", "abc"), ("--windows", "0"), ("--tokens", "-5")])
def test_bad_number_is_one_line(opt, value, capsys):
    usage_error_is_one_line(sh.main, ["--model", "m", "--text", "t", opt, value], capsys, "error:", opt, value)


def test_text_shorter_than_a_window_is_one_line(tmp_path, capsys):
    _model(vocab_size=50277).save_pretrained(str(tmp_path / "m"))
    (tmp_path / "t.txt").write_text("a few words only", encoding="utf-8")
    assert sh.main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt")]) == 1
    one_line_stderr(capsys, "error:", "--tokens 2048")
