"""Hostile, damaged and unwritable files: resume runs no code, bad files give one line, a full disk
keeps the last good checkpoint, an interrupted swap is undone, exports keep the SSM's fp32 tensors."""
import errno
import io
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import finetune_ssm
from custom_datasets.sources import BUNDLED_TOKENIZER, Tokenizer
from custom_datasets.squad_retrieve import load_squad_rows
from engine import checkpoint as ckpt
from engine.errors import BadFileError, DiskFullError, is_disk_full, read_json
from engine.optim import make_scheduler
from engine.results import write_json_atomic
from models import DecimatingMambaModel, MambaConfig, MambaLMHeadModel
from tests.helpers import randomize, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What safetensors and tokenizers raise when a write hits a full filesystem (seen on a 64 KiB tmpfs).
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TOKENIZERS_FULL = "No space left on device (os error 28)"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED_TOKENIZER)


def _model(seed=0):
    return randomize(DecimatingMambaModel(tiny_config(vocab_size=50277, d_model=16, n_layer=2)), seed)


def _trained_state(model, steps=3):
    """A real AdamW + LambdaLR state after a few steps, and the training-state dict around it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = make_scheduler(opt, "cosine", 2, 10)
    for _ in range(steps):
        model(torch.randint(0, 100, (1, 12))).logits.float().pow(2).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": ckpt.rng_state(),
             "step": steps, "epoch": 0, "pos": steps, "best": 0.25}
    return opt, sched, state


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert str(p) in msg, (p, msg)
    return msg


class Payload:
    """Unpickling this calls open(path, "w"): a stand-in for os.system in a crafted checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_hostile_legacy_state(ckpt_dir, sentinel):
    for f in (ckpt.STATE_INDEX, ckpt.STATE_TENSORS):
        if os.path.exists(os.path.join(ckpt_dir, f)):
            os.remove(os.path.join(ckpt_dir, f))
    torch.save({"optimizer": Payload(sentinel)}, os.path.join(ckpt_dir, "training_state.pt"))


# ---------------------------------------------------------------------------- 1. resume runs no code
def test_a_crafted_pickle_training_state_is_refused_not_executed(tmp_path):
    d = tmp_path / "run" / "epoch_0_step_2"
    d.mkdir(parents=True)
    sentinel = tmp_path / "pwned"
    _write_hostile_legacy_state(str(d), sentinel)
    assert ckpt.latest_checkpoint(str(tmp_path / "run")) == str(d)      # found, so that resume says why not
    with pytest.raises(BadFileError) as e:
        ckpt.load_training_state(str(d))
    _one_line(e, d / "training_state.pt", "cannot be loaded safely", "load_cp=")
    assert not sentinel.exists()
    torch.load(d / "training_state.pt", weights_only=False)             # the file is really hostile:
    assert sentinel.exists()                                              # the old loader ran its payload


def test_round_trip_restores_optimizer_scheduler_and_rng_exactly(tmp_path, tok):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    model = _model()
    opt, sched, state = _trained_state(model)
    py_state = random.getstate()
    ckpt.save_checkpoint(str(tmp_path / "epoch_0_step_3"), model, tok, {"lr": 1e-2}, state)
    draws = (random.random(), np.random.rand(4).tolist(), torch.rand(4))
    assert sorted(os.listdir(tmp_path / "epoch_0_step_3")) == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "finetune_ssm_config.json",
         "training_state.json", "training_state.safetensors"])              # no pickle anywhere
    loaded = ckpt.load_training_state(str(tmp_path / "epoch_0_step_3"))
    assert (loaded["step"], loaded["epoch"], loaded["pos"], loaded["best"]) == (3, 0, 3, 0.25)
    assert loaded["rng"]["python"] == py_state                           # the same tuple of tuples
    ckpt.set_rng_state(loaded["rng"])
    assert random.random() == draws[0] and np.random.rand(4).tolist() == draws[1]
    assert torch.equal(torch.rand(4), draws[2])

    twin = DecimatingMambaModel.from_pretrained(str(tmp_path / "epoch_0_step_3"))
    opt2 = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    sched2 = make_scheduler(opt2, "cosine", 2, 10)
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"] and sched2.state_dict() == sched.state_dict()
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 100, (1, 12))                                 # one more step on each: identical
    for m, o, s in ((model, opt, sched), (twin, opt2, sched2)):
        m(ids).logits.float().pow(2).mean().backward()
        o.step()
        s.step()
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ---------------------------------------------------------------------------- 4. damaged files: one line
def _corrupt(d, how):
    index, tensors = d / ckpt.STATE_INDEX, d / ckpt.STATE_TENSORS
    if how == "empty json":
        index.write_text("")
        return index
    if how == "truncated json":
        index.write_text(index.read_text()[:200])
        return index
    if how == "json of something else":
        index.write_text(json.dumps({"step": 3}))
        return index
    if how == "reference to a missing tensor":
        index.write_text(index.read_text().replace('"state.rng.torch"', '"nope"'))
        return index
    if how == "empty safetensors":
        tensors.write_bytes(b"")
        return tensors
    if how == "truncated safetensors":
        tensors.write_bytes(tensors.read_bytes()[:500])
        return tensors
    tensors.unlink()
    return tensors


