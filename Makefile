# nbdfabric: `make demo` runs the main job, `make test` the whole suite. Both install what they
# need first (apt packages, the venv, pip dependencies) through `make setup`.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test prebuild-image lint typecheck proto proto-check compose-check bench clean

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

# The bounded slow runs: the fuzz run (tests/test_fuzz_nodes.py) takes this many seconds per
# node shape (103 shapes; unset: 4 s for the first eleven, 1 s for the others, about 4
# minutes in all), the chaos soak (tests/test_soak.py) per fabric (4);
# `make test NBDFABRIC_FUZZ_SECONDS=120` for a longer one, NBDFABRIC_FUZZ_SEED=N or
# NBDFABRIC_SOAK_SEED=N to replay the seed a failure printed.
NBDFABRIC_FUZZ_SECONDS ?=
NBDFABRIC_SOAK_SECONDS ?= 20
export NBDFABRIC_FUZZ_SECONDS NBDFABRIC_SOAK_SECONDS

# One pytest worker per core and one more (at most 4), a test file per worker at a time: a
# file's tests share its module fixtures (the image), and a worker often waits (on the docker
# image build, node processes, sleeps), which left about a third of 2 cores idle with 2. Four
# on 2 cores measured slower than three (21:25 against 19:40): every test ran some 40 % longer.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -ge 4 ] && echo 4 || echo $$((n + 1)))
test: setup lint typecheck proto-check compose-check prebuild-image
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=25 tests

# The docker tests' image (a few minutes on a fresh machine), built beside the first tests
# instead of in front of the docker tests: they come later in the run (tests/conftest.py) and
# wait for this build (scripts/build-image.sh takes a lock). Log: $(PREBUILD_LOG).
PREBUILD_LOG ?= $(or $(TMPDIR),/tmp)/nbdfabric-prebuild-image.log
prebuild-image: setup
	@if docker info >/dev/null 2>&1; then \
		echo "building the docker image in the background (log: $(PREBUILD_LOG))"; \
		(scripts/build-image.sh >$(PREBUILD_LOG) 2>&1 &); \
	fi

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
