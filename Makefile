# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv, installs the CPU
# build of torch first (an unpinned torch would pull GBs of CUDA), then the project, then runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-slow bench-deps clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/mediff demo --out mediff-demo --overwrite

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: setup
	$(PY) -m pytest; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-slow: setup
	$(PY) -m pytest -m slow

# External reference of benchmarks/mri.py (--external deepinv-dps): deepinv without its declared
# torchvision dependency (PyPI torchvision pulls a CUDA torch); benchmarks/deepinv_ref.py explains.
bench-deps: setup
	$(PY) -m pip install -q --no-deps deepinv==0.5.0 torchmetrics==1.9.0 lightning-utilities==0.15.3 \
	  tqdm==4.70.1 natsort==8.4.0

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
