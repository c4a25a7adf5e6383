"""What a result or a run folder can be trusted for (issue 12 items 2, 3, 6, 7, 13), on the CPU:
recorded cells are reused only for the same weights and settings; a run never overwrites another;
a stopped run says so in its exit status; config gaps are one clear line; tasks own their chunking."""
import json
import os
import signal
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import finetune_ssm
from configs import schema
from custom_datasets.base import TrainChunk
from engine import checkpoint as ckpt
from engine import results
from engine import train as train_loop
from models import DecimatingMambaModel, MambaConfig
from tests.helpers import one_line_stderr
from tests.test_finetune_e2e import _run

EVAL = ["--eval", "2", "--device", "cpu", "--set", "niah_context_lens_eval=[100]", "--set", "niah_needle_depths_eval=[0,1]",
        "--set", "decimating_layers=[1]", "--set", "decimation_max_p_L_base=50"]


FAST = {"niah_context_lens_eval": [100], "niah_samples_per_cell": 1}      # a one-cell eval grid for training runs


def _save_tiny(path, seed):
    torch.manual_seed(seed)
    DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50277)).save_pretrained(str(path))


def _records(run):
    return [json.loads(x) for x in open(run / "results.jsonl")]


def _one_line_error(capsys, rc, code, *needles):
    assert rc == code, capsys.readouterr().err
    return one_line_stderr(capsys, *needles)


# ---------------------------------------------------------------------------- item 2: reuse keyed on content
def test_changed_weights_at_the_same_path_are_evaluated_again(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)
    args = [*EVAL, "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}", "--run-name", "ev"]
    assert finetune_ssm.main(args) == 0
    assert "reusing" not in capsys.readouterr().out
    _save_tiny(ck, 1)                                    # another model in the same folder
    assert finetune_ssm.main(args) == 0
    assert "reusing" not in capsys.readouterr().out
    recs = _records(tmp_path / "ev")
    assert len(recs) == 4 and len({r["weights"] for r in recs}) == 2
    assert all(r["weights"].startswith("files-sha256:") for r in recs)
    assert finetune_ssm.main(args) == 0                  # unchanged weights: reused, nothing appended
    assert f"reusing 2 recorded cell(s) from {tmp_path / 'ev' / 'results.jsonl'}" in capsys.readouterr().out
    assert len(_records(tmp_path / "ev")) == 4
    assert finetune_ssm.main([*args, "--fresh-eval"]) == 0
    assert "--fresh-eval: not reusing 2" in capsys.readouterr().out and len(_records(tmp_path / "ev")) == 6


def test_records_say_what_produced_them(tmp_path):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)
    assert finetune_ssm.main([*EVAL, "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}", "--run-name", "ev"]) == 0
    rec = _records(tmp_path / "ev")[0]
    assert (rec["backend"], rec["dtype"], rec["device"], rec["device_name"]) == ("torch", "float32", "cpu", "cpu")
    commit = rec["commit"]
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40, commit
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["weights"] == rec["weights"]


def test_every_score_changing_setting_is_in_the_key(tmp_path):
    base, _ = schema.load(None, {})
    for key, value in (("backend", "torch"), ("eval_prefill_chunk_size", 4096)):
        assert schema.config_hash({**base, key: value}) != schema.config_hash(base), key
    assert schema.config_hash({**base, "model_device": "cpu"}) == schema.config_hash(base)   # recorded, not hashed
    store = results.ResultsStore(str(tmp_path / "results.jsonl"))
    ident = {k: "x" for k in results.IDENTITY}
    store.append({**ident, "ctx_len": 1, "score": 1.0})
    assert list(store.done(ident, ("ctx_len",))) == [(1,)]
    for k in ("weights", "config_hash", "backend", "dtype", "device"):
        assert store.done({**ident, k: "y"}, ("ctx_len",)) == {}, k


