# Developer entry points. `make run` for a local service, `make test`, `make lint`.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
LOADTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help install run test lint format bench bench-freeze bench-spread loadtest clean clean-run services-up services-down

help:
	@echo "make install    create $(VENV) and install allot with the dev and loadtest extras"
	@echo "make run        start Redis/PostgreSQL if needed, migrate, load demo data, serve"
	@echo "make test       run the test suite (PYTEST_ARGS='-k foo' to narrow it)"
	@echo "make lint       ruff check, ruff format --check, mypy"
	@echo "make loadtest   the release gate: flash crowd + conservation checks (LOADTEST_ARGS='--fault kill-worker')"
	@echo "make format     ruff format and ruff check --fix"
	@echo "make bench      allot vs a bare aiohttp handler and the naive design -> docs/performance.md"
	@echo "                then one primary vs three on a private 3+3 Redis Cluster (BENCH_ARGS='--no-cluster' skips it)"
	@echo "make bench-freeze  a 1,000,000-entry lottery through the service: freeze, draw, awards, verify-draw"
	@echo "make bench-spread  one round over 3 primaries (bench/spread) vs 1 primary: Redis CPU per claim"
	@echo "make clean      remove $(VENV) and build artefacts (keeps .run/)"
	@echo "make clean-run  stop the private servers and remove .run/"

install: $(STAMP)

# Redone only when pyproject.toml changes (or the venv is gone).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev,loadtest]'
	@touch $@

run: install
	scripts/run.sh

# One shell line, so that the exports from services.sh reach pytest. The output is captured
# in a variable first: a bare eval of a command substitution would hide a failing services.sh.
test: install
	services="$$(scripts/services.sh up)"; eval "$$services"; \
	export ALLOT_TEST_REDIS_URL="$${ALLOT_TEST_REDIS_URL:-$$ALLOT_REDIS_URL}"; \
	export ALLOT_TEST_DATABASE_URL="$${ALLOT_TEST_DATABASE_URL:-$$ALLOT_DATABASE_URL}"; \
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Not a test: measures allot against a bare aiohttp handler and the naive design, side by side,
# then one round on one primary vs three rounds on three primaries of a private Redis Cluster,
# and writes docs/performance.md. BENCH_ARGS='--duration 8 --rounds 3' by default;
# '--no-cluster' skips the cluster part, '--cluster-only' runs it alone.
bench: install
	command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	services="$$(scripts/services.sh up)"; eval "$$services"; \
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Not a test: a lottery of 1,000,000 entries over 500 sites through the service's freeze, draw,
# awards and verify-draw (and 250,000 for the 10-million projection) -> docs/performance.md.
# FREEZE_ARGS='--scaling 250000' by default; takes several minutes and ~2 GB of memory.
FREEZE_ARGS ?= --scaling 250000
bench-freeze: install
	services="$$(scripts/services.sh up)"; eval "$$services"; \
	$(BIN)/python bench/freeze_scale.py --update-doc docs/performance.md $(FREEZE_ARGS)

# The release gate: a flash crowd against a fresh self-hosted service, then conservation checks
# (docs/loadtest.md). Exit 0 only when every check holds; the report lands in loadtest/reports/.
loadtest: install
	services="$$(scripts/services.sh up)"; eval "$$services"; \
	$(BIN)/allot loadtest $(LOADTEST_ARGS)

services-up:
	@scripts/services.sh up

services-down:
	@scripts/services.sh down

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./.run -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

clean-run:
	scripts/services.sh down
	rm -rf .run

# Not a test: one round spread over 3 primaries (bench/spread, docs/scaling.md) against the same
# round on 1 primary with lua/claim.lua, side by side on a private 3+3 Redis Cluster: Redis CPU
# per claim by primary and script, and the implied ceilings. BENCH_SPREAD_ARGS='--rounds 3'.
BENCH_SPREAD_ARGS ?=
bench-spread: install
	$(BIN)/python -m bench.spread $(BENCH_SPREAD_ARGS)