@pytest.mark.parametrize("how", ["empty json", "truncated json", "json of something else",
                                 "reference to a missing tensor", "empty safetensors", "truncated safetensors",
                                 "missing safetensors"])
def test_a_damaged_training_state_gives_one_line_naming_the_file(tmp_path, how):
    d = tmp_path / "epoch_0_step_3"
    d.mkdir()
    ckpt._write_training_state(str(d), _trained_state(_model())[2])
    assert ckpt.load_training_state(str(d))["step"] == 3                # intact, it loads
    bad = _corrupt(d, how)
    with pytest.raises(BadFileError) as e:
        ckpt.load_training_state(str(d))
    _one_line(e, bad, "delete this epoch_*_step_* folder")


def test_read_json_names_file_position_and_remedy(tmp_path):
    p = tmp_path / "config.json"
    p.write_text('{"lr": 1e-3,\n "epochs": }')
    with pytest.raises(BadFileError) as e:
        read_json(str(p), "restore it")
    assert _one_line(e) == f"{p}: not valid JSON (line 2 col 12: Expecting value); restore it"
    for text, why in ((b"  \n", "the file is empty"), (b'{"a": "\xff"}', "not UTF-8"), (b"[" * 100000, "nested")):
        p.write_bytes(text)
        with pytest.raises(BadFileError) as e:
            read_json(str(p), "restore it")
        _one_line(e, p, why, "restore it")
    p.write_text('{"ok": [1, 2]}')
    assert read_json(str(p), "x") == {"ok": [1, 2]}


def test_a_damaged_squad_file_or_tokenizer_gives_one_line(tmp_path):
    squad = tmp_path / "dev.json"
    good = {"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q?", "answers": []}]}]}]}
    squad.write_text(json.dumps(good))
    assert load_squad_rows(str(squad)) == [{"title": "", "question": "q?", "context": "c", "has_answer": False}]
    for text, why in ((json.dumps(good)[:-9], "not valid JSON (line 1"), ("[1, 2]", "no top-level 'data'"),
                      (json.dumps({"data": [{"paragraphs": [{"context": "c"}]}]}), "KeyError: 'qas'")):
        squad.write_text(text)
        with pytest.raises(BadFileError) as e:
            load_squad_rows(str(squad))
        _one_line(e, squad, why, "squad_eval_source=PATH")
    bad_tok = tmp_path / "tokenizer.json"
    bad_tok.write_text('{"model": ')
    with pytest.raises(BadFileError) as e:
        Tokenizer(str(bad_tok))
    _one_line(e, bad_tok, "not a readable tokenizer.json", "--set tokenizer=PATH")


