"""Eval 6 records SSM parameters (once per prompt); the attention-map notebook runs headless on a
recording, or records its own example from the shipped checkpoint when given none, and writes PNGs."""
import os

import pytest

import finetune_ssm
from custom_datasets.debug_params import load_recorded
from models import MambaConfig, MambaLMHeadModel
from models.mamba_lm import MixerModel
from tests.conftest import REPO

CKPT = os.path.join(REPO, "checkpoints", "passkey_small_deci", "model.safetensors")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval6")
    MambaLMHeadModel(MambaConfig(d_model=16, n_layer=3, vocab_size=50277, ssm_cfg={"d_state": 4})).save_pretrained(str(tmp / "ck"))
    calls, forward = [], MixerModel.forward           # every full-sequence forward, and whether it records

    def counting(self, input_ids, *args, record=False, **kw):
        calls.append((int(input_ids.shape[1]), record))
        return forward(self, input_ids, *args, record=record, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MixerModel, "forward", counting)
        rc = finetune_ssm.main(["--eval", "6", "--device", "cpu", "--set", f"load_cp={tmp / 'ck'}",
                                "--set", "niah_context_lens_eval=[200,400]", "--set", f"output_dir={tmp}"])
    assert rc == 0
    files = sorted(str(p) for p in tmp.rglob("artifacts/params_*.safetensors"))
    assert [os.path.basename(f) for f in files] == ["params_d0.25_L200_s0.safetensors", "params_d0.25_L400_s0.safetensors"]
    return files, tmp, calls


def test_eval6_records_parameters(recorded):
    files, _, _ = recorded
    layers, meta = load_recorded(files[0])
    assert len(layers) == 3 and meta["ctx_len"] == 200 and meta["prompt_tokens"] == 22 + 200 + 4
    assert layers[0]["delta"].shape == (32, 226) and layers[0]["A"].shape == (32, 4)
    assert layers[2]["B"].shape == (4, 226) and (layers[1]["delta"] > 0).all()


def test_eval6_records_each_prompt_once(recorded):
    # The generation prefills (one per prompt) do not record; the recording is one extra forward each.
    _, _, calls = recorded
    assert [n for n, rec in calls if rec] == [226, 426]
    assert sorted(n for n, rec in calls if not rec) == [226, 426]


def _run_notebook(monkeypatch, out, **env):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("DECIMAMBA_ATTN_PARAMS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DECIMAMBA_ATTN_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(os.path.join(REPO, "calculate_mamba_attn_maps.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")       # committed without outputs
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    return nb


def test_notebook_runs_headless(recorded, monkeypatch):
    files, tmp, _ = recorded
    out = tmp / "maps"
    _run_notebook(monkeypatch, out, DECIMAMBA_ATTN_PARAMS=files[1])
    assert sorted(os.listdir(out)) == ["attn_map_layer3.png", "attn_maps_all_layers.png"]
    assert all(os.path.getsize(out / f) > 5000 for f in os.listdir(out))


@pytest.mark.skipif(not os.path.exists(CKPT), reason="no shipped checkpoint")
def test_notebook_without_a_recording_records_the_shipped_checkpoint(tmp_path, monkeypatch):
    # A fresh clone: no recording given. The notebook records one passkey prompt itself (a 200-token
    # haystack here to keep the test short; 1000 by default) and draws all 6 layers.
    out = tmp_path / "maps"
    nb = _run_notebook(monkeypatch, out, DECIMAMBA_ATTN_EXAMPLE_TOKENS="200")
    params = out / "recording" / "example" / "artifacts" / "params_d0.25_L200_s0.safetensors"
    layers, meta = load_recorded(str(params))
    assert meta["prompt_tokens"] == 22 + 200 + 4 and len(layers) == 6
    assert all(p["delta"].shape == (256, 226) for p in layers)           # decimation off: every token, every layer
    assert sorted(os.listdir(out)) == ["attn_map_layer5.png", "attn_maps_all_layers.png", "recording"]
    assert all(os.path.getsize(out / f) > 5000 for f in os.listdir(out) if f.endswith(".png"))
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "6 layers, 226 tokens" in printed


def test_eval6_and_notebook_on_a_mamba2_model(tmp_path, monkeypatch):
    """Eval 6 records a Mamba-2 model's (h,) A and (g, n, l) B, C; the notebook draws per-head maps from them."""
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=50277,
                      ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 32})
    MambaLMHeadModel(cfg).save_pretrained(str(tmp_path / "ck"))
    assert finetune_ssm.main(["--eval", "6", "--device", "cpu", "--set", f"load_cp={tmp_path / 'ck'}",
                              "--set", "niah_context_lens_eval=[200]", "--set", f"output_dir={tmp_path}"]) == 0
    (params,) = tmp_path.rglob("artifacts/params_*.safetensors")
    layers, _ = load_recorded(str(params))
    assert layers[0]["A"].shape == (4,) and layers[0]["delta"].shape == (4, 226)       # 4 heads (64 / 16)
    assert layers[1]["B"].shape == (1, 8, 226) and (layers[0]["A"] < 0).all()
    nb = _run_notebook(monkeypatch, tmp_path / "maps", DECIMAMBA_ATTN_PARAMS=str(params))
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "2 maps of shape (226, 226), heads [0, 1, 2, 3]" in printed
    assert sorted(os.listdir(tmp_path / "maps")) == ["attn_map_layer2.png", "attn_maps_all_layers.png"]   # layer round(2 * 2 / 3) + 1
