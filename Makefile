# Two commands a newcomer needs: `make demo` (train the embedded default) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: install demo test test-heavy test-fast golden lint clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,data,aot,interop,profile,track]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m voltron_jax.main --config=configs/recipe_tiny.py --workdir=runs/demo

test: $(STAMP)
	$(PY) -m ruff check voltron_jax configs launch benchmarks tests
	$(PY) -m pytest -q -n 2 --durations=15 -m "not heavy" tests

test-heavy: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=5 -m heavy tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=10 -m "not slow and not heavy" tests

# Rewrite tests/golden/curves.json when a change is meant to move the golden loss curves (say so in the commit).
golden: $(STAMP)
	VOLTRON_UPDATE_GOLDEN=1 $(PY) -m pytest -q -p no:xdist tests/test_golden_curves.py

lint: $(STAMP)
	$(PY) -m ruff check voltron_jax configs launch benchmarks tests
	$(PY) -m ruff format --check voltron_jax configs launch benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache
