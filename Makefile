# Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test lint type imports unit cov bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## make dev: the embedded default (OpenBao dev server, sandbox exchange, daemon, demo key and worker)
dev: $(STAMP)
	$(BIN)/backpack-vault dev

## make test: lint, type-check, import contracts, the whole test suite against real servers,
## then every benchmark in its quick mode (a bench that fails fails the target)
test: lint type imports unit bench-quick

lint: $(STAMP)
	$(BIN)/ruff check service tests bench examples scripts
	$(BIN)/ruff format --check service tests bench examples scripts

type: $(STAMP)
	$(BIN)/mypy

imports: $(STAMP)
	$(BIN)/lint-imports

# pytest runs in PYTEST_JOBS processes (pytest-xdist; each starts its own OpenBao dev server).
# COVERAGE_PROCESS_START makes every Python process the tests start measure itself too.
PYTEST_JOBS ?= 2
unit: $(STAMP)
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml \
	    $(BIN)/coverage run -m pytest -n $(PYTEST_JOBS) $(PYTEST_ARGS)
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

cov: unit

## make bench: every benchmark, full size (minutes); bench-quick: each in a few seconds
bench: $(STAMP)
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

bench-quick: $(STAMP)
	for b in bench/*.py; do echo "== $$b --quick"; $(BIN)/python $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .coverage .coverage.* .mypy_cache .pytest_cache .ruff_cache build dist
