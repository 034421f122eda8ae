"""Test settings: production settings with throwaway keys, a fast hasher and no TLS redirect."""

import os

from django.core.exceptions import ImproperlyConfigured

os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production-0123456789abcdef")
os.environ.setdefault("SECRETS_KEY", "1b8NqwoUqaIVz7W6XI-MVmQ5IT9b4u1ZlG5x8c3mvX0=")
os.environ.setdefault("ACCESS_CA_PASSPHRASE", "test-ca-passphrase-not-for-production")
os.environ.setdefault("SECURE_SSL_REDIRECT", "false")
os.environ.setdefault("SESSION_COOKIE_SECURE", "false")
os.environ.setdefault("CSRF_COOKIE_SECURE", "false")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
# A test sees a gateway's pull at the next allocation (the cache has a test of its own).
os.environ.setdefault("VLAN_REUSE_HORIZON_TTL", "0")

from portal.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
# the webhook tests' receivers listen on this machine (a test of the refusal empties it)
WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]
WEBHOOK_USER_ALLOWED_NETWORKS = ["127.0.0.0/8", "::1/128"]  # (the tests' receivers are on loopback)
CELERY_TASK_ALWAYS_EAGER = os.environ.get("CELERY_TASK_ALWAYS_EAGER", "true").lower() == "true"

# SQLite: a test database in a file, as in production, so that a connection meeting another's write lock
# waits (the ``timeout`` option) — Django's default in-memory shared-cache test database answers it at once
# with "database table is locked". One file per pytest-xdist worker.
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"].setdefault("TEST", {}).setdefault(  # noqa: F405
        "NAME",
        str(DATA_DIR / f"test-{os.environ.get('PYTEST_XDIST_WORKER') or 'gw0'}.sqlite3"),  # noqa: F405
    )

# Each pytest-xdist worker gets its own Redis database, counting down from the one REDIS_URL names (a worker
# test flushes it), so real-worker tests running in parallel never take each other's messages. Tests run
# eagerly unless a test starts a real worker (conftest.celery_worker).
if os.environ.get("REDIS_URL"):
    _base, _db = os.environ["REDIS_URL"].rsplit("/", 1)
    _index = int((os.environ.get("PYTEST_XDIST_WORKER") or "gw0")[2:] or 0)
    if int(_db or 0) < _index:
        raise ImproperlyConfigured(f"REDIS_URL: database {_db or 0} leaves none for pytest-xdist worker {_index}")
    CELERY_BROKER_URL = CELERY_RESULT_BACKEND = f"{_base}/{int(_db or 0) - _index}"
    # The killed-worker tests wait for redelivery: short visibility timeout, frequent restore sweeps.
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": 4,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

# The rate-limit counters in this process's memory, emptied before each test (conftest): tests of different
# pytest-xdist workers share user ids, and must not count each other's requests in a shared Redis.
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
