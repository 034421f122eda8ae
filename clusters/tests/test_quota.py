"""Quotas of live clusters and nodes per user (defaults from the settings, overrides in admin) and per group:
a request past a quota is a 409 that leaves nothing allocated, concurrent requests cannot overshoot it,
ended clusters do not count, staff are not limited."""

from __future__ import annotations

import itertools

import pytest
from rest_framework.test import APIClient

from clusters.models import Image, Node, Quota, VirtualCluster
from clusters.tests.helpers import client_for
from network.models import VlanAllocation
from network.tests.fakefabric import fabric_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)
_macs = itertools.count(1)


@pytest.fixture(autouse=True)
def image(db):
    return Image.objects.create(name="my-own", approved=False)


def nodes(*hosts: str) -> list[dict]:
    out = []
    for host in hosts:
        n = next(_macs)
        out.append({"name": f"n{n}", "host": host, "mac": f"52:54:00:77:{n // 256:02x}:{n % 256:02x}"})
    return out


def create(api, name: str, hosts=("brno1",), **extra):
    return api.post(
        "/api/clusters/",
        {"name": name, "image": "my-own", "lifetime": 3600, "nodes": nodes(*hosts), **extra},
        format="json",
    )


def allocated() -> int:
    return VlanAllocation.objects.filter(state="allocated").count()


def test_the_default_quota_of_clusters(fabric, alice, settings):
    settings.CLUSTER_QUOTA_CLUSTERS = 2
    api = client_for(alice)
    assert create(api, "c1").status_code == 201
    assert create(api, "c2").status_code == 201
    before = (allocated(), VirtualCluster.objects.count(), Node.objects.count())
    r = create(api, "c3")
    assert r.status_code == 409, r.content
    assert r.data["code"] == "quota_exceeded"
    assert "2 live clusters of 2 allowed" in str(r.data["quota"])
    assert (allocated(), VirtualCluster.objects.count(), Node.objects.count()) == before  # nothing half-done
    # an ended cluster gives its place back
    c1 = VirtualCluster.objects.get(name="c1")
    assert api.post(f"/api/clusters/{c1.pk}/teardown/", {}, format="json").status_code == 202
    assert create(api, "c3").status_code == 201


def test_a_users_own_quota_overrides_the_default(fabric, alice, bob, settings):
    settings.CLUSTER_QUOTA_CLUSTERS = 1
    Quota.objects.create(user=alice, max_clusters=3, note="project allocation")
    Quota.objects.create(user=bob, max_clusters=0, note="suspended")
    api = client_for(alice)
    assert [create(api, f"c{i}").status_code for i in range(4)] == [201, 201, 201, 409]
    assert create(client_for(bob), "b1").status_code == 409


def test_the_quota_of_nodes_counts_additions(fabric, alice, settings):
    settings.CLUSTER_QUOTA_NODES = 3
    api = client_for(alice)
    r = create(api, "c1", hosts=("brno1", "pilsen1"))
    assert r.status_code == 201
    assert create(api, "c2", hosts=("brno2", "pilsen2")).status_code == 409
    cid = r.data["id"]
    two = api.post(f"/api/clusters/{cid}/nodes/", {"nodes": nodes("prague1", "prague2")}, format="json")
    assert two.status_code == 409 and "2 live nodes of 3 allowed, 2 more asked for" in str(two.data["quota"])
    assert Node.objects.filter(cluster_id=cid).count() == 2
    assert api.post(f"/api/clusters/{cid}/nodes/", {"nodes": nodes("prague1")}, format="json").status_code == 202


def test_a_groups_quota_limits_its_clusters_together(fabric, alice, bob, team, settings):
    settings.CLUSTER_QUOTA_CLUSTERS = 0  # no default limit
    Quota.objects.create(group=team, max_clusters=1)
    assert create(client_for(alice), "a1", group="physics").status_code == 201
    r = create(client_for(bob), "b1", group="physics")
    assert r.status_code == 409 and "group physics" in str(r.data["quota"])
    assert create(client_for(bob), "b2").status_code == 201  # not in the group's name


def test_staff_are_not_limited(fabric, root, settings):
    settings.CLUSTER_QUOTA_CLUSTERS = 1
    api = client_for(root)
    assert [create(api, f"c{i}").status_code for i in range(3)] == [201, 201, 201]


def test_staff_who_may_not_change_clusters_are_limited_like_anyone(fabric, settings):
    """The exemption follows what the admin grants: a help-desk account (staff, view permission only) is
    limited like any user; given the change permission, it is not."""
    from django.contrib.auth.models import Permission, User

    settings.CLUSTER_QUOTA_CLUSTERS = 1
    desk = User.objects.create_user("desk", is_staff=True)
    desk.user_permissions.add(Permission.objects.get(codename="view_virtualcluster"))
    api = client_for(desk)
    assert [create(api, f"d{i}").status_code for i in range(2)] == [201, 409]
    desk.user_permissions.add(Permission.objects.get(codename="change_virtualcluster"))
    desk = User.objects.get(pk=desk.pk)  # (permissions are cached on the instance)
    assert create(client_for(desk), "d2").status_code == 201


