"""The shipped Mamba-2 passkey model (checkpoints/passkey_mamba2, what `make demo` runs): its xz archive
unpacks to the recorded digest and nothing else, its weights keep A_log, D and dt_bias in fp32, and it
retrieves passkeys through the demo config, with decimation at 32K (CPU, about 40 s)."""
import hashlib
import json
import os
import shutil

import pytest
from safetensors import safe_open

from tests.helpers import checkpoint_eval
from tools import unpack_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "checkpoints", "passkey_mamba2")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SRC, "model.safetensors.xz")),
                                reason="no shipped Mamba-2 checkpoint")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("m2") / "passkey_mamba2")
    assert unpack_checkpoint.main([SRC, dest]) == 0
    return dest


def test_unpacks_to_the_recorded_digest_and_keeps_fp32_parameters(unpacked):
    want = open(os.path.join(SRC, "model.safetensors.sha256")).read().split()[0]
    with open(os.path.join(unpacked, "model.safetensors"), "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == want
    assert unpack_checkpoint.unpack(SRC, unpacked) == "present"          # a second unpack is a no-op
    cfg = json.load(open(os.path.join(unpacked, "config.json")))
    assert cfg["ssm_cfg"] == {"layer": "Mamba2", "d_state": 128, "headdim": 32} and cfg["n_layer"] == 24
    with safe_open(os.path.join(unpacked, "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    kept = {k: v for k, v in dtypes.items() if k.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")}
    assert len(kept) == 3 * 24 and set(kept.values()) == {"F32"}
    assert {v for k, v in dtypes.items() if k not in kept} == {"BF16"}


def test_unpack_refuses_a_wrong_digest_and_other_weights(tmp_path, unpacked, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(SRC, "config.json"), src)
    os.symlink(os.path.join(SRC, "model.safetensors.xz"), src / "model.safetensors.xz")
    (src / "model.safetensors.sha256").write_text("0" * 64 + "  model.safetensors\n")
    assert unpack_checkpoint.main([str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not the recorded 0000000000000000" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out" / "model.safetensors")   # nothing half-written is left
    assert not os.path.exists(tmp_path / "out" / "model.safetensors.part")
    assert unpack_checkpoint.main([str(src), unpacked]) == 1            # a DEST with other weights: refused
    assert "exists with other weights" in capsys.readouterr().err


def _eval(tmp_path, unpacked, name, *sets):
    return checkpoint_eval(tmp_path, os.path.join(ROOT, "configs", "demo_mamba2.json"), unpacked, name, *sets)


def test_retrieves_at_its_fine_tuning_scale_and_with_decimation_at_32k(tmp_path, unpacked):
    # On the H200 (fp32 training checkpoint; this is its bf16 export) the vanilla fine-tune read 25/25 keys at 1K
    # and, with decimation at layer 12 (L_base 2000), 25/25 at 32K (benchmarks/results/repro_gutenberg_mamba2_d128/).
    # A broken load, config or decimation path reads ~0 (chance of a 5-digit key: 1e-5 per prompt).
    short = _eval(tmp_path, unpacked, "short", "mamba_arch=vanilla", "activate_decimation=false",
                  "niah_context_lens_eval=[1000]", "niah_needle_depths_eval=[0, 0.5, 1]")
    assert sum(r["correct"] for r in short) >= 2, [r["responses"] for r in short]    # 3 prompts, one miss allowed
    long = _eval(tmp_path, unpacked, "deci32k", "niah_needle_depths_eval=[0]")
    assert long[0]["ctx_len"] == 32000 and long[0]["correct"] == 1, long[0]["responses"]
    assert json.load(open(tmp_path / "deci32k" / "config.json"))["decimating_layers"] == [12]
