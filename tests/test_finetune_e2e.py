"""End to end on the CPU: train -> eval -> resume, eval resume, and a preset eval on a local checkpoint."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import finetune_ssm
from engine import train as train_loop
from engine.checkpoint import STATE_INDEX
from models import DecimatingMambaModel, MambaConfig

TINY = {"activate_logging": False, "model_device": "cpu", "dataset": "niah_custom", "mamba_arch": "deci",
        "scratch_model_config": {"d_model": 16, "n_layer": 3, "ssm_cfg": {"d_state": 4}},
        "eval_steps": 2, "save_steps": 2, "grad_accum_steps": 3, "train_micro_batch_size": 2, "epochs": 1,
        "niah_train_set_size": 12, "niah_context_len_train": 120, "niah_noise_split_train": "validation",
        "niah_needle_depths_eval": [0.5], "niah_context_lens_eval": [100, 200], "niah_samples_per_cell": 2,
        "decimating_layers": [1], "decimation_max_p_L_base": 60, "lr": 1e-3}


def _run(tmp_path, name, rc=0, **over):
    cfg_path = tmp_path / f"{name}.json"
    cfg_path.write_text(json.dumps({**TINY, "output_dir": str(tmp_path), **over}))
    assert finetune_ssm.main(["--config", str(cfg_path), "--run-name", name]) == rc
    return tmp_path / name


def test_train_eval_then_resume_equals_uninterrupted(tmp_path):
    straight = _run(tmp_path, "straight", max_step=4)
    first = _run(tmp_path, "resumed", max_step=2)
    assert finetune_ssm.main(["--resume", str(first), "--set", "max_step=4"]) == 0
    a = load_file(straight / "epoch_0_step_4" / "model.safetensors")
    b = load_file(first / "epoch_0_step_4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in open(first / "results.jsonl")]
    assert sorted({r["step"] for r in recs}) == [0, 2, 4] and all(r["task"] == "niah_custom" for r in recs)
    for f in ("metrics.json", "train_log.jsonl", "config.json", "plots/niah_custom_step4.png", "best_model/config.json"):
        assert os.path.exists(first / f), f
    loaded = DecimatingMambaModel.from_pretrained(str(first / "epoch_0_step_4"))
    assert loaded.config.n_layer == 3


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, monkeypatch):
    import signal

    straight = _run(tmp_path, "straight", max_step=4, eval_steps=100, save_steps=100)
    real_step = train_loop.train_step
    calls = []

    def step_then_signal(*a, **k):           # SIGTERM arrives during step 2
        out = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_loop, "train_step", step_then_signal)
    stopped = _run(tmp_path, "stopped", rc=train_loop.EXIT_STOPPED, max_step=4, eval_steps=100, save_steps=100)
    monkeypatch.setattr(train_loop, "train_step", real_step)
    assert len(calls) == 2 and (stopped / "epoch_0_step_2" / STATE_INDEX).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL           # handler removed after training
    assert finetune_ssm.main(["--resume", str(stopped)]) == 0
    a = load_file(straight / "epoch_0_step_4" / "model.safetensors")
    b = load_file(stopped / "epoch_0_step_4" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_resumes_by_skipping_recorded_cells(tmp_path, capsys):
    ck = tmp_path / "ck"
    DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=50277)).save_pretrained(str(ck))
    args = ["--eval", "2", "--device", "cpu", "--set", f"load_cp={ck}", "--set", f"output_dir={tmp_path}",
            "--set", "niah_context_lens_eval=[100,300]", "--set", "niah_needle_depths_eval=[0,1]",
            "--set", "decimating_layers=[1]", "--set", "decimation_max_p_L_base=50"]
    assert finetune_ssm.main(args) == 0
    out = capsys.readouterr().out
    assert "Validation Set - Initial Result | Score:" in out and "| depth |" in out
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("eval_deci_ck_niah_custom"))
    lines = open(run / "results.jsonl").read().splitlines()
    assert len(lines) == 4
    assert finetune_ssm.main(args) == 0                                  # second run: nothing recomputed
    assert open(run / "results.jsonl").read().splitlines() == lines
    rec = json.loads(lines[0])
    for key in ("task", "task_version", "checkpoint", "config_hash", "depth", "ctx_len", "score", "seconds"):
        assert key in rec


def test_missing_checkpoint_fails_cleanly(tmp_path, capsys):
    rc = finetune_ssm.main(["--eval", "2", "--device", "cpu", "--set", f"load_cp={tmp_path}/nothing",
                            "--set", f"output_dir={tmp_path}"])
    assert rc == 1 and "neither an existing directory nor a hub id" in capsys.readouterr().err


def test_unreachable_hub_model_fails_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    rc = finetune_ssm.main(["--eval", "3", "--device", "cpu", "--set", f"output_dir={tmp_path}",
                            "--set", f"cache_dir={tmp_path}/cache"])
    err = capsys.readouterr().err
    assert rc == 1 and "assafbk/mamba-130m-niah" in err and "local directory" in err


def test_find_deci_layer_installs_a_real_layer(tmp_path):
    run = _run(tmp_path, "sweep", max_step=1, find_deci_layer=True, find_deci_layer_candidates=[1, 2],
               niah_context_lens_eval=[100])
    sweep = json.loads((run / "find_deci_layer.json").read_text())
    assert set(sweep["scores"]) == {"1", "2"} and sweep["chosen_layer"] in (1, 2)   # a layer number, not a list position
    assert json.loads((run / "config.json").read_text())["decimating_layers"] == [sweep["chosen_layer"]]
    assert json.loads((run / "config.json").read_text())["niah_context_lens_eval"] == [100]   # eval settings untouched


def test_weight_decay_groups():
    from engine.optim import param_groups

    model = DecimatingMambaModel(MambaConfig(d_model=16, n_layer=2, vocab_size=100))
    decay, no_decay = param_groups(model, 0.1, decay_all=False)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("A_log", "D", "norm.weight", "norm_f.weight", "bias")) for p in no_decay["params"])
    assert all(p.dim() >= 2 and not names[id(p)].endswith("A_log") for p in decay["params"]) and decay["weight_decay"] == 0.1
    everything = param_groups(model, 0.1, decay_all=True)
    assert len(everything[0]["params"]) == len(list(model.parameters())) and not everything[1]["params"]


def test_wandb_is_lazy_offline_without_key_and_never_logs_in(tmp_path, monkeypatch):
    import sys
    import types

    calls = {}

    class Run:
        def log(self, metrics, step):
            calls.setdefault("log", []).append(step)

        def finish(self):
            calls["finish"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or Run(), Settings=lambda **kw: kw,
                                 login=lambda *a, **k: calls.update(login=True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _run(tmp_path, "wb", max_step=2, activate_logging=True, wandb_dir=str(tmp_path / "wandb"))
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "icl_ssm"
    assert "login" not in calls and calls["finish"] and calls["log"][:3] == [0, 1, 2]


def test_logging_without_wandb_installed_warns_and_still_logs(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)          # import wandb -> ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        run = _run(tmp_path, "nowb", max_step=1, activate_logging=True, wandb_dir=str(tmp_path / "wandb"))
    assert [json.loads(x)["step"] for x in open(run / "train_log.jsonl")] == [0, 1]


def test_squad_and_pg19_train_and_evaluate(tmp_path):
    from custom_datasets.tokenize_pg19 import save_split
    from tests.conftest import SHARED

    squad = os.path.join(SHARED, "data", "squad_v2", "cs224n-split", "dev-v2.0.json")
    if os.path.exists(squad):
        run = _run(tmp_path, "squad", dataset="squad_retrieve", squad_train_source=squad, squad_eval_source=squad,
                   squad_heldout_titles=6, eval_set_size=2, multidoc_num_noise_docs_eval=[3, 6], multidoc_num_noise_docs_train=2, max_step=2)
        recs = [json.loads(x) for x in open(run / "results.jsonl")]
        assert {r["num_docs"] for r in recs} == {3, 6} and {r["step"] for r in recs} == {0, 2}
    books = [{"short_book_title": f"b{i}", "input_tokens": torch.randint(0, 50277, (1, 900))} for i in range(6)]
    save_split(books, str(tmp_path / "pg19_data"), "test")
    save_split(books, str(tmp_path / "pg19_data"), "train")
    run = _run(tmp_path, "pg19", dataset="ppl_test", pg19_dir=str(tmp_path / "pg19_data"), ppl_test_context_lens_eval=[200, 400],
               ppl_test_num_windows_per_context_len_eval=2, ppl_test_pred_len=20, ppl_test_context_len_train=120,
               deci_num_chunks=2, max_step=2, grad_accum_steps=3)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "ppl_test" and metrics["step"] == 2 and metrics["score"] > 1
