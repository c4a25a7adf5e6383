"""Config schema and command line: original files load unchanged; bad input fails clearly."""
import filecmp
import json
import math
import os
import subprocess
import sys

import pytest

from configs import schema
from tests.conftest import REPO, SHARED

ORIGINAL = ["finetune_ssm_config.json"] + [f"eval_ssm_config_{i}.json" for i in range(7)]


def cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(REPO, "finetune_ssm.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.parametrize("name", ORIGINAL)
def test_shipped_configs_load_and_equal_the_originals(name):
    cfg, _ = schema.load(os.path.join(REPO, "configs", name))
    with open(os.path.join(REPO, "configs", name)) as f:
        raw = json.load(f)
    assert {k: cfg[k] for k in raw} == raw and len(raw) == 51
    orig = os.path.join(SHARED, "data", "decimamba-configs", name)
    if os.path.exists(orig):
        assert filecmp.cmp(orig, os.path.join(REPO, "configs", name), shallow=False)


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_every_shipped_config_loads(name):
    if name.endswith(".json"):
        cfg, _ = schema.load(os.path.join(REPO, "configs", name))
        assert cfg["dataset"] in schema.TASK_NAMES


def test_eval_presets_mean_what_they_meant():
    c4, _ = schema.load(os.path.join(REPO, "configs", "eval_ssm_config_4.json"))
    assert (c4["dataset"], c4["decimation_beta"], c4["decimating_layers"], c4["decimation_max_p_L_base"]) == \
        ("ppl_test", 0.83, list(range(12, 21)), 8000)
    c6, _ = schema.load(os.path.join(REPO, "configs", "eval_ssm_config_6.json"))
    assert c6["record_debug_params"] and c6["mamba_arch"] == "vanilla"


def test_all_problems_reported_together():
    with pytest.raises(schema.ConfigError) as e:
        schema.load(None, {"decimation_beta": 1.5, "lr": -1, "lrr": 3, "mamba_arch": "vanilla", "epochs": "3"})
    msg = str(e.value)
    for needle in ("--set decimation_beta=1.5", "--set lr=-1", "unknown key 'lrr'", "did you mean", '--set epochs="3"',
                   "--list-keys"):
        assert needle in msg
    assert "wandb_mode" not in msg                        # the 80 keys are not listed


def test_contradiction_is_an_error_not_an_overwrite():
    with pytest.raises(schema.ConfigError, match="activate_decimation is true but mamba_arch is 'vanilla'"):
        schema.load(None, {"mamba_arch": "vanilla", "activate_decimation": True})


def test_inert_keys_are_kept_and_noted():
    cfg, notes = schema.load(os.path.join(REPO, "configs", "finetune_ssm_config.json"))
    assert cfg["deci_num_chunks"] == 2 and any("deci_num_chunks=2 is inert" in n for n in notes)


def test_set_parses_json_and_device_wins():
    cfg, _ = schema.load(None, schema.parse_set(["decimating_layers=[3,4]", "run_name_addon=x y", "model_device=cuda:1"]),
                         device="cpu")
    assert cfg["decimating_layers"] == [3, 4] and cfg["run_name_addon"] == "x y" and cfg["model_device"] == "cpu"


@pytest.mark.parametrize("preset", range(7))
def test_cli_dry_run_presets(preset):
    r = cli("--eval", str(preset), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])["eval_mode"] is True


