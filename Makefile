# Two commands do all set-up on a fresh machine with Python 3.11+ and make:
#   make demo   creates .venv, installs, runs a real campaign on the local sandbox
#   make test   creates .venv, installs, lints, type-checks and runs the test suite
#   make serve  the operator's mode: Prefect server, sandbox, worker and every deployment
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=

export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo serve test install lint typecheck pytest clean sandbox-up sandbox-down bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Fast path: uv from PyPI; fallback: plain pip.
$(STAMP): pyproject.toml | $(BIN)/python
	@if $(BIN)/python -m pip install -q uv && $(BIN)/uv pip install --python $(BIN)/python -e '.[dev]'; then \
	  echo "installed with uv"; \
	else \
	  echo "uv unavailable: installing with pip"; \
	  $(BIN)/python -m pip install -e '.[dev]'; \
	fi
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/recapito demo $(ARGS)

serve: install
	$(BIN)/python -m recapito.serve $(ARGS)

test: install lint typecheck pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest $(ARGS)

sandbox-up: install
	$(BIN)/recapito sandbox up

sandbox-down: install
	$(BIN)/recapito sandbox down

bench: install
	$(BIN)/python benchmarks/delivery.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
