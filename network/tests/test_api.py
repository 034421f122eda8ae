"""The read-only network API (``/api/network/...``): who may read it, what it never shows (switch
credentials), its filters, and how many queries each list costs (pinned, the same for 1 and 20 objects)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from network.choices import PortRole
from network.models import DeviceChange, DeviceKind, Drift, Segment, VlanAllocation
from network.tests.factories import (
    CoreTransportFactory,
    HostFactory,
    SiteFactory,
    SwitchFactory,
    SwitchPortFactory,
    VlanPoolFactory,
)
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db

PASSWORD = "s3cret-switch-Pa55"  # noqa: S105 (test data)
LISTS = ["sites", "cores", "switches", "hosts", "pools", "allocations", "changes", "drift"]
# Queries of one list request with a token: the token, the count, the page, one per prefetched relation.
MAX_QUERIES = {
    "sites": 3,
    "cores": 4,  # + the cores' sites
    "switches": 4,  # + the switches' ports with their cores
    "hosts": 3,
    "pools": 6,  # + the cores' sites, + the ids held (one query), + how long a released id may still be mapped
    "allocations": 3,
    "changes": 3,
    "drift": 3,
}


def make_inventory(n: int, tag: str = "") -> dict:
    """``n`` of everything: sites joined by cores, switches with an uplink and a host trunk, hosts, pools,
    allocations held by segments, device changes of those segments, drift."""
    made = {}
    for i in range(n):
        site = SiteFactory(name=f"site{tag}{i}")
        core = CoreTransportFactory(name=f"core{tag}{i}", sites=[site])
        switch = SwitchFactory(name=f"sw{tag}{i}", site=site, username="admin", password=PASSWORD)
        SwitchPortFactory(switch=switch, name="up", role=PortRole.CORE_UPLINK, core=core)
        port = SwitchPortFactory(switch=switch, name="h1", role=PortRole.HOST_TRUNK)
        host = HostFactory(name=f"host{tag}{i}", site=site, switch_port=port)
        pool = VlanPoolFactory(name=f"pool{tag}{i}", core=core, ranges="100-199")
        alloc = VlanAllocation.objects.create(
            pool=pool,
            vid=100 + i,
            state=VlanAllocation.State.ALLOCATED,
            owner=f"cluster:{tag}{i}",
            allocated_at=timezone.now(),
        )
        segment = Segment.objects.create(owner_ref=f"cluster:{tag}{i}", allocation=alloc, vid=alloc.vid)
        DeviceChange.objects.create(
            kind=DeviceKind.SWITCH,
            switch=switch,
            device=switch.name,
            segment=segment,
            cause="provision",
            status=DeviceChange.Status.OK,
        )
        DeviceChange.objects.create(
            kind=DeviceKind.HOST,
            host=host,
            device=host.name,
            segment=segment,
            cause="provision",
            status=DeviceChange.Status.FAILED,
            error="bridge busy",
        )
        Drift.objects.create(
            device_kind=DeviceKind.SWITCH,
            switch=switch,
            device=switch.name,
            port="h1",
            kind=Drift.Kind.MISSING if i % 2 else Drift.Kind.STALE,
            vlans=str(100 + i),
            repaired_at=timezone.now() if i % 2 else None,
        )
        made.setdefault("switches", []).append(switch)
        made.setdefault("hosts", []).append(host)
        made.setdefault("pools", []).append(pool)
    return made


def token_client(user, scopes) -> APIClient:
    _, secret = token_create(user=user, name="t", scopes=scopes)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


@pytest.fixture
def reader(alice) -> APIClient:
    return token_client(alice, [TokenScope.NETWORK_READ])


@pytest.fixture
def inventory(db):
    return make_inventory(3)


def detail_urls() -> list[str]:
    """One detail URL per endpoint, for objects that exist (listed by the API itself)."""
    client = APIClient()
    client.force_authenticate(User.objects.get(username="root"))
    return [f"/api/network/{name}/{client.get(f'/api/network/{name}/').data['results'][0]['id']}/" for name in LISTS]


def test_who_may_read(inventory, alice, root, reader):
    urls = [f"/api/network/{name}/" for name in LISTS] + detail_urls()
    anonymous = APIClient()
    no_scope = token_client(alice, [TokenScope.CLUSTERS_MANAGE, TokenScope.CLUSTERS_WRITE, TokenScope.GATEWAY])
    revoked = token_client(alice, [TokenScope.NETWORK_READ])
    from portal.models import ApiToken
    from portal.tokens import token_revoke

    token_revoke(token=ApiToken.objects.order_by("-pk").first())
    session = APIClient()
    session.force_login(root)  # a browser: an administrator's session reads
    user_session = APIClient()
    user_session.force_login(alice)  # not an ordinary user's: switch addresses, diffs and holders are not hers
    for url in urls:
        assert anonymous.get(url).status_code == 401, url  # with WWW-Authenticate: Bearer
        refused = no_scope.get(url)
        assert refused.status_code == 403 and "scope" in refused.data["detail"], url
        assert revoked.get(url).status_code == 401, url
        assert reader.get(url).status_code == 200, url
        assert session.get(url).status_code == 200, url
        refused = user_session.get(url)
        assert refused.status_code == 403 and "administrator" in refused.data["detail"], url
        # read-only: no writes through any endpoint
        assert reader.post(url, {}, format="json").status_code == 405, url
        assert reader.delete(url).status_code == 405, url


def test_a_staff_session_reads_what_the_admin_lets_it_view(inventory, alice):
    """A staff member reads, in the browser, the endpoints whose model the admin lets them view, and no other."""
    from django.contrib.auth.models import Permission

    alice.is_staff = True
    alice.save(update_fields=["is_staff"])
    alice.user_permissions.add(Permission.objects.get(codename="view_switch", content_type__app_label="network"))
    session = APIClient()
    session.force_login(alice)
    assert session.get("/api/network/switches/").status_code == 200
    assert session.get("/api/network/changes/").status_code == 403
    assert session.get("/api/network/drift/?open=nonsense").status_code == 403  # refused before the filter


def test_switch_credentials_never_appear(inventory, root, reader):
    for name in LISTS:
        body = reader.get(f"/api/network/{name}/?limit=1000").content.decode()
        assert PASSWORD not in body, name
        assert "password" not in body, name
    for url in detail_urls():
        body = reader.get(url).content.decode()
        assert PASSWORD not in body and "password" not in body, url
    switch = reader.get("/api/network/switches/").data["results"][0]
    assert "username" not in switch and "password" not in switch
    assert {p["name"] for p in switch["ports"]} == {"up", "h1"}


def test_a_pool_says_how_many_ids_it_has_free_now(inventory, reader):
    """What a scheduler checks before it places a cluster: the pool's sites and its ids' usage — quarantine that
    ended is free again, reserved ids are none of it (held or not). The metrics say the same."""
    from datetime import timedelta

    from portal import metrics

    pool = inventory["pools"][0]
    pool.reserved = "190-199"
    pool.save()
    now = timezone.now()
    quarantined = VlanAllocation.State.QUARANTINED
    VlanAllocation.objects.create(pool=pool, vid=120, state=quarantined, quarantine_until=now + timedelta(hours=1))
    VlanAllocation.objects.create(pool=pool, vid=121, state=quarantined, quarantine_until=now - timedelta(seconds=1))
    VlanAllocation.objects.create(pool=pool, vid=122)  # a free row
    # held, but reserved since: it counts for nothing (it goes back out of the pool when released)
    VlanAllocation.objects.create(pool=pool, vid=195, state=VlanAllocation.State.ALLOCATED, owner="x", allocated_at=now)
    row = reader.get(f"/api/network/pools/{pool.pk}/").data
    assert row["sites"] == ["site0"]
    assert row["usage"] == {"size": 90, "free": 88, "allocated": 1, "quarantined": 1}
    listed = {p["name"]: p["usage"] for p in reader.get("/api/network/pools/").data["results"]}
    assert listed["pool1"] == {"size": 100, "free": 99, "allocated": 1, "quarantined": 0}
    text = metrics.render(metrics.collect())
    assert 'virtcloud_vlan_ids{pool="pool0",state="free"} 88' in text
    assert 'virtcloud_vlan_ids{pool="pool0",state="quarantined"} 1' in text


def names(response, key="id") -> list:
    assert response.status_code == 200, response.content
    return [row[key] for row in response.data["results"]]


def test_filters(inventory, reader):
    sw0, host1 = inventory["switches"][0], inventory["hosts"][1]
    # allocations: pool, state, owner; free ids are never listed
    VlanAllocation.objects.create(pool_id=VlanAllocation.objects.first().pool_id, vid=150)  # free
    assert len(names(reader.get("/api/network/allocations/"))) == 3
    assert names(reader.get("/api/network/allocations/?pool=pool1"), "vid") == [101]
    assert names(reader.get("/api/network/allocations/?owner=cluster:2"), "vid") == [102]
    assert names(reader.get("/api/network/allocations/?state=quarantined")) == []
    assert len(names(reader.get("/api/network/allocations/?state=allocated"))) == 3
    # changes: device, status, kind, segment
    assert names(reader.get(f"/api/network/changes/?device={sw0.name}"), "device") == [sw0.name]
    assert set(names(reader.get("/api/network/changes/?status=failed"), "device")) == {"host0", "host1", "host2"}
    assert set(names(reader.get("/api/network/changes/?kind=switch"), "device")) == {"sw0", "sw1", "sw2"}
    failed = reader.get("/api/network/changes/?segment=cluster:1&status=failed").data["results"]
    assert [(c["device"], c["error"], c["segment"]) for c in failed] == [(host1.name, "bridge busy", "cluster:1")]
    # drift: device, kind, open
    assert names(reader.get("/api/network/drift/?device=sw1"), "device") == ["sw1"]
    assert set(names(reader.get("/api/network/drift/?kind=stale"), "device")) == {"sw0", "sw2"}
    assert set(names(reader.get("/api/network/drift/?open=1"), "device")) == {"sw0", "sw2"}
    assert names(reader.get("/api/network/drift/?open=0"), "device") == ["sw1"]  # only the repaired
    assert len(names(reader.get("/api/network/drift/?open="))) == 3  # empty: no filter
    # the inventory lists show names, not ids
    host = reader.get("/api/network/hosts/?limit=1").data["results"][0]
    assert (host["site"], host["switch"], host["port"]) == ("site0", "sw0", "h1")
    core = reader.get("/api/network/cores/").data["results"][0]
    assert core["sites"] == ["site0"]
    # pagination
    page = reader.get("/api/network/sites/?limit=2&offset=1").data
    assert page["count"] == 3 and len(page["results"]) == 2


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("allocations/?state=bogus", "state", "'bogus' is not one of: allocated, quarantined"),
        ("changes/?status=bogus", "status", "'bogus' is not one of: pending, running, ok, noop, failed"),
        ("changes/?kind=x", "kind", "'x' is not one of: switch, host"),
        ("drift/?kind=x", "kind", "'x' is not one of: missing, stale, foreign"),
        ("drift/?open=maybe", "open", "'maybe' is not one of: 1, true, 0, false"),
        ("sites/?limit=abc", "limit", "must be a whole number, at least 1"),
        ("sites/?limit=-1", "limit", "must be a whole number, at least 1"),
        ("sites/?limit=0", "limit", "must be a whole number, at least 1"),
        ("sites/?offset=-5", "offset", "must be a whole number, at least 0"),
    ],
)
def test_a_filter_or_page_that_cannot_match_is_a_400_not_an_empty_list(inventory, reader, query, field, message):
    """A typo in a filter value answered an empty list, which reads like "nothing there"; a bad limit the
    default page."""
    response = reader.get(f"/api/network/{query}")
    assert (response.status_code, response.json()) == (400, {field: [message]})


@pytest.mark.parametrize("name", LISTS)
def test_list_query_count_does_not_grow(name, alice, django_assert_max_num_queries, django_assert_num_queries):
    """The same number of queries for 1 and for 20 objects (no N+1), at most the pinned count."""
    make_inventory(1, tag="a")
    reader = token_client(alice, [TokenScope.NETWORK_READ])
    reader.get(f"/api/network/{name}/")  # the token's last-used stamp is written once a minute: not counted

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as one:
        assert len(reader.get(f"/api/network/{name}/").data["results"]) >= 1
    make_inventory(19, tag="b")
    with django_assert_max_num_queries(MAX_QUERIES[name]):
        response = reader.get(f"/api/network/{name}/")
    assert len(response.data["results"]) >= 20
    with django_assert_num_queries(len(one.captured_queries)):
        reader.get(f"/api/network/{name}/")
