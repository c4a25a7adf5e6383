"""tools/export_checkpoint.py: a destination is new, empty, or replaced whole with --overwrite (checkpoint
files of the old model removed, other files kept); bad arguments are one line."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from models import MambaLMHeadModel
from tests.helpers import one_line_stderr, randomize, tiny_config
from tools.export_checkpoint import main as export

OLD = {"config.json": '{"d_model": 8}', "model.safetensors": "old weights", "finetune_ssm_config.json": '{"v": 1}',
       "tokenizer.json": "{}", "pytorch_model.bin": "old bin", "training_state.json": "{}", "README.md": "notes\n"}


@pytest.fixture()
def src(tmp_path):
    model = randomize(MambaLMHeadModel(tiny_config(n_layer=2, d_model=16)), seed=4)
    model.save_pretrained(str(tmp_path / "src"))
    return tmp_path / "src", model.state_dict()


def _old_checkpoint(folder):
    folder.mkdir()
    for name, text in OLD.items():
        (folder / name).write_text(text)


def _files(folder):
    return {n: (folder / n).read_bytes() for n in sorted(os.listdir(folder))}


def _is_the_export(dest, src_dir, state):
    """dest's weights are src's, bf16 but A_log, D and dt_proj.bias (float32), and its config is src's."""
    assert json.loads((dest / "config.json").read_text()) == json.loads((src_dir / "config.json").read_text())
    out = load_file(dest / "model.safetensors")
    assert set(out) == set(load_file(src_dir / "model.safetensors"))
    for k, v in out.items():
        want = state[k] if k.endswith((".A_log", ".D", ".dt_proj.bias")) else state[k].to(torch.bfloat16)
        assert v.dtype == want.dtype and torch.equal(v, want), k


def test_into_a_new_folder(tmp_path, src, capsys):
    assert export([str(src[0]), str(tmp_path / "a" / "dest")]) == 0
    assert sorted(os.listdir(tmp_path / "a" / "dest")) == ["config.json", "model.safetensors"]
    _is_the_export(tmp_path / "a" / "dest", *src)
    assert os.listdir(tmp_path / "a") == ["dest"]                       # no temp folder left
    assert "bfloat16" in capsys.readouterr().out


def test_non_empty_destination_is_refused_and_untouched(tmp_path, src, capsys):
    _old_checkpoint(tmp_path / "dest")
    before = _files(tmp_path / "dest")
    assert export([str(src[0]), str(tmp_path / "dest")]) == 1
    one_line_stderr(capsys, "error:", f"{tmp_path / 'dest'}: not empty", "--overwrite")
    assert _files(tmp_path / "dest") == before


def test_overwrite_leaves_a_consistent_checkpoint(tmp_path, src, capsys):
    """The old model's config, weights (both formats), run config, tokenizer and training state go; the
    README stays; from_pretrained loads exactly the export."""
    dest = tmp_path / "dest"
    _old_checkpoint(dest)
    assert export([str(src[0]), str(dest), "--overwrite"]) == 0
    assert sorted(os.listdir(dest)) == ["README.md", "config.json", "model.safetensors"]
    assert (dest / "README.md").read_text() == "notes\n"
    _is_the_export(dest, *src)
    assert "kept README.md" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["dest", "src"]                 # no temp or old folder left
    loaded = MambaLMHeadModel.from_pretrained(str(dest)).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in load_file(dest / "model.safetensors").items())


@pytest.mark.parametrize("when", ["writing", "swapping"])
def test_a_failed_export_keeps_the_old_checkpoint(tmp_path, src, monkeypatch, when):
    dest = tmp_path / "dest"
    _old_checkpoint(dest)
    before = _files(dest)
    if when == "writing":
        def half_written(self, folder, format=None):
            with open(os.path.join(folder, "model.safetensors"), "w") as f:
                f.write("half")
            raise OSError("write failed")

        monkeypatch.setattr(MambaLMHeadModel, "save_pretrained", half_written)
    else:                       # the old folder is moved aside, then the new one cannot be renamed in
        real_replace = os.replace

        def replace(a, b):
            if os.path.basename(a).startswith(".tmp_dest."):
                raise OSError("rename failed")
            return real_replace(a, b)

        monkeypatch.setattr(os, "replace", replace)
    assert export([str(src[0]), str(dest), "--overwrite"]) == 1
    assert _files(dest) == before and sorted(os.listdir(tmp_path)) == ["dest", "src"]


@pytest.mark.parametrize("case", ["source itself", "folder of folders", "a file"])
def test_overwrite_refuses_what_is_not_a_checkpoint_folder(tmp_path, src, capsys, case):
    dest = {"source itself": src[0], "folder of folders": tmp_path, "a file": src[0] / "config.json"}[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert export([str(src[0]), str(dest), "--overwrite"]) == 1
    needle = {"source itself": "is the source checkpoint", "folder of folders": "holds folders (src)",
              "a file": "not a folder"}[case]
    one_line_stderr(capsys, "error:", str(dest), needle)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_missing_source_is_one_line_naming_it(tmp_path, capsys):
    assert export([str(tmp_path / "nonexistent"), str(tmp_path / "dest")]) == 1
    one_line_stderr(capsys, "error:", str(tmp_path / "nonexistent"))
    assert os.listdir(tmp_path) == []


def test_bad_dtype_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export([str(tmp_path), str(tmp_path / "d"), "--dtype", "int8"])
    assert exc.value.code == 2
    one_line_stderr(capsys, "error:", "--dtype", "int8", "bfloat16")


def test_mamba2_keeps_its_decay_and_step_bias_in_fp32(tmp_path, capsys):
    # Mamba-2's Δ bias is dt_bias (Mamba-1's dt_proj.bias): A_log, D and dt_bias stay float32, the rest bf16
    model = randomize(MambaLMHeadModel(tiny_config(n_layer=2, d_model=32, ssm_cfg={"layer": "Mamba2", "d_state": 16,
                                                                                   "headdim": 16})), seed=5)
    model.save_pretrained(str(tmp_path / "m2"))
    assert export([str(tmp_path / "m2"), str(tmp_path / "out")]) == 0
    state, out = model.state_dict(), load_file(tmp_path / "out" / "model.safetensors")
    assert {k.rsplit(".", 1)[1] for k in out if k.startswith("backbone.layers.0.mixer.")} >= {"A_log", "D", "dt_bias"}
    for k, v in out.items():
        want = state[k] if k.rsplit(".", 1)[1] in ("A_log", "D", "dt_bias") else state[k].to(torch.bfloat16)
        assert v.dtype == want.dtype and torch.equal(v, want), k
