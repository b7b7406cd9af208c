# Two entry points for users: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test quick lint typecheck pytest sysdeps bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/staple demo

# System programs the interop tests drive (openssl, curl, gnutls-cli); installed with apt when root.
sysdeps:
	@bash .ci/sysdeps

lint: $(STAMP)
	$(BIN)/ruff check staple tests examples bench twisted
	$(BIN)/ruff format --check staple tests examples bench twisted

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: sysdeps lint typecheck pytest

# The inner loop: everything but subprocess servers, soaks, fuzzing and crash loops (< 1 min).
quick: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
