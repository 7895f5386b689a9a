# Every target does its own setup on a fresh machine: venv, pip, Debian packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# e.g. make run RUN_ARGS='--port 8001 --loop-mode running_loop'
RUN_ARGS ?=
# e.g. make matrix MATRIX_ARGS='--shard 2/3 --report reports/shard-2/matrix.json' (docs/ci.md)
MATRIX_ARGS ?=
# make merge: the directories (or files) of the shards' reports, and where the merge goes.
SHARDS ?= reports/shards
MERGE_REPORT ?= reports/merged/matrix.json
# Keep Python's bytecode, outside the source tree. Machines here export PYTHONDONTWRITEBYTECODE=1:
# every process (pytest, each xdist worker, each Celery worker) then compiles the project from
# source, and pytest re-rewrites the asserts of every plugin package's modules, 1-3 s per process.
# With a cache prefix the tree still gets no __pycache__ directories.
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache
unexport PYTHONDONTWRITEBYTECODE

# The main tier of `make test` runs on the local backend (binaries on free ports, ~0.8 s to a
# ready stack); the docker tier (scripts/docker-tier.sh) runs the docker and compose backends
# where an engine answers. TEST_SERVICES=auto would run the whole suite in containers.
TEST_SERVICES ?= local

.PHONY: help setup system-deps lint test test-main test-docker matrix merge run flake stress bench clean

help:
	@echo "make matrix   run the default loop-mode x pool x broker matrix (the main job):"
	@echo "              reports/matrix.{json,html,md} and reports/matrix-junit.xml"
	@echo "make merge    join the shards' reports (SHARDS=dirs) into one (MERGE_REPORT)"
	@echo "make test     run every test (lint, unit, integration, scenarios, browser; the"
	@echo "              docker tier too where a Docker engine answers)"
	@echo "make run      start the whole stack by hand on 127.0.0.1:8000"
	@echo "make flake    run the default matrix 20 times and report every non-pass"
	@echo "make stress   the matrix and the fault scenarios 10 times under a CPU hog"
	@echo "make bench    run the benchmarks (results go to docs/benchmarks.md by hand)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

system-deps:
	@scripts/install-system-deps.sh

setup: system-deps $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: setup lint test-main test-docker

# worksteal: the other xdist worker takes over tests queued behind a long one (the pre-fix proof).
# --pool all: the gevent cells and the in-flight runs on gevent are part of every test run.
# --harness-report: the suite's JSON, JUnit XML, HTML and Markdown in reports/test/ (docs/ci.md).
test-main: setup
	HARNESS_SERVICES=$(TEST_SERVICES) $(VENV)/bin/pytest -n 2 --dist worksteal -m "not docker" --pool all --harness-report=reports/test/matrix.json $(PYTEST_ARGS)

# Runs only where a Docker engine answers; says so and passes where none does.
test-docker: setup
	VENV=$(VENV) scripts/docker-tier.sh

matrix: setup
	$(VENV)/bin/harness matrix $(MATRIX_ARGS)

# Needs only the Python packages: no servers, no browser.
merge: $(STAMP)
	$(VENV)/bin/harness report merge $(SHARDS) --report $(MERGE_REPORT)

run: setup
	$(PY) -m app $(RUN_ARGS)

flake: setup
	$(PY) -m harness flake --runs 20

stress: setup
	HARNESS_SERVICES=$(TEST_SERVICES) $(PY) -m harness stress --runs 10

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) reports .pytest_cache .mypy_cache .ruff_cache