def test_file_digest_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    f, cache = tmp_path / "w.bin", str(tmp_path / "digests.json")
    f.write_bytes(b"a" * 1000)
    real = results.file_digest(str(f), cache)
    monkeypatch.setattr(results, "_MEMO", {})
    stored = json.loads(open(cache).read())
    (key,) = stored
    json.dump({key: "from-cache"}, open(cache, "w"))
    assert results.file_digest(str(f), cache) == "from-cache"          # not hashed again
    monkeypatch.setattr(results, "_MEMO", {})
    f.write_bytes(b"b" * 1000)                                         # same size, new mtime: hashed again
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))
    fresh = results.file_digest(str(f), cache)
    assert fresh not in ("from-cache", real) and len(fresh) == 64


def test_state_digest_follows_the_parameters():
    m = DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=100))
    a = results.state_digest(m)
    assert results.state_digest(m) == a
    with torch.no_grad():
        m.backbone.layers[1].mixer.D[0] += 1e-6
    assert results.state_digest(m) != a


def test_commit_without_git_is_unknown(monkeypatch):
    monkeypatch.delenv("DECIMAMBA_COMMIT", raising=False)
    monkeypatch.setenv("PATH", "")
    assert results.code_commit.__wrapped__() == "unknown"


def test_commit_named_by_the_caller_wins_over_a_stale_git(monkeypatch):
    monkeypatch.setenv("DECIMAMBA_COMMIT", "d64dcc1")
    assert results.code_commit.__wrapped__() == "d64dcc1 (DECIMAMBA_COMMIT)"


# ---------------------------------------------------------------------------- item 3: no silent overwrite
def test_training_into_an_existing_run_is_refused(tmp_path, capsys):
    run = _run(tmp_path, "a", **FAST, max_step=1)
    log = (run / "train_log.jsonl").read_text()
    capsys.readouterr()
    cfg_path = tmp_path / "a.json"
    rc = finetune_ssm.main(["--config", str(cfg_path), "--run-name", "a"])
    _one_line_error(capsys, rc, 1, "already holds a run", f"--resume {run}", "--run-name", "--overwrite")
    assert (run / "train_log.jsonl").read_text() == log
    assert finetune_ssm.main(["--config", str(cfg_path), "--run-name", "a", "--overwrite"]) == 0
    assert [json.loads(x)["step"] for x in open(run / "train_log.jsonl")] == [0, 1]      # one run, not two


def test_an_evaluation_does_not_write_into_a_training_run(tmp_path, capsys):
    run = _run(tmp_path, "t", **FAST, max_step=1)
    capsys.readouterr()
    rc = finetune_ssm.main([*EVAL, "--set", f"load_cp={run / 'epoch_0_step_1'}", "--set", f"output_dir={tmp_path}",
                            "--run-name", "t"])
    _one_line_error(capsys, rc, 1, "already holds a run")
    assert json.loads((run / "config.json").read_text())["eval_mode"] is False


@pytest.mark.parametrize("name", [".", "..", "a/b", "/abs/run", ""])
def test_a_run_name_is_one_folder_name(tmp_path, capsys, name):
    out = tmp_path / "o"
    (out / "sibling").mkdir(parents=True)
    (out / "sibling" / "keep").write_text("x")
    rc = finetune_ssm.main([*EVAL, "--set", f"output_dir={out}", "--run-name", name, "--overwrite"])
    _one_line_error(capsys, rc, 2, f"--run-name {name!r}: must be one folder name under output_dir")
    assert (out / "sibling" / "keep").read_text() == "x"


def test_overwrite_deletes_only_a_direct_child_of_output_dir(tmp_path):
    out = tmp_path / "o"
    (out / "a" / "b").mkdir(parents=True)
    args = finetune_ssm.parse_args(["--overwrite"])
    for run_dir in (out, out / "a" / "b", tmp_path):
        with pytest.raises(finetune_ssm.UsageError, match="nothing was deleted"):
            finetune_ssm.open_run_dir(args, {"output_dir": str(out)}, str(run_dir), True, 0, 1)
    assert (out / "a" / "b").is_dir()


def test_a_run_name_made_from_a_path_like_model_type_is_refused():
    cfg, _ = schema.load(None, {"model_type": "org/model"})
    made = "made from the config, '.*_deci_org/model_niah_custom_seed_123', is not one folder name"
    with pytest.raises(finetune_ssm.UsageError, match=made):
        finetune_ssm.run_name(finetune_ssm.parse_args([]), cfg)