# ---------------------------------------------------------------------------- the CLI on a real run folder
TINY = {"activate_logging": False, "model_device": "cpu", "dataset": "niah_custom", "mamba_arch": "deci",
        "scratch_model_config": {"d_model": 16, "n_layer": 2, "ssm_cfg": {"d_state": 4}},
        "eval_steps": 100, "save_steps": 2, "grad_accum_steps": 2, "train_micro_batch_size": 2, "epochs": 1,
        "niah_train_set_size": 8, "niah_context_len_train": 100, "niah_noise_split_train": "validation",
        "niah_needle_depths_eval": [0.5], "niah_context_lens_eval": [100], "niah_samples_per_cell": 1,
        "decimating_layers": [1], "decimation_max_p_L_base": 60, "max_step": 2}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A real run folder stopped at step 2, with its periodic checkpoint."""
    out = tmp_path_factory.mktemp("runs")
    cfg = out / "tiny.json"
    cfg.write_text(json.dumps({**TINY, "output_dir": str(out)}))
    assert finetune_ssm.main(["--config", str(cfg), "--run-name", "run"]) == 0
    assert (out / "run" / "epoch_0_step_2" / ckpt.STATE_INDEX).exists()
    return out / "run"


@pytest.mark.parametrize("damage", ["hostile pickle", "truncated safetensors"])
def test_resume_from_a_bad_training_state_exits_with_one_line(tmp_path, stopped_run, capsys, damage):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    d = run / "epoch_0_step_2"
    sentinel = tmp_path / "pwned"
    if damage == "hostile pickle":
        _write_hostile_legacy_state(str(d), sentinel)
        bad = d / "training_state.pt"
    else:
        bad = _corrupt(d, "truncated safetensors")
    capsys.readouterr()
    assert finetune_ssm.main(["--resume", str(run), "--set", "max_step=4"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: ") and "Traceback" not in err, err
    assert not sentinel.exists() and not (run / "epoch_0_step_4").exists()


# ---------------------------------------------------------------------------- 5. a full disk
def _full_disk_os_write(monkeypatch, after_bytes=0):
    """os.write writes ``after_bytes`` in all, then fails as on a full filesystem."""
    real, left = os.write, [after_bytes]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data[:left[0]]))
        left[0] -= n
        return n
    monkeypatch.setattr(os, "write", write)


def test_write_json_atomic_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "config.json"
    write_json_atomic(str(p), {"v": 1})
    _full_disk_os_write(monkeypatch, after_bytes=3)                    # a short write, then ENOSPC
    with pytest.raises(DiskFullError) as e:
        write_json_atomic(str(p), {"v": 2, "pad": "x" * 100})
    _one_line(e, f"no space left on device: {p}")
    assert os.listdir(tmp_path) == ["config.json"] and json.loads(p.read_text()) == {"v": 1}
    monkeypatch.undo()
    write_json_atomic(str(p), {"v": 2, "pad": "x" * 100})               # partial writes are completed
    assert json.loads(p.read_text())["v"] == 2


def _fail_like_a_full_disk(monkeypatch, model, where):
    """Make one write of save_checkpoint fail the way its library fails on a full filesystem,
    after leaving a partial file behind."""
    def partial_then(exc, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise exc
    if where == "model weights":
        monkeypatch.setattr(model, "save_pretrained", lambda d: (os.makedirs(d, exist_ok=True), partial_then(
            SafetensorError(SAFETENSORS_FULL), os.path.join(d, "model.safetensors"))))
    elif where == "tokenizer":
        monkeypatch.setattr(Tokenizer, "save", lambda self, d: partial_then(
            Exception(TOKENIZERS_FULL), os.path.join(d, "tokenizer.json")))
    elif where == "state tensors":
        monkeypatch.setattr(ckpt, "save_file", lambda t, p, metadata=None: partial_then(SafetensorError(SAFETENSORS_FULL), p))
    elif where == "run config (os.write)":
        _full_disk_os_write(monkeypatch, after_bytes=10)
    else:                                                               # fsync: delayed allocation, NFS
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.parametrize("where", ["model weights", "tokenizer", "run config (os.write)", "state tensors", "fsync"])
def test_a_checkpoint_on_a_full_disk_keeps_the_last_good_one(tmp_path, tok, monkeypatch, where):
    model = _model()
    opt, sched, state = _trained_state(model, steps=2)
    ckpt.save_checkpoint(str(tmp_path / "epoch_0_step_2"), model, tok, {"lr": 1}, state)
    ckpt.save_checkpoint(str(tmp_path / "best_model"), model, tok, {"lr": 1})
    before = {f: (tmp_path / "best_model" / f).read_bytes() for f in os.listdir(tmp_path / "best_model")}
    _, _, later = _trained_state(model, steps=1)
    _fail_like_a_full_disk(monkeypatch, model, where)
    targets = [("epoch_0_step_4", later), ("best_model", None)]        # a new folder, and a swap
    for target, st in targets[:1] if where == "state tensors" else targets:
        with pytest.raises(DiskFullError) as e:
            ckpt.save_checkpoint(str(tmp_path / target), model, tok, {"lr": 2}, st)
        _one_line(e, f"no space left on device: {tmp_path / target}", "previous checkpoints are kept")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["best_model", "epoch_0_step_2"]          # no .tmp_*, no .old
    assert {f: (tmp_path / "best_model" / f).read_bytes() for f in os.listdir(tmp_path / "best_model")} == before
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / "epoch_0_step_2")
    assert ckpt.load_training_state(str(tmp_path / "epoch_0_step_2"))["step"] == 2
    DecimatingMambaModel.from_pretrained(str(tmp_path / "epoch_0_step_2"))


def test_full_disk_is_recognised_in_each_librarys_own_error():
    class FullFile(io.BytesIO):                                         # a file on a disk with 300 bytes free
        def write(self, b):
            if self.tell() + len(b) > 300:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)
    with pytest.raises(RuntimeError) as e:
        torch.save({"a": torch.zeros(1000)}, FullFile())                 # torch: "unexpected pos 297 vs 244"
    assert is_disk_full(e.value)
    for exc in (OSError(errno.ENOSPC, "x"), OSError(errno.EDQUOT, "x"), SafetensorError(SAFETENSORS_FULL),
                Exception(TOKENIZERS_FULL), DiskFullError("p")):
        assert is_disk_full(exc), exc
    for exc in (OSError(errno.EACCES, "Permission denied"), RuntimeError("shape mismatch"), KeyboardInterrupt()):
        assert not is_disk_full(exc), exc


# ---------------------------------------------------------------------------- an interrupted swap
def _kill_between_the_renames(monkeypatch):
    real = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tmp_"):                   # X -> X.old done, .tmp_X -> X not yet
            raise SystemExit("killed")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("name, recover", [("best_model", "recover_interrupted_swaps"),
                                           ("epoch_0_step_2", "latest_checkpoint"),
                                           ("epoch_0_step_2", "save_checkpoint")])
def test_a_swap_killed_between_its_renames_is_undone(tmp_path, tok, monkeypatch, name, recover):
    old_model, new_model = _model(seed=1), _model(seed=2)
    state = _trained_state(old_model, steps=2)[2] if name != "best_model" else None
    ckpt.save_checkpoint(str(tmp_path / name), old_model, tok, {"v": 1}, state)
    _kill_between_the_renames(monkeypatch)
    with pytest.raises(SystemExit):
        ckpt.save_checkpoint(str(tmp_path / name), new_model, tok, {"v": 2}, state)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == [f".tmp_{name}", f"{name}.old"]       # the state a kill leaves
    if recover == "recover_interrupted_swaps":
        assert ckpt.recover_interrupted_swaps(str(tmp_path)) == [str(tmp_path / name)]
    elif recover == "latest_checkpoint":
        assert ckpt.latest_checkpoint(str(tmp_path)) == str(tmp_path / name)
    else:
        ckpt.save_checkpoint(str(tmp_path / "best_model"), new_model, tok, {"v": 3})
    assert sorted(os.listdir(tmp_path)) == sorted({name, "best_model"} if recover == "save_checkpoint" else {name})
    back = load_file(tmp_path / name / "model.safetensors")
    assert all(torch.equal(back[k], v) for k, v in old_model.state_dict().items() if k in back)
    assert json.loads((tmp_path / name / "finetune_ssm_config.json").read_text()) == {"v": 1}


def test_a_swap_killed_before_its_cleanup_keeps_the_new_folder(tmp_path, tok):
    model = _model(seed=1)
    ckpt.save_checkpoint(str(tmp_path / "best_model"), model, tok, {"v": 2})
    shutil.copytree(tmp_path / "best_model", tmp_path / "best_model.old")
    (tmp_path / "best_model.old" / "finetune_ssm_config.json").write_text('{"v": 1}')
    assert ckpt.recover_interrupted_swaps(str(tmp_path)) == []
    assert os.listdir(tmp_path) == ["best_model"]
    assert json.loads((tmp_path / "best_model" / "finetune_ssm_config.json").read_text()) == {"v": 2}


# ---------------------------------------------------------------------------- 10. export precision
FP32_NAMES = (".A_log", ".D", ".dt_proj.bias")


def test_export_keeps_a_log_d_and_dt_bias_in_fp32(tmp_path):
    from tools.export_checkpoint import main as export

    src = randomize(MambaLMHeadModel(tiny_config()))
    src.save_pretrained(str(tmp_path / "src"))
    assert export([str(tmp_path / "src"), str(tmp_path / "dest")]) == 0
    out, ref = load_file(tmp_path / "dest" / "model.safetensors"), src.state_dict()
    assert {k for k in out if out[k].dtype == torch.float32} == {k for k in out if k.endswith(FP32_NAMES)}
    assert len([k for k in out if k.endswith(FP32_NAMES)]) == 3 * src.config.n_layer
    for k, v in out.items():
        keep = k.endswith(FP32_NAMES)
        assert v.dtype == (torch.float32 if keep else torch.bfloat16), k
        assert torch.equal(v, ref[k] if keep else ref[k].to(torch.bfloat16)), k      # fp32 ones bit-exact


def test_shipped_checkpoint_stores_the_ssm_tensors_in_fp32():
    path = os.path.join(ROOT, "checkpoints", "passkey_small_deci", "model.safetensors")
    if not os.path.exists(path):
        pytest.skip("no shipped checkpoint")
    w = load_file(path)
    n_layer = MambaConfig(**json.load(open(os.path.join(os.path.dirname(path), "config.json")))).n_layer
    assert sorted(k for k in w if w[k].dtype == torch.float32) == sorted(
        f"backbone.layers.{i}.mixer.{n}" for i in range(n_layer) for n in ("A_log", "D", "dt_proj.bias"))
    assert all(w[k].dtype == torch.bfloat16 for k in w if not k.endswith(FP32_NAMES))
    # the README's note: these are fp32 copies of the values the original export rounded to bf16
    assert all(torch.equal(w[k].to(torch.bfloat16).float(), w[k]) for k in w if k.endswith(FP32_NAMES))
