# nbdfabric: `make demo` runs the main job, `make test` the whole suite. Both install what they
# need first (apt packages, the venv, pip dependencies) through `make setup`.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint typecheck proto proto-check compose-check bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

proto: setup
	@bash scripts/gen-proto.sh

proto-check: setup
	@bash scripts/gen-proto.sh --check
	$(VENV)/bin/buf lint proto

compose-check: setup
	@bash compose/gen.sh --check

test: setup lint typecheck proto-check compose-check
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
