# make setup  : create .venv with everything the tests and the demo need (idempotent; quick when done)
# make test   : setup, then the whole CPU test suite (GPU tests skip themselves without CUDA)
# make demo   : setup, then the main job on the embedded default (CPU, bundled data)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup test demo demo-small bench-cpu clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# The demo: our pretrained Mamba-2 passkey model (checkpoints/passkey_mamba2, xz-compressed; unpacked into
# artifacts/) at 32K tokens, 64x its fine-tuning length, vanilla and then DeciMamba (layer 12, L_base 2000), one
# haystack per depth, the key at the start and a quarter in (CPU, ~2 minutes). demo-small: the small passkey
# model of checkpoints/passkey_small_deci at 1K-16K, or, until one is shipped, a tiny model trained for a few steps.
DEMO_M2 := checkpoints/passkey_mamba2
DEMO_CKPT := checkpoints/passkey_small_deci/model.safetensors
demo: setup
	$(PY) tools/unpack_checkpoint.py $(DEMO_M2) artifacts/passkey_mamba2
	@echo "== vanilla Mamba-2 at 32K =="
	$(PY) finetune_ssm.py --config configs/demo_mamba2.json --device cpu --run-name demo_mamba2_vanilla \
	  --set mamba_arch=vanilla --set activate_decimation=false
	@echo "== DeciMamba (decimation at layer 12) at 32K, same model and haystacks =="
	$(PY) finetune_ssm.py --config configs/demo_mamba2.json --device cpu --run-name demo_mamba2_deci

demo-small: setup
	if [ -f $(DEMO_CKPT) ]; then $(PY) finetune_ssm.py --config configs/demo_checkpoint.json --device cpu; \
	else $(PY) finetune_ssm.py --config configs/demo_config.json --device cpu; fi

bench-cpu: setup
	$(PY) benchmarks/bench_cpu_scan.py

clean:
	rm -rf $(VENV) .pytest_cache
