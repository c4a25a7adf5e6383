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

.PHONY: setup test demo bench-cpu clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# With a shipped checkpoint (checkpoints/passkey_small_deci/), the demo evaluates it at 1K-16K;
# until one is shipped it trains a tiny model for a few steps and evaluates that.
DEMO_CKPT := checkpoints/passkey_small_deci/model.safetensors
demo: setup
	if [ -f $(DEMO_CKPT) ]; then $(PY) finetune_ssm.py --config configs/demo_checkpoint.json --device cpu; \
	else $(PY) finetune_ssm.py --config configs/demo_config.json --device cpu; fi

bench-cpu: setup
	$(PY) benchmarks/bench_cpu_scan.py

clean:
	rm -rf $(VENV) .pytest_cache
