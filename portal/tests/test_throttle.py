"""Rate limits of the costly writes (portal.throttle): per user, unsafe requests only, 429 with Retry-After and
nothing done; the browser's downloads counted with the API's; a cache that is down lets requests through."""
# ruff: noqa: F401, F811 (pytest fixtures imported from their apps' test modules are parameters here)

from __future__ import annotations

import logging

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from rest_framework.test import APIClient

from access.models import Credential
from access.tests.fixtures import cluster, gateway
from clusters.models import Image, VirtualCluster
from network.models import VlanAllocation
from network.tests.fakefabric import fabric_fixture
from portal.settings import _rates

pytestmark = pytest.mark.django_db(transaction=True)


def api_for(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def test_credentials_past_the_rate_are_a_429_that_issues_nothing(settings, alice, bob, cluster, gateway):
    settings.API_THROTTLE_RATES = {"credentials": "3/min"}
    api = api_for(alice)
    for _ in range(3):
        assert api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json").status_code == 200
    refused = api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json")
    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled" and 1 <= int(refused["Retry-After"]) <= 60
    assert Credential.objects.filter(user=alice).count() == 3
    ssh = api.post("/api/access/ssh-certificates/", {"cluster": cluster.pk}, format="json")
    assert ssh.status_code == 429  # the same scope: a user's credentials together
    assert api.get("/api/access/credentials/").status_code == 200  # reads are never counted
    assert api_for(bob).post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json").status_code == 200

    # the browser's download is counted with the API's: the page again, with a message, 429 and Retry-After
    browser = Client()
    browser.force_login(alice)
    page = browser.post("/access/vpn-profile/", {"clusters": [cluster.pk]})
    assert page.status_code == 429 and page["Retry-After"]
    assert "Too many downloads in a short time" in page.content.decode()
    assert Credential.objects.filter(user=alice).count() == 3
    # what was typed is kept for the retry (as on the images page)
    typed = {"cluster": cluster.pk, "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI typed", "label": "desk"}
    page = browser.post("/access/ssh/", typed)
    text = page.content.decode()
    assert page.status_code == 429 and "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI typed" in text and 'value="desk"' in text


def test_cluster_writes_past_the_rate_leave_nothing_allocated_and_reads_go_on(settings, fabric, alice):
    settings.API_THROTTLE_RATES = {"cluster-writes": "2/min"}
    Image.objects.create(name="debian-12", approved=True)
    api = api_for(alice)

    def create(name, mac):
        body = {"name": name, "image": "debian-12", "nodes": [{"name": "n1", "host": "brno1", "mac": mac}]}
        return api.post("/api/clusters/", body, format="json")

    assert create("a", "52:54:00:00:00:01").status_code == 201
    assert create("b", "52:54:00:00:00:02").status_code == 201
    refused = create("c", "52:54:00:00:00:03")
    assert refused.status_code == 429 and refused.json()["code"] == "throttled"
    assert not VirtualCluster.objects.filter(name="c").exists()
    assert VlanAllocation.objects.filter(state="allocated").count() == 2
    assert api.get("/api/clusters/").status_code == 200
    first = VirtualCluster.objects.get(name="a")
    assert api.get(f"/api/clusters/{first.pk}/wait/?timeout=0").status_code == 200
    assert api.post("/api/images/", {"name": "mine"}, format="json").status_code == 429  # images: the same scope
    assert not Image.objects.filter(name="mine").exists()
    Image.objects.create(name="old", owner=alice)
    browser = Client()
    browser.force_login(alice)
    page = browser.post("/clusters/images/old/delete/")  # the browser's image changes count too
    assert page.status_code == 429 and page["Retry-After"] and Image.objects.filter(name="old").exists()
    # and so do its cluster changes: extend and tear down, the home page again with 429, nothing done
    expires = first.expires_at
    page = browser.post(f"/clusters/{first.pk}/extend/", {"by": "1h"})
    assert page.status_code == 429 and page["Retry-After"] and "Too many changes" in page.content.decode()
    page = browser.post(f"/clusters/{first.pk}/teardown/")
    assert page.status_code == 429 and page["Retry-After"]
    first.refresh_from_db()
    assert first.state != "tearing_down" and first.expires_at == expires
    assert browser.get(f"/clusters/{first.pk}/teardown/").status_code == 200  # (asking is not a change)


def test_a_cache_that_is_down_lets_requests_through_and_says_so(settings, alice, cluster, gateway, caplog):
    settings.API_THROTTLE_RATES = {"credentials": "1/min"}
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:9/0",  # nothing listens there
            "OPTIONS": {"socket_connect_timeout": 0.2, "socket_timeout": 0.2},
        }
    }
    api = api_for(alice)
    with caplog.at_level(logging.WARNING, logger="portal.throttle"):
        for _ in range(2):
            assert api.post("/api/access/vpn-profiles/", {"clusters": [cluster.pk]}, format="json").status_code == 200
    assert "rate limit credentials not checked: the cache failed" in caplog.text


def test_rates_are_read_from_one_setting_and_a_bad_one_is_refused():
    assert _rates("credentials=60/min, cluster-writes=5/s") == {"credentials": "60/min", "cluster-writes": "5/s"}
    assert _rates("") == {}
    assert _rates("credentials=1/second,host-certificates=2/hour") == {
        "credentials": "1/second",
        "host-certificates": "2/hour",
    }
    for bad in (
        "credentials",
        "credentials=60",
        "credentials=x/min",
        "credentials=60/week",
        "credentials=10/month",  # not read as 10 a minute
        "cluster_writes=5/min",  # a misspelt scope: not a limit that limits nothing
    ):
        with pytest.raises(ImproperlyConfigured, match="API_THROTTLE_RATES"):
            _rates(bad)


@pytest.mark.parametrize("backend", ["locmem", "redis"])
def test_parallel_requests_are_counted_each_never_one_count_for_many(settings, alice, backend):
    """DRF's throttle reads a request history and writes it back: parallel requests each read the same one, and
    all got through — a runaway script's concurrency multiplied the limit. Counted atomically (``incr``), 20 at
    once against 5/min let exactly 5 through, in one process's memory and in Redis shared by every web worker."""
    import threading
    import uuid
    from types import SimpleNamespace

    from portal.throttle import ScopedThrottle

    if backend == "redis":
        import os

        url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12")
        settings.CACHES = {
            "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url, "KEY_PREFIX": "t"}
        }
    settings.API_THROTTLE_RATES = {"credentials": "5/min"}
    view = SimpleNamespace(throttle_scope="credentials")
    user = SimpleNamespace(pk=f"parallel-{uuid.uuid4().hex}", is_authenticated=True)  # (a key no other test uses)
    request = SimpleNamespace(method="POST", user=user, META={})
    start, allowed = threading.Barrier(20), []

    def one():
        start.wait()
        allowed.append(ScopedThrottle().allow_request(request, view))

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert allowed.count(True) == 5 and len(allowed) == 20
    throttle = ScopedThrottle()
    assert not throttle.allow_request(request, view) and 1 <= throttle.wait() <= 60
