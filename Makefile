# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?= method=seven sparsity=0.7

.PHONY: install demo test test-fast lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $@

demo: install  ## the main job on the offline default
	$(BIN)/pruneflow $(ARGS)

# one test worker per core (pytest-xdist); JOBS=0 runs the tests one after another
JOBS ?= auto

test: install  ## the whole suite, slow end-to-end tests included (what CI runs)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal

test-fast: install
	$(BIN)/python -m pytest -q -n $(JOBS) --dist worksteal -m "not slow"

lint: install
	$(BIN)/ruff check pruneflow hydra_plugins tests scripts

clean:
	rm -rf $(VENV) outputs/.cache
