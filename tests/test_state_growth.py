"""tools/state_growth.py: states read after streaming match one-shot prefills, and growth is measured.

Two layers with constant step sizes (dt_proj.weight = 0): layer 0 forgets within a token (Δ = 1,
|A| = 1..4), so its state is stationary and its ratios stay near 1; layer 1 never forgets over the
window (Δ = 1e-4, |A| ≈ 1e-4: decay e^-1e-8 a token), so its state sums every token written and grows.
"""
import json
import os
import sys

import pytest
import torch

from models import MambaConfig, MambaLMHeadModel
from tests.helpers import files_digest, one_line_stderr, randomize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import state_growth as sg  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# chunked and one-shot scans sum in different orders: fp32 rounding, 1e-5 relative
REL = 1e-5


def _one_shot(model, windows, points):
    """{p: [(max|h|, rms h) per layer, each the mean over windows]} from one fresh prefill of p tokens each,
    read from the caches directly (not through state_growth.measure / layer_rows)."""
    out = {}
    for p in points:
        per = []
        for ids in windows:
            caches = model.allocate_inference_cache()
            with torch.no_grad():
                model(ids[:, :p], num_last_tokens=1, caches=caches)
            per.append([(c.ssm_state.abs().max().item(), c.ssm_state.pow(2).mean().sqrt().item()) for c in caches])
        out[p] = [tuple(sum(w[i][k] for w in per) / len(per) for k in (0, 1)) for i in range(len(per[0]))]
    return out


def _assert_rows(rows, want, train_len, lengths):
    """Every max_abs / rms value and ratio of layer_rows against want ({p: [(max|h|, rms) per layer]})."""
    for i, row in enumerate(rows):
        for k, name in ((0, "max_abs"), (1, "rms")):
            for p in [train_len, *lengths]:
                assert row[name][str(p)] == pytest.approx(want[p][i][k], rel=REL), (i, name, p)
            for p in lengths:      # a ratio of two values each within REL: within 2 REL
                assert row[f"{name}_ratio"][str(p)] == pytest.approx(want[p][i][k] / want[train_len][i][k],
                                                                   rel=2 * REL), (i, name, p)


def _model(vocab_size=61):
    model = randomize(MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=vocab_size,
                                                   ssm_cfg={"d_state": 4}, pad_vocab_size_multiple=8)), 0).eval()
    with torch.no_grad():
        for layer, delta, a in ((0, 1.0, 1.0), (1, 1e-4, 1e-4)):
            mx = model.backbone.layers[layer].mixer
            mx.dt_proj.weight.zero_()
            d = torch.tensor(delta, dtype=torch.float64)
            mx.dt_proj.bias.fill_(float(d + torch.log(-torch.expm1(-d))))          # inverse softplus
            mx.A_log.copy_(torch.log(a * torch.arange(1, 5, dtype=torch.float32)).expand_as(mx.A_log))
    return model


def test_streamed_states_equal_one_shot_prefills():
    model = _model()
    ids = torch.randint(0, 61, (1, 256), generator=torch.Generator().manual_seed(1))
    got = sg.measure(model, ids, [64, 128, 256], chunk=32)
    for p in (64, 128, 256):
        caches = model.allocate_inference_cache()
        with torch.no_grad():
            model(ids[:, :p], num_last_tokens=1, caches=caches)         # one shot, a fresh cache
        for (mx, rms), c in zip(got[p], caches):
            assert mx == pytest.approx(c.ssm_state.abs().max().item(), rel=REL)
            assert rms == pytest.approx(c.ssm_state.pow(2).mean().sqrt().item(), rel=REL)


def test_a_state_that_never_forgets_grows_and_one_that_forgets_does_not():
    model = _model()
    g = torch.Generator().manual_seed(2)
    per_window = [sg.measure(model, torch.randint(0, 61, (1, 512), generator=g), [128, 512], chunk=64)
                  for _ in range(8)]
    rows = sg.layer_rows(per_window, 128, [512])
    # the means over windows, taken here from measure's (max|h|, rms) pairs (checked against one-shot prefills
    # above); the CLI test below checks against one-shot prefills directly
    want = {p: [tuple(sum(w[p][i][k] for w in per_window) / 8 for k in (0, 1)) for i in range(2)] for p in (128, 512)}
    _assert_rows(rows, want, 128, [512])
    # max|h| is far above the RMS at every point and layer (and its ratio differs from the RMS's by ~2%,
    # 1000x REL), so a row that swapped the two would fail above
    assert all(mx > 1.5 * rms for p in want for mx, rms in want[p])
    assert abs(rows[1]["max_abs_ratio"]["512"] / rows[1]["rms_ratio"]["512"] - 1) > 1000 * REL
    fast, slow = rows[0]["rms_ratio"]["512"], rows[1]["rms_ratio"]["512"]
    # fast: the last token's write only, so the ratio is 1 up to which tokens ended the windows (seeds 0-5 of 8
    # windows: 0.86-1.38); slow: 4x the tokens summed, terms of a common sign here, so about 4 (3.89-4.13)
    assert 0.6 < fast < 1.7
    assert 3.0 < slow < 4.5
    assert set(rows[1]["max_abs_ratio"]) == {"512"}


