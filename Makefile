# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
# Transparent huge pages for malloc: XLA:CPU maps fresh buffers every step, and with 4 KiB pages the
# page faults cost ~25% of a CPU step (BENCHMARKS.md, "CPU memory pages"). No effect where THP is off.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test ablation lint

$(VENV)/.core-installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: $(VENV)/.core-installed requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

demo: $(VENV)/.core-installed
	$(PY) -m clippy_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q tests

ablation: $(VENV)/.core-installed
	$(PY) -m clippy_jax.ablation --config=configs/demo.py --workdir=workdirs/ablation

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check clippy_jax tests configs benchmarks