def test_cli_dry_run_original_file():
    r = cli("--config", os.path.join(REPO, "configs", "finetune_ssm_config.json"), "--dry-run", "--device", "1")
    assert r.returncode == 0 and '"model_device": "cuda:1"' in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--eval", "9", "--dry-run"], "valid preset ids are [0, 1, 2, 3, 4, 5, 6]"),
    (["--eval", "2", "--config", "x.json", "--dry-run"], "not both"),
    (["--set", "decimation_beta=0", "--set", "bogus=1", "--dry-run"], "decimation_beta=0"),
    (["--set", "nokey", "--dry-run"], "expected key=value"),
    (["--config", "missing.json", "--dry-run"], "does not exist"),
    (["--device", "gpu7", "--dry-run"], "--device 'gpu7'"),
])
def test_cli_bad_input_exit_2_without_traceback(args, needle):
    r = cli(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("text,needle", [("{not json", "not valid JSON"), ("[1, 2]", "top level must be a JSON object"),
                                         ('{"mamba_arch": "vanilla", "decimating_layers": [3, 3]}', "decimating_layers=[3, 3]")])
def test_cli_bad_config_files(tmp_path, text, needle):
    p = tmp_path / "bad.json"
    p.write_text(text)
    r = cli("--config", str(p), "--dry-run")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_cli_cuda_requested_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("--eval", "2", "--set", "output_dir=/tmp/none")
    assert r.returncode == 1 and "pass --device cpu" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("overrides,needle", [
    ({"lr": math.inf}, "--set lr=Infinity: must be a finite number"),
    ({"lr": math.nan}, "--set lr=NaN: must be a finite number"),
    ({"weight_decay": math.inf}, "--set weight_decay=Infinity: must be a finite number"),
    ({"weight_decay": math.nan}, "--set weight_decay=NaN: must be a finite number"),
    ({"max_train_seconds": math.inf}, "--set max_train_seconds=Infinity: must be a finite number"),
    ({"decimation_max_p_L_base": -math.inf}, "--set decimation_max_p_L_base=-Infinity: must be a finite number"),
    ({"seed": -1}, "--set seed=-1: must be in [0, 2**32 - 1]"),
    ({"seed": 2**32}, "--set seed=4294967296: must be in [0, 2**32 - 1]"),
    ({"find_deci_layer_candidates": [3, -1]}, "--set find_deci_layer_candidates=[3, -1]: must be layer numbers, "
                                              "each >= 0"),
    ({"run_name_addon": "_x/../../y"}, "--set run_name_addon=_x/../../y: must be without '/'"),
    ({"lr": "abc"}, "--set lr=abc: expected float"),
])
def test_a_bad_set_value_is_one_line_naming_it(overrides, needle):
    with pytest.raises(schema.ConfigError) as e:
        schema.load(os.path.join(REPO, "configs", "demo_config.json"), overrides)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"command line: {needle}"), msg
    assert "demo_config.json" not in msg                 # the value came from --set, not from the file


def test_the_edges_of_the_ranges_load():
    # decimation_max_p_L_base inf: the budget keeps every token (modules/decimation.py), so it may be infinite
    for overrides in ({"seed": 0}, {"seed": 2**32 - 1}, {"find_deci_layer_candidates": [0]},
                      {"decimation_max_p_L_base": math.inf}):
        cfg, _ = schema.load(None, overrides)
        assert {k: cfg[k] for k in overrides} == overrides


def test_a_bad_file_value_names_the_file(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"lr": Infinity, "seed": 5}')
    with pytest.raises(schema.ConfigError) as e:
        schema.load(str(p), {"seed": -1})
    assert str(e.value).splitlines() == [f"{p} has 2 problems:",
                                         "  - --set seed=-1: must be in [0, 2**32 - 1] (numpy's seed range)",
                                         "  - lr=inf: must be a finite number"]


def test_a_folder_as_config_file_says_a_json_file_is_needed(tmp_path):
    with pytest.raises(schema.ConfigError) as e:
        schema.load(str(tmp_path))
    assert str(e.value) == (f"{tmp_path}: a folder, not a file: --config needs a JSON config file "
                            f"(e.g. configs/demo_config.json)")


def test_changed_keys_compare_resolved_configs():
    a, _ = schema.load(None, {"seed": 1})
    b = {k: v for k, v in a.items() if k != "lr"}                       # lr missing: its default, unchanged
    assert schema.changed_keys(a, {**b, "seed": 2, "wandb_dir": "x"}) == ["wandb_dir", "seed"]
    assert schema.changed_keys(a, {**b, "seed": 2, "wandb_dir": "x"}, ignore=("wandb_dir",)) == ["seed"]
    assert schema.changed_keys(a, b) == []