def test_an_evaluation_with_other_settings_does_not_replace_one_in_its_folder(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)
    args = [*EVAL, "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}", "--run-name", "shared"]
    other = [*args, "--set", "niah_context_lens_eval=[120]", "--set", "activate_decimation=false"]
    assert finetune_ssm.main(args) == 0
    run = tmp_path / "shared"
    files = ("config.json", "metrics.json", "results.jsonl", "train_log.jsonl", "plots/niah_custom_step0.png")
    before = {f: (run / f).read_bytes() for f in files}
    capsys.readouterr()
    _one_line_error(capsys, finetune_ssm.main(other), 1, "holds an evaluation with other settings",
                    "niah_context_lens_eval [100] -> [120]", "activate_decimation True -> False", "another --run-name",
                    "--overwrite")
    assert {f: (run / f).read_bytes() for f in files} == before
    assert finetune_ssm.main(args) == 0                    # the same config continues in its folder
    assert "reusing 2 recorded cell(s)" in capsys.readouterr().out
    assert finetune_ssm.main([*other, "--overwrite"]) == 0
    assert [r["ctx_len"] for r in _records(run)] == [120, 120]


def test_a_folder_holding_no_result_takes_another_config(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)
    args = [*EVAL, "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}", "--run-name", "shared"]
    assert finetune_ssm.main(args) == 0
    run = tmp_path / "shared"
    for p in sorted(run.rglob("*"), reverse=True):         # as if the run stopped before it evaluated anything
        if p.name != "config.json":
            p.rmdir() if p.is_dir() else p.unlink()
    capsys.readouterr()
    assert finetune_ssm.main([*args, "--set", "niah_context_lens_eval=[120]"]) == 0
    assert "holds no result of the earlier one; changed: niah_context_lens_eval" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["niah_context_lens_eval"] == [120]


def test_an_evaluation_continued_on_another_device_says_so(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)
    args = [*EVAL, "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}", "--run-name", "ev"]
    assert finetune_ssm.main(args) == 0
    stored = tmp_path / "ev" / "config.json"
    stored.write_text(json.dumps({**json.loads(stored.read_text()), "model_device": "cuda:0"}))  # as if run on a GPU
    capsys.readouterr()
    assert finetune_ssm.main(args) == 0
    assert "on cpu (it ran on 'cuda:0'): each record names its device" in capsys.readouterr().out


def test_a_layer_sweep_evaluation_continues_in_its_folder(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)
    args = [*EVAL, "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}", "--run-name", "sweep",
            "--set", "find_deci_layer=true", "--set", "find_deci_layer_candidates=[0,1]"]
    assert finetune_ssm.main(args) == 0                    # config.json now holds the chosen layer
    chosen = json.loads((tmp_path / "sweep" / "find_deci_layer.json").read_text())["chosen_layer"]
    assert json.loads((tmp_path / "sweep" / "config.json").read_text())["decimating_layers"] == [chosen]
    capsys.readouterr()
    assert finetune_ssm.main(args) == 0
    assert capsys.readouterr().out.count("reusing 2 recorded cell(s)") == 3     # both sweep layers and the result


# ---------------------------------------------------------------------------- item 6: stop, resume, recover_step
def test_sigterm_exits_3_and_a_second_signal_during_the_write_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_step, real_save = train_loop.train_step, ckpt.save_checkpoint
    steps, saves = [], []

    def step_then_signal(*a, **k):
        out = real_step(*a, **k)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    def signal_while_saving(path, *a, **k):
        if "epoch_" in os.path.basename(path):
            os.kill(os.getpid(), signal.SIGTERM)          # the second signal, mid-write
        saves.append(path)
        return real_save(path, *a, **k)

    monkeypatch.setattr(train_loop, "train_step", step_then_signal)
    monkeypatch.setattr(ckpt, "save_checkpoint", signal_while_saving)
    run = _run(tmp_path, "s", **FAST, rc=train_loop.EXIT_STOPPED, max_step=4, eval_steps=100, save_steps=100)
    out = capsys.readouterr().out
    assert "stopped at step 2 of 4 (signal SIGTERM)" in out and f"--resume {run}" in out
    assert "training done" not in out and "a checkpoint is being written" in out
    assert ckpt.load_training_state(str(run / "epoch_0_step_2"))["step"] == 2
    monkeypatch.setattr(train_loop, "train_step", real_step)
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert finetune_ssm.main(["--resume", str(run)]) == 0
    assert (run / "epoch_0_step_4" / ckpt.STATE_INDEX).exists()


