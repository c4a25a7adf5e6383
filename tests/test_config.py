"""Config schema and command line: original files load unchanged; bad input fails clearly."""
import filecmp
import json
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
    for needle in ("decimation_beta=1.5", "lr=-1", "unknown key 'lrr'", "did you mean", "epochs='3'",
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
