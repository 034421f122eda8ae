#!/usr/bin/env bash
# `manage.py check --deploy` with production-like settings must be clean (no warnings).
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
out=$(DEBUG=false SECRET_KEY=$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n') \
  SECRETS_KEY=$(.venv/bin/python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())') \
  ACCESS_CA_PASSPHRASE=$(head -c 32 /dev/urandom | base64) ALLOWED_HOSTS=portal.example.org DATA_DIR="$data" \
  SITE_URL=https://portal.example.org \
  DATABASE_URL=postgres://portal@db.example.org/portal CELERY_BROKER_URL=redis://redis.example.org:6379/0 \
  .venv/bin/python manage.py check --deploy --fail-level WARNING 2>&1) || { echo "$out"; exit 1; }
echo "$out"
