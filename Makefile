# Two entry points: `make up` runs the main job, `make test` runs every check CI runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up demo test lint typecheck pytest sysdeps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# extra flags for cpi up: make up ARGS="--base-port 9700"
ARGS ?=

up: $(STAMP)
	$(BIN)/cpi up --demo $(ARGS)

demo: $(STAMP)
	$(BIN)/cpi demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy schemas registry resolver cpi seeds bench examples && $(BIN)/mypy -p tools

sysdeps:
	bash tools/sysdeps.sh

pytest: $(STAMP) sysdeps
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	for b in bench/verify.py bench/register.py bench/claims.py bench/audit.py bench/resolve.py bench/dns.py bench/witness.py bench/listing.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .cpi .pytest_cache .mypy_cache .ruff_cache
