# VirtCloud portal. The two commands: `make demo` and `make test` (see README).
SHELL := /bin/bash
PY := .venv/bin/python
PG_URL ?= postgres://postgres@127.0.0.1:5432/test
REDIS_URL ?= redis://127.0.0.1:6379/15

.PHONY: setup demo test lint check vm-lane clean

setup:
	@scripts/setup.sh

demo: setup
	DEBUG=true EMAIL_URL=$${EMAIL_URL-console://} $(PY) manage.py demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

check: setup
	DEBUG=true $(PY) manage.py check
	d=$$(mktemp -d) && DEBUG=true DATA_DIR=$$d $(PY) manage.py makemigrations --check --dry-run; rc=$$?; rm -rf $$d; exit $$rc
	scripts/check-deploy.sh

# pytest-xdist workers: one test module each at a time (its module fixtures stay in one process); each has its own
# test database, Redis database (counting down from REDIS_URL's) and netns lab
PYTEST_WORKERS ?= 2

# The QEMU lane runs before the pytest suite, not beside it: its guest is software-emulated, and sharing the CPUs
# with the suite made it several times slower (past its 15-minute limit)
test: setup lint check
	@scripts/require-services.sh "$(PG_URL)" "$(REDIS_URL)"
	scripts/smoke-embedded.sh
	scripts/vm-lane.sh test --if-needed
	DATABASE_URL=$(PG_URL) REDIS_URL=$(REDIS_URL) .venv/bin/pytest -p no:randomly --create-db \
	  -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

vm-lane: setup
	scripts/vm-lane.sh test --if-needed

# var/ is the default DATA_DIR: a portal run on the defaults keeps its database (CA keys, accounts) there
clean:
	@if [ -s var/portal.sqlite3 ] && [ "$(FORCE)" != 1 ]; then \
	  echo "make clean: var/portal.sqlite3 holds a portal's database (accounts, CA keys); make clean FORCE=1 deletes it"; \
	  exit 1; fi
	rm -rf var .pytest_cache