def test_concurrent_creates_cannot_overshoot_the_quota(fabric, alice, settings):
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("concurrent requests need PostgreSQL")
    settings.CLUSTER_QUOTA_CLUSTERS = 3

    def one(i):
        try:
            return create(client_for(alice), f"c{i}").status_code
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=8) as pool:
        codes = sorted(pool.map(one, range(8)))
    assert codes == [201] * 3 + [409] * 5
    assert VirtualCluster.objects.filter(owner=alice).count() == 3
    assert allocated() == 3


def test_a_quota_is_for_a_user_or_a_group(alice, team):
    from django.db import IntegrityError

    with pytest.raises(IntegrityError):
        Quota.objects.create(user=alice, group=team, max_clusters=1)


def test_admin_lists_quotas_with_what_is_in_use(fabric, alice, root, settings):
    Quota.objects.create(user=alice, max_clusters=5, max_nodes=10)
    assert create(client_for(alice), "c1", hosts=("brno1", "pilsen1")).status_code == 201
    api = APIClient()
    api.force_login(root)
    r = api.get("/admin/clusters/quota/")
    assert r.status_code == 200
    assert "1 / 2" in r.content.decode()
    r = api.post("/admin/clusters/quota/add/", {"max_clusters": 1, "max_nodes": 1})  # neither user nor group
    assert r.status_code == 200 and "A quota is for a user or for a group" in r.content.decode()


def test_the_quota_admin_list_counts_every_row_in_a_fixed_number_of_queries(fabric, alice, bob, root, team):
    """What is in use per row is what the quota's owner (a user, or a group's clusters) holds live, counted for
    the whole page at once: more rows, no more queries."""
    from django.contrib.auth.models import Group, User
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    assert create(client_for(alice), "a1", hosts=("brno1", "pilsen1"), group="physics").status_code == 201
    assert create(client_for(bob), "b1").status_code == 201
    Quota.objects.create(user=alice, max_clusters=5, max_nodes=10, note="row-alice")
    Quota.objects.create(group=team, max_clusters=9, max_nodes=90, note="row-team")
    api = APIClient()
    api.force_login(root)

    def page() -> tuple[str, int]:
        with CaptureQueriesContext(connection) as queries:
            r = api.get("/admin/clusters/quota/")
        assert r.status_code == 200
        return r.content.decode(), len(queries)

    text, few = page()
    rows = {note: text.split(note)[0].rsplit("<tr", 1)[1] for note in ("row-alice", "row-team")}
    assert "1 / 2" in rows["row-alice"] and "1 / 2" in rows["row-team"]
    Quota.objects.create(user=bob, max_clusters=1, max_nodes=1, note="row-bob")
    for i in range(6):
        Quota.objects.create(user=User.objects.create_user(f"u{i}"), max_clusters=1, max_nodes=1)
        Quota.objects.create(group=Group.objects.create(name=f"g{i}"), max_clusters=1, max_nodes=1)
    text, many = page()
    assert many == few
    assert "1 / 1" in text.split("row-bob")[0].rsplit("<tr", 1)[1]


def test_the_quota_endpoint_says_what_applies_and_what_is_in_use(fabric, alice, bob, root, team, settings):
    from portal.models import TokenScope
    from portal.tokens import token_create

    settings.CLUSTER_QUOTA_CLUSTERS, settings.CLUSTER_QUOTA_NODES = 4, 0
    Quota.objects.create(group=team, max_clusters=10, max_nodes=20)
    assert create(client_for(alice), "a1", hosts=("brno1", "pilsen1"), group="physics").status_code == 201
    assert create(client_for(bob), "b1").status_code == 201
    r = client_for(alice).get("/api/clusters/quota/")
    assert r.status_code == 200
    assert r.data == [
        {"scope": "user alice", "max_clusters": 4, "max_nodes": None, "clusters": 1, "nodes": 2},
        {"scope": "group physics", "max_clusters": 10, "max_nodes": 20, "clusters": 1, "nodes": 2},
    ]
    # someone else's: middleware and admins only
    assert client_for(alice).get("/api/clusters/quota/?owner=bob").status_code == 403
    _, secret = token_create(user=root, name="PBS", scopes=[TokenScope.CLUSTERS_MANAGE])
    pbs = APIClient()
    pbs.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    r = pbs.get("/api/clusters/quota/?owner=bob")
    assert r.status_code == 200 and r.data[0] == {
        "scope": "user bob",
        "max_clusters": 4,
        "max_nodes": None,
        "clusters": 1,
        "nodes": 1,
    }
    assert pbs.get("/api/clusters/quota/?owner=nobody").status_code == 400
    assert client_for(root).get("/api/clusters/quota/").data == []  # staff: no limits
