"""Database connections of a real worker: kept from task to task (CONN_MAX_AGE), as a web worker keeps
them from request to request, and replaced when broken. Celery's Django fix-up alone closes them before
and after every task, so each task paid a new PostgreSQL backend."""

import pytest
from django.db import connection

from clusters import tasks

pytestmark = pytest.mark.django_db(transaction=True)


def _sessions() -> int:
    """Sessions ever established to the test database (PostgreSQL ≥ 14)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        (count,) = cursor.fetchone()
    return count


def _run(times: int) -> None:
    for _ in range(times):
        assert tasks.prune_events.delay().get(timeout=30) == 0  # a task that queries the database


def test_a_worker_keeps_its_connections_between_tasks(celery_worker, settings):
    assert settings.DATABASES["default"]["CONN_MAX_AGE"] > 0
    _run(3)  # the worker's threads connect
    before = _sessions()
    _run(3 * celery_worker.concurrency)
    opened = _sessions() - before
    # one connection per worker thread at most (the statistics lag a little: PostgreSQL counts a session
    # when it ends or at the next report), not one per task
    assert opened <= celery_worker.concurrency, opened


def test_a_broken_connection_is_replaced_before_the_next_task(celery_worker):
    _run(2)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s",
            [celery_worker.env["PGAPPNAME"]],
        )
        assert cursor.fetchall(), "the worker has no connection to break"
    _run(2 * celery_worker.concurrency)  # every thread's next task finds its connection dead, and reconnects


def test_a_starting_worker_imports_the_drivers_and_freezes_its_startup_objects():
    """``worker_ready`` (and a prefork child's ``worker_process_init``): the drivers are imported before the
    first task, and what is alive then is out of the cyclic collector's reach (``gc.freeze``)."""
    import gc
    import sys

    from celery import signals

    from portal import celery as module

    connected = {
        signal: [receiver() for _key, receiver in signal.receivers]
        for signal in (signals.worker_ready, signals.worker_process_init)
    }
    assert all(module._warm_and_freeze in receivers for receivers in connected.values()), connected
    sys.modules.pop("network.drivers.ovs_host", None)
    gc.unfreeze()  # (another module's start-up, a web worker's, may have frozen this process already)
    assert gc.get_freeze_count() == 0
    try:
        module._warm_and_freeze()
        assert "network.drivers.ovs_host" in sys.modules and "napalm" in sys.modules
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_a_starting_web_worker_imports_every_view_and_freezes_its_startup_objects(monkeypatch):
    """``portal.wsgi`` (what gunicorn imports in each worker): every view is imported before the first
    request (the URLconf's patterns are loaded), and what is alive then is out of the cyclic collector's reach."""
    import gc

    import django.urls

    from portal import wsgi

    loaded = []
    real = django.urls.get_resolver

    def resolver(*args):
        found = real(*args)
        loaded.append(len(found.url_patterns))
        return found

    monkeypatch.setattr(django.urls, "get_resolver", resolver)
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        wsgi._warm_and_freeze()
        assert loaded and loaded[0] > 5
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
