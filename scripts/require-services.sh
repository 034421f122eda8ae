#!/usr/bin/env bash
# The test suite needs PostgreSQL (concurrency tests) and Redis (the real Celery worker). Say clearly how to
# get them when they are not there.
set -uo pipefail
cd "$(dirname "$0")/.."
pg=$1; redis=$2
if ! .venv/bin/python - "$pg" <<'PY'
import sys, psycopg
try:
    psycopg.connect(sys.argv[1].replace("postgres://", "postgresql://"), connect_timeout=3).close()
except Exception as exc:
    sys.exit(f"{exc}")
PY
then
  echo "make test needs PostgreSQL at $pg (trust auth, database 'test')." >&2
  echo "  Start one:  pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
  echo "  (not installed: apt-get install postgresql, then allow trust for 127.0.0.1 and createdb test)" >&2
  echo "  or point PG_URL at yours:  make test PG_URL=postgres://user@host:5432/db" >&2
  exit 1
fi
if ! .venv/bin/python - "$redis" <<'PY'
import sys, redis
try:
    redis.Redis.from_url(sys.argv[1], socket_connect_timeout=3).ping()
except Exception as exc:
    sys.exit(f"{exc}")
PY
then
  echo "make test needs Redis at $redis for the Celery worker tests." >&2
  echo "  Start one:  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ''" >&2
  echo "  (not installed: apt-get install redis-server)" >&2
  echo "  or point REDIS_URL at yours:  make test REDIS_URL=redis://host:6379/15" >&2
  exit 1
fi
