# Two commands on a fresh machine:  make demo   and   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/python -m pip
CONSTR  := constraints.txt
# Install stamp: re-installs only when the project or the pins change.
STAMP   := $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test test-slow test-all docs bench bench-quick bench-temporal bench-spectra bench-experiments clean env

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed-%: pyproject.toml $(CONSTR) | $(VENV)/bin/python
	$(PIP) install --quiet --disable-pip-version-check -c $(CONSTR) -e ".[$*]"
	touch $@

# Cockpit's BackPACK requires torchvision, which does not import beside torch 2.13.0 and, once installed,
# breaks lightning (torchmetrics imports it): the two go in without dependencies (the rest is the bench extra).
$(VENV)/.installed-bench: pyproject.toml $(CONSTR) | $(VENV)/bin/python
	$(PIP) install --quiet --disable-pip-version-check -c $(CONSTR) -e ".[bench]"
	$(PIP) install --quiet --disable-pip-version-check --no-deps -c $(CONSTR) cockpit-for-pytorch backpack-for-pytorch
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/gradprobe demo --out gradprobe-demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The slow target also runs the Ray executor against a local Ray (the ray extra, pinned in constraints.txt).
test-slow: $(VENV)/.installed-test,ray
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

test-all: $(VENV)/.installed-test,ray
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "slow or not slow"

# The documentation site, built offline into site/; a broken link or reference fails it (--strict).
docs: $(VENV)/.installed-docs
	$(BIN)/mkdocs build --strict

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_probe_overhead.py

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_probe_overhead.py --quick

bench-temporal: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_temporal.py

bench-spectra: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_spectra.py --oracle --widths 1024 2048 4096 --rounds 3 \
		--cases krylov:1:16 krylov:1:24 krylov:1:32 krylov:1:16:1e-6 lanczos:1:1

# The experiment suite's RNN trainers (issue 13 §1): one step vs a hand-written loop, Ω, 16 seeds batched.
bench-experiments: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_experiments.py

env: $(VENV)/.installed-test
	$(BIN)/gradprobe env

clean:
	rm -rf $(VENV) gradprobe-demo .pytest_cache site
