# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
# Transparent huge pages for malloc: XLA:CPU maps fresh buffers every step, and with 4 KiB pages the
# page faults cost ~25% of a CPU step (BENCHMARKS.md, "CPU memory pages"). No effect where THP is off.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test ablation lint

# The package is installed editable (`pip install -e .`, dependencies from requirements.txt), so that
# `import clippy_jax` and the console commands (clippy-train, clippy-segment, ...) work from any folder.
# setuptools' "Editable installation" note (a box of asterisks, not an error) is filtered out.
NO_EDITABLE_NOTE := PYTHONWARNINGS="ignore:Editable installation"

$(VENV)/.core-installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(NO_EDITABLE_NOTE) $(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.core-installed requirements-test.txt requirements-convert.txt requirements-aot.txt
	$(NO_EDITABLE_NOTE) $(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.core-installed
	$(PY) -m clippy_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q tests

ablation: $(VENV)/.core-installed
	$(PY) -m clippy_jax.ablation --config=configs/demo.py --workdir=workdirs/ablation

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check clippy_jax tests configs benchmarks
