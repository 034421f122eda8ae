"""``GET /api/status/``: whether a cluster asked for now would be provisioned — the broker, a worker on every queue
the devices need (asked of the real workers), beat — so a scheduler holds its jobs instead of waiting out the
provisioning timeout. A real Celery worker on Redis and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from network.models import Host
from network.tests.fakefabric import build_fabric
from portal.models import PeriodicRun, TokenScope
from portal.status import provisioning_status
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_status_follows_the_workers_and_beat(celery_worker, tmp_path, settings):
    build_fabric(tmp_path / "devices")
    status = provisioning_status(fresh=True)
    assert (status["status"], status["broker"], status["queues_without_worker"], status["hosts_unusable"]) == (
        "ok",
        True,
        [],
        [],
    )
    assert status["beat"]["ok"] is None  # (beat has not run clusters.expire here)

    # A host's agent that nobody runs: that host is unusable, the rest goes on.
    Host.objects.filter(name="prague2").update(agent_queue="host.prague2")
    status = provisioning_status(fresh=True)
    assert (status["status"], status["queues_without_worker"], status["hosts_unusable"]) == (
        "degraded",
        ["host.prague2"],
        ["prague2"],
    )
    Host.objects.filter(name="prague2").update(agent_queue="")

    # beat late: clusters.expire last succeeded more than three intervals ago
    late = timezone.now() - timedelta(seconds=4 * settings.CLUSTER_EXPIRY_INTERVAL)
    PeriodicRun.objects.create(task="clusters.expire", last_success_at=late)
    status = provisioning_status(fresh=True)
    assert status["status"] == "degraded" and status["beat"]["ok"] is False
    PeriodicRun.objects.filter(task="clusters.expire").update(last_success_at=timezone.now())
    assert provisioning_status(fresh=True)["beat"]["ok"] is True

    # The only worker stops: nothing would be provisioned.
    celery_worker.stop()
    status = provisioning_status(fresh=True)
    assert status["status"] == "down" and settings.CELERY_TASK_DEFAULT_QUEUE in status["queues_without_worker"]
    assert set(status["hosts_unusable"]) == set(Host.objects.values_list("name", flat=True))


def test_the_endpoint_answers_schedulers_and_keeps_its_answer(alice, settings, monkeypatch):
    from portal import status as module

    calls = []

    def check():
        calls.append(1)
        return {
            "status": "ok",
            "checked_at": timezone.now(),
            "broker": True,
            "queues_without_worker": [],
            "hosts_unusable": [],
            "beat": {"ok": None, "last_success_age": None, "interval": 60.0},
        }

    monkeypatch.setattr(module, "_check", check)
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "status"}}
    _, read = token_create(user=alice, name="r", scopes=[TokenScope.CLUSTERS_READ])
    _, gateway = token_create(user=alice, name="g", scopes=[TokenScope.GATEWAY])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {read}")
    first = api.get("/api/status/")
    assert first.status_code == 200 and first.data["status"] == "ok" and first["Cache-Control"] == "no-store"
    assert api.get("/api/status/").data["checked_at"] == first.data["checked_at"] and len(calls) == 1  # (kept)
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {gateway}")
    assert api.get("/api/status/").status_code == 403
    assert APIClient().get("/api/status/").status_code == 401


def test_one_request_asks_the_workers_when_the_answer_is_due(settings, monkeypatch):
    """Schedulers polling together: one of them broadcasts to the workers, the others take its answer."""
    import threading
    import time

    from portal import status as module

    calls = []

    def check():
        calls.append(1)
        time.sleep(0.3)
        return {"status": "ok"}

    monkeypatch.setattr(module, "_check", check)
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "herd"}}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(provisioning_status())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [{"status": "ok"}] * 6 and len(calls) == 1
