"""Eval 6 records SSM parameters; the attention-map notebook runs headless on them and writes PNGs."""
import os

import pytest

import finetune_ssm
from custom_datasets.debug_params import load_recorded
from models import MambaConfig, MambaLMHeadModel
from tests.conftest import REPO


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval6")
    MambaLMHeadModel(MambaConfig(d_model=16, n_layer=3, vocab_size=50277, ssm_cfg={"d_state": 4})).save_pretrained(str(tmp / "ck"))
    rc = finetune_ssm.main(["--eval", "6", "--device", "cpu", "--set", f"load_cp={tmp / 'ck'}",
                            "--set", "niah_context_lens_eval=[200,400]", "--set", f"output_dir={tmp}"])
    assert rc == 0
    files = sorted(str(p) for p in tmp.rglob("artifacts/params_*.safetensors"))
    assert [os.path.basename(f) for f in files] == ["params_d0.25_L200_s0.safetensors", "params_d0.25_L400_s0.safetensors"]
    return files, tmp


def test_eval6_records_parameters(recorded):
    files, _ = recorded
    layers, meta = load_recorded(files[0])
    assert len(layers) == 3 and meta["ctx_len"] == 200 and meta["prompt_tokens"] == 22 + 200 + 4
    assert layers[0]["delta"].shape == (32, 226) and layers[0]["A"].shape == (32, 4)
    assert layers[2]["B"].shape == (4, 226) and (layers[1]["delta"] > 0).all()


def test_notebook_runs_headless(recorded, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    files, tmp = recorded
    out = tmp / "maps"
    monkeypatch.setenv("DECIMAMBA_ATTN_PARAMS", files[1])
    monkeypatch.setenv("DECIMAMBA_ATTN_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(REPO, "calculate_mamba_attn_maps.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")       # committed without outputs
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    assert sorted(os.listdir(out)) == ["attn_map_layer3.png", "attn_maps_all_layers.png"]
    assert all(os.path.getsize(out / f) > 5000 for f in os.listdir(out))
