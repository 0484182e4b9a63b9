# ptutils developer commands. `make install` then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install dev test test-fast lint bench clean example

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# `make install`: what `ptutils run` needs; `make dev`: plus test and lint tools.
install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

$(VENV)/.installed: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[data,plot]" "$(TORCH)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,data,plot,export]" "$(TORCH)"
	touch $@

test: dev
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: dev
	$(VENV)/bin/ruff check ptutils workers orchestrator tests bench examples

bench: dev
	$(PY) -m bench

example: install
	$(VENV)/bin/ptutils run examples/digits_mlp.yaml --name digits-mlp --store ./ptutils-runs --force

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache ptutils-runs
