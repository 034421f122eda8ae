"""Fixtures shared by every app: the named users of the test suite.

alice owns clusters, bob is a member of alice's group, charlie is an outsider, root is an admin.
"""

import os

import pytest
from django.contrib.auth.models import Group, User


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """Every test starts with no request counted against the API's rate limits (portal.throttle)."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def team(db):
    return Group.objects.create(name="physics")


@pytest.fixture
def alice(db, team):
    user = User.objects.create_user("alice", "alice@example.org", "alice-password")
    user.groups.add(team)
    return user


@pytest.fixture
def bob(db, team):
    user = User.objects.create_user("bob", "bob@example.org", "bob-password")
    user.groups.add(team)
    return user


@pytest.fixture
def charlie(db):
    return User.objects.create_user("charlie", "charlie@example.org", "charlie-password")


@pytest.fixture
def root(db):
    return User.objects.create_superuser("root", "root@example.org", "root-password")


# --- a real Celery worker ------------------------------------------------------------------------------------


def _database_url(settings_dict: dict) -> str:
    from urllib.parse import quote

    user = quote(settings_dict.get("USER") or "")
    password = quote(settings_dict.get("PASSWORD") or "")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or 5432
    return f"postgres://{auth}{host}:{port}/{settings_dict['NAME']}"


@pytest.fixture
def celery_worker(transactional_db, tmp_path):
    """A real Celery worker (threads pool) consuming from Redis, on the same PostgreSQL test database; the
    test's own ``delay()`` calls go through the broker (not eager) while it runs. Needs PostgreSQL + Redis."""
    from django.conf import settings
    from django.db import connection

    from portal.celery import app

    if connection.vendor != "postgresql" or not settings.CELERY_BROKER_URL.startswith("redis://"):
        pytest.skip("the real-worker tests need PostgreSQL and Redis (run `make test`)")
    import redis

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings_test",
        "DATABASE_URL": _database_url(connection.settings_dict),
        "CELERY_TASK_ALWAYS_EAGER": "false",
        "PGAPPNAME": "virtcloud-test-worker",  # its sessions, told apart in pg_stat_activity
    }
    from portal.testing_celery import WorkerProcess

    worker = WorkerProcess(env, tmp_path / "worker.log")
    from network.models import Host

    # The worker stands in for the host agents too: it consumes every host's queue.
    worker.queues += sorted(set(Host.objects.exclude(agent_queue="").values_list("agent_queue", flat=True)))
    app.conf.task_always_eager = False
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        app.conf.task_always_eager = True
