#!/usr/bin/env bash
# Smoke test of the embedded default: SQLite + kombu's filesystem broker + a real Celery worker, end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATA_DIR=$(mktemp -d /tmp/virtcloud-smoke.XXXXXX) DEBUG=true
unset DATABASE_URL CELERY_BROKER_URL CELERY_RESULT_BACKEND
worker=
trap '[ -n "$worker" ] && { kill $worker 2>/dev/null; wait $worker 2>/dev/null; }; rm -rf "$DATA_DIR"' EXIT
.venv/bin/python manage.py migrate -v0
.venv/bin/celery -A portal worker -l WARNING --pool=solo --without-heartbeat --without-mingle --without-gossip \
  >"$DATA_DIR/worker.log" 2>&1 &
worker=$!
.venv/bin/python manage.py smoke