def test_resume_says_why_nothing_trains(tmp_path, capsys):
    run = _run(tmp_path, "done", **FAST, max_step=4, eval_steps=100)          # 12 samples / 3 per step, 1 epoch: 4 steps
    capsys.readouterr()
    rc = finetune_ssm.main(["--resume", str(run), "--set", "max_step=8"])
    _one_line_error(capsys, rc, 1, "epochs=1 x 4 steps per epoch", "--set epochs=2")
    assert finetune_ssm.main(["--resume", str(run)]) == 0
    assert "nothing to train: the run is at step 4 and max_step=4" in capsys.readouterr().out
    assert finetune_ssm.main(["--resume", str(run), "--set", "max_step=6", "--set", "epochs=2"]) == 0
    assert (run / "epoch_1_step_6").exists()


def test_resume_allows_only_safe_changes(tmp_path, capsys):
    run = _run(tmp_path, "r", **FAST, max_step=2, eval_steps=100)
    capsys.readouterr()
    rc = finetune_ssm.main(["--resume", str(run), "--set", "lr=0.5"])
    _one_line_error(capsys, rc, 1, "--set lr=0.5 would change how the run trains", "max_step", "recover_step")
    rc = finetune_ssm.main(["--resume", str(run), "--eval", "2"])
    _one_line_error(capsys, rc, 1, "--eval cannot be combined with it")
    assert finetune_ssm.main(["--resume", str(run), "--set", "max_step=3", "--set", "lr=0.001"]) == 0   # lr unchanged
    assert "note: --resume: max_step 2 -> 3" in capsys.readouterr().out


def test_recover_step_continues_the_step_counter(tmp_path):
    sched = dict(lr_sched_type="cosine", warmup_steps=1, eval_steps=2, save_steps=2, max_step=4)
    straight = _run(tmp_path, "straight", **FAST, **sched)
    rec = _run(tmp_path, "rec", **FAST, load_cp=str(straight / "epoch_0_step_2"), recover_step=2, **sched)
    assert sorted(p.name for p in rec.glob("epoch_*")) == ["epoch_0_step_4"]
    log = {r["step"]: r for r in map(json.loads, open(rec / "train_log.jsonl"))}
    ref = {r["step"]: r for r in map(json.loads, open(straight / "train_log.jsonl"))}
    assert sorted(log) == [2, 3, 4]
    assert [log[s]["lr"] for s in (3, 4)] == [ref[s]["lr"] for s in (3, 4)]
    assert {r["step"] for r in _records(rec)} == {2, 4}


# ---------------------------------------------------------------------------- item 7: config gaps, one line each
def _dry(tmp_path, *sets, config=None):
    args = ["--dry-run", *(["--config", str(config)] if config else [])]
    for s in sets:
        args += ["--set", s]
    return finetune_ssm.main(args)


def test_duplicate_json_keys_are_rejected(tmp_path, capsys):
    p = tmp_path / "dup.json"
    p.write_text('{"lr": 0.001, "epochs": 2, "lr": 0.002}')
    _one_line_error(capsys, _dry(tmp_path, config=p), 2, "'lr' appears more than once")


@pytest.mark.parametrize("sets,needles", [
    (["model_device=gpu"], ["--set model_device=gpu:", "cuda:<n>"]),
    (["load_cp="], ["--set load_cp=:", "hub id or a local directory"]),
    (['scratch_model_config={"d_model": 16, "n_layer": 4, "ssm_cfg": [1]}'], ["scratch_model_config.ssm_cfg=[1]", "object"]),
    (['scratch_model_config={"d_model": 16, "n_layer": 4}', "decimating_layers=[10]"],
     ["decimating_layers=[10]", "n_layer=4: layers 0..3"]),
    (['scratch_model_config={"d_model": 16, "n_layr": 4}'], ["scratch_model_config=", "n_layr"]),
    (["learning_rate=0.1"], ["unknown key 'learning_rate'", "did you mean 'lr'?"]),
    (["niah_context_length_eval=[1000]"], ["did you mean 'niah_context_lens_eval'"]),
    (["niah_noise_split_eval=dev"], ["--set niah_noise_split_eval=dev:", "'validation'"]),
])
def test_config_gaps_are_one_line(tmp_path, capsys, sets, needles):
    err = _one_line_error(capsys, _dry(tmp_path, *sets), 2, *needles)
    assert "wandb_mode" not in err                                 # not every key listed


