# Two set-up commands on a fresh clone: `make demo` and `make test`. Everything else is reached from them.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LAKE ?= ./lake
# A new Prefect server's telemetry heartbeat races the first migrations on SQLite
# ("database is locked"); it sends nothing useful offline anyway.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install demo test lint fmt emulator clean bench bench-cli bench-validate reliability

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tryon run sample/manifest.csv --emulator --provider changeclothes --lake $(LAKE) --allow-row-errors

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

emulator: $(STAMP)
	$(BIN)/tryon emulator --port 8765

bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-cli: $(STAMP)
	$(BIN)/python -m bench.cli

reliability: $(STAMP)
	$(BIN)/python -m bench.reliability

bench-validate: $(STAMP)
	$(BIN)/python -m bench.validate

clean:
	rm -rf $(LAKE) .pytest_cache .ruff_cache
