# Blumpo backend. `make run` sets everything up and serves; `make test` runs the tests.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GENERATED := blumpo/.generated
# Resolved only by the targets that need a database (it may start a private one).
DB_URL = $(shell scripts/database-url)
DBMATE = $(VENV)/bin/dbmate --migrations-dir db/migrations --schema-file db/schema.sql --wait

.PHONY: help install proto migrate rollback migrate-status schema run stop test test-faults test-pooler lint seed bench bench-scale clean

help:
	@echo "make run | stop | test | test-faults | test-pooler | lint | migrate | rollback | migrate-status | schema | seed | bench | bench-scale | proto | clean"

$(INSTALLED): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED)

# Generated code is not committed: it is made from protos/ by every target that needs it.
$(GENERATED): $(INSTALLED) $(PROTOS)
	rm -rf blumpo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos -I third_party/googleapis \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch $@

proto: $(GENERATED)

migrate: $(INSTALLED)
	DATABASE_URL='$(DB_URL)' $(DBMATE) --no-dump-schema up

rollback: $(INSTALLED)
	DATABASE_URL='$(DB_URL)' $(DBMATE) --no-dump-schema rollback

migrate-status: $(INSTALLED)
	DATABASE_URL='$(DB_URL)' $(DBMATE) status

# Regenerates db/schema.sql (after adding a migration) from a scratch database.
schema: $(INSTALLED)
	DATABASE_URL='$(DB_URL)' scripts/dump-schema

# Development mode unless BLUMPO_ENV says otherwise: a fixed OTP secret, a page-token secret made up
# per process, and login codes in the log.
run: $(GENERATED)
	@url='$(DB_URL)'; DATABASE_URL="$$url" $(DBMATE) --no-dump-schema up && \
	  DATABASE_URL="$$url" $(PY) -m scripts.development_logins && \
	  BLUMPO_ENV="$${BLUMPO_ENV:-development}" DATABASE_URL="$$url" scripts/run-services

stop:
	@for f in .data/run/*.pid; do [[ -f $$f ]] && kill -TERM $$(cat $$f) 2>/dev/null; rm -f $$f; done; true
	@if [[ -f .data/postgres/postmaster.pid ]]; then \
	  if [[ $$(id -u) == 0 ]]; then runuser -u postgres -- $$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)/pg_ctl -D .data/postgres stop; \
	  else pg_ctl -D .data/postgres stop; fi; fi

test: $(GENERATED)
	DATABASE_URL='$(DB_URL)' $(PY) -m pytest $(PYTEST_ARGS)

# Kills, cuts and a database restart under load, on a private PostgreSQL of its own.
test-faults: $(GENERATED)
	$(PY) -m pytest -m faults -s $(PYTEST_ARGS) tests/test_faults.py

# The token, generation and charging tests with the services behind PgBouncer in transaction mode.
POOLER_TESTS := tests/test_pooler.py tests/test_token_api.py tests/test_ledger_batch.py tests/test_token_concurrency.py \
  tests/test_generation_jobs.py tests/test_generation_watch.py tests/test_charging_saga.py tests/test_charge_races.py
test-pooler: $(GENERATED)
	DATABASE_URL='$(DB_URL)' scripts/with-pgbouncer $(PY) -m pytest $(PYTEST_ARGS) $(POOLER_TESTS)

lint: $(GENERATED) node_modules/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	node_modules/.bin/buf lint

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# Development data through the services' own RPCs; starts them for the while if they are not running.
seed: $(GENERATED)
	@url='$(DB_URL)'; DATABASE_URL="$$url" $(DBMATE) --no-dump-schema up >/dev/null && mkdir -p .data && \
	  DATABASE_URL="$$url" $(PY) -m scripts.development_logins && \
	  DATABASE_URL="$$url" BLUMPO_ENV="$${BLUMPO_ENV:-development}" scripts/with-services $(PY) -m scripts.seed

bench: $(GENERATED)
	DATABASE_URL='$(DB_URL)' $(PY) -m bench

# The reads and bulk jobs at 1M accounts, 10M ledger entries and 1M assets (minutes of seeding).
bench-scale: $(GENERATED)
	DATABASE_URL='$(DB_URL)' $(PY) -m bench scale

clean:
	rm -rf $(VENV) blumpo node_modules .pytest_cache .mypy_cache .ruff_cache *.egg-info