def test_preset_on_a_checkpoint_of_another_depth_says_which_keys_to_set(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)                                              # 2 layers; preset 2 decimates at layer 12
    rc = finetune_ssm.main(["--eval", "2", "--device", "cpu", "--dry-run", "--set", f"load_cp={ck}"])
    _one_line_error(capsys, rc, 1, "decimating_layers=[12]", "has 2 layers", "--set decimating_layers=[1]",
                    "activate_decimation=false")


def test_sweep_candidates_must_exist_in_the_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck"
    _save_tiny(ck, 0)                                              # 2 layers
    sweep = [*EVAL, "--dry-run", "--set", f"load_cp={ck}", "--set", "find_deci_layer=true"]
    rc = finetune_ssm.main([*sweep, "--set", "find_deci_layer_candidates=[1, 99]"])
    _one_line_error(capsys, rc, 1, "find_deci_layer_candidates=[1, 99]", "has 2 layers (0..1)")
    _one_line_error(capsys, finetune_ssm.main([*sweep, "--set", "find_deci_layer_candidates=[-1]"]), 2,
                    "--set find_deci_layer_candidates=[-1]: must be layer numbers, each >= 0")
    assert finetune_ssm.main([*sweep, "--set", "find_deci_layer_candidates=[0, 1]"]) == 0


def test_sweep_candidates_are_checked_against_the_loaded_model(tmp_path):
    from engine.evaluate import find_deci_layer

    model = DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=100))
    cfg, _ = schema.load(None, {"find_deci_layer_candidates": [1, 5]})
    with pytest.raises(ValueError, match=r"find_deci_layer_candidates=\[1, 5\] but the model has 2 layers \(0..1\)"):
        find_deci_layer(None, model, cfg, str(tmp_path), "cpu")  # the task is never reached
    assert os.listdir(tmp_path) == [] and cfg["decimating_layers"] == [12]


def test_a_folder_or_a_bad_set_value_is_named_in_one_line(tmp_path, capsys):
    _one_line_error(capsys, finetune_ssm.main(["--config", str(tmp_path), "--dry-run"]), 2,
                    f"{tmp_path}: a folder, not a file: --config needs a JSON config file")
    rc = finetune_ssm.main(["--config", "configs/demo_config.json", "--set", "lr=abc", "--dry-run"])
    err = _one_line_error(capsys, rc, 2, "--set lr=abc: expected float")
    assert "demo_config.json" not in err


# ---------------------------------------------------------------------------- item 13: tasks own their chunking
class TwoChunkTask:
    chunks = 2

    def train_item(self, index, epoch):
        ids = [(7 * index + 3 * j) % 90 + 1 for j in range(12)]
        return [TrainChunk(ids[:6], ids[1:6]), TrainChunk(ids, ids[6:])]


def test_train_step_divides_by_the_tasks_own_chunks():
    cfg, _ = schema.load(None, {"mamba_arch": "vanilla", "activate_decimation": False, "train_micro_batch_size": 4})
    torch.manual_seed(0)
    model = DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=100))
    task = TwoChunkTask()
    built = train_loop.build_chunks(task, torch.arange(3), 0, cfg)
    stats = train_loop.train_step(model, built, cfg, torch.device("cpu"), nullcontext())
    expected = 0.0
    with torch.no_grad():
        for i in range(3):
            for c in task.train_item(i, 0):
                logits = model(torch.tensor([c.input_ids]), num_last_tokens=len(c.labels) + 1).logits[0, :-1]
                expected += F.cross_entropy(logits, torch.tensor(c.labels)).item() / (3 * task.chunks)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)