def test_cli_end_to_end(tmp_path, capsys):
    sg_model = _model(vocab_size=50277)
    sg_model.save_pretrained(str(tmp_path / "m"))
    with open(os.path.join(REPO, "data", "wikitext-2-raw", "wiki.valid.raw"), encoding="utf-8") as f:
        (tmp_path / "t.txt").write_text(f.read(20000), encoding="utf-8")
    out = tmp_path / "g.json"
    argv = ["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--train-len", "128",
            "--lengths", "512", "1024", "--chunk", "128", "--windows", "2", "--out", str(out)]
    assert sg.main(argv) == 0
    assert "training length (128)" in capsys.readouterr().out
    text = out.read_text()
    assert str(tmp_path) not in text and REPO not in text
    res = json.loads(text)
    assert res["command"].startswith("python tools/state_growth.py --model <model> --text <text>")
    assert res["lengths"] == [512, 1024] and len(res["rows"]) == 2
    assert res["model_digest"] == files_digest(tmp_path / "m")
    assert res["rows"][1]["rms_ratio"]["1024"] > res["rows"][1]["rms_ratio"]["512"] > 1.3
    # the windows it names, tokenized here with the tokenizers library (no special tokens, as the tool says)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(REPO, res["text"]["tokenizer"]))
    ids = torch.tensor(tok.encode((tmp_path / "t.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids)
    windows = [ids[s:s + 1024][None] for s in res["window_starts"]]
    assert len(windows) == 2 and all(w.shape == (1, 1024) for w in windows)
    _assert_rows(res["rows"], _one_shot(sg_model, windows, [128, 512, 1024]), 128, [512, 1024])


@pytest.mark.parametrize("extra,needle", [(["--lengths", "500"], "not multiples of --chunk"),
                                          (["--lengths", "128"], "must exceed --train-len")])
def test_bad_lengths_are_one_line(tmp_path, capsys, extra, needle):
    _model(vocab_size=50277).save_pretrained(str(tmp_path / "m"))
    argv = ["--model", str(tmp_path / "m"), "--text", "data/wikitext-2-raw/wiki.valid.raw", "--train-len", "128",
            "--chunk", "64", *extra]
    assert sg.main(argv) == 1
    one_line_stderr(capsys, "error:", needle)


def test_existing_out_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "state_growth.json"
    out.write_text('{"committed": 1}\n')
    argv = ["--model", str(tmp_path / "no_model"), "--text", "data/wikitext-2-raw/wiki.valid.raw",
            "--train-len", "128", "--lengths", "512", "--chunk", "128", "--out", str(out)]
    assert sg.main(argv) == 1                     # the --out check comes first: the missing model is not reached
    one_line_stderr(capsys, "error:", str(out), "already exists", "--overwrite")
    assert out.read_text() == '{"committed": 1}\n' and os.listdir(tmp_path) == ["state_growth.json"]


def test_mamba2_model_is_measured_and_state_horizon_still_refuses_it(tmp_path, capsys):
    """A Mamba-2 model's cache holds (b, nheads, headdim, d_state) states: state_growth reads them (the rows
    equal one-shot prefills' states), while state_horizon, which needs per-channel A, refuses the model."""
    import state_horizon as sh

    model = randomize(MambaLMHeadModel(MambaConfig(
        d_model=32, n_layer=2, vocab_size=50277, pad_vocab_size_multiple=8,
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 32})), 0).eval()
    model.save_pretrained(str(tmp_path / "m"))
    with open(os.path.join(REPO, "data", "wikitext-2-raw", "wiki.valid.raw"), encoding="utf-8") as f:
        (tmp_path / "t.txt").write_text(f.read(8000), encoding="utf-8")
    out = tmp_path / "g.json"
    argv = ["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--train-len", "64",
            "--lengths", "256", "--chunk", "64", "--windows", "2", "--out", str(out)]
    assert sg.main(argv) == 0
    res = json.loads(out.read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(REPO, res["text"]["tokenizer"]))
    ids = torch.tensor(tok.encode((tmp_path / "t.txt").read_text(encoding="utf-8"), add_special_tokens=False).ids)
    windows = [ids[s:s + 256][None] for s in res["window_starts"]]
    want = _one_shot(model, windows, [64, 256])
    caches = model.allocate_inference_cache()
    with torch.no_grad():
        model(windows[0][:, :64], num_last_tokens=1, caches=caches)
    assert caches[0].ssm_state.shape == (1, 4, 16, 8)     # (b, nheads = 64 / 16, headdim, d_state): Mamba-2's
    _assert_rows(res["rows"], want, 64, [256])
    capsys.readouterr()
    assert sh.main(["--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt")]) == 1
    one_line_stderr(capsys, "error:", "a Mamba2 model", "Mamba-1")
