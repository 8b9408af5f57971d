# kd_nnp — two commands on a fresh machine: `make install`, then `make demo` / `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# CPU torch by default (a local wheel on the dev machines; a small download elsewhere).
# GPU users: `make install TORCH_SPEC=` (keep whatever torch pip picks) or TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := $(VENV)/torch-constraint.txt
# one BLAS/OpenMP thread per process unless the user says otherwise (see docs/performance.md)
export OMP_NUM_THREADS ?= 1
export OPENBLAS_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
PYTEST_ARGS ?=

.PHONY: help install demo demo-quick test test-full lint bench clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)  ## create .venv, install pinned CPU torch first, then kd_nnp with all extras
	$(PIP) install --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then \
	  $(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) ; \
	fi
	$(PY) -c "import torch; print('torch', torch.__version__)" && \
	  $(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) -e ".[teachers,dev]"
	$(PY) -c "import kd_nnp, chgnet, lightning, hydra; print('kd_nnp', kd_nnp.__version__, 'ready')"

demo:  ## the main job: distil the default teacher into CHGNet and benchmark it (< 30 min on 2 cores)
	$(VENV)/bin/kd-nnp demo

demo-quick:  ## a ~1-minute smoke version of the demo
	$(VENV)/bin/kd-nnp demo demo=quick

test:  ## fast test suite (< 15 min on 2 cores)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-full:  ## every test, the slow ones included
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint:  ## ruff
	$(PY) -m ruff check kd_nnp tests experiments
	$(PY) -m ruff format --check kd_nnp tests experiments

bench:  ## performance benchmarks, one table (< 20 min; BENCH_ARGS=--quick: < 3 min; see docs/performance.md)
	$(PY) experiments/bench/run_all.py $(BENCH_ARGS)

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf outputs multirun runs .pytest_cache .ruff_cache
