"""``GET /api/public-networks/``: what the provider's router needs for the public clusters, for the router's own
token only; and the reference hook (access/gateway/router.py) reading it over real HTTP (``live_server``). On the
fake fabric with eager Celery."""
# ruff: noqa: F401, F811 (the pytest fixture public is imported from clusters.tests.helpers)

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from access.gateway import router
from clusters.models import ClusterState, VirtualCluster
from clusters.tests.helpers import public
from network.tests.factories import CoreTransportFactory, SiteFactory
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def secret_with(*scopes) -> str:
    user = User.objects.create_user(f"t{User.objects.count()}")
    return token_create(user=user, name="router", scopes=list(scopes))[1]


def client_with(*scopes) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret_with(*scopes)}")
    return api


def test_the_router_gets_each_live_public_clusters_vlan_subnet_and_address(public):
    one = public("web", "52:54:00:00:00:01")
    two = public("db", "52:54:00:00:00:02")
    public("closed", "52:54:00:00:00:03", connectivity="closed")  # no router address: never listed
    VirtualCluster.objects.filter(pk=two["id"]).update(state=ClusterState.TORN_DOWN)  # ended: gone from the list

    r = client_with(TokenScope.ROUTER).get("/api/public-networks/")
    assert r.status_code == 200, r.content
    assert r.data["networks"] == [
        {
            "cluster": one["id"],
            "name": "web",
            "state": "ready",
            "vlan_id": one["vlan_id"],
            "subnet": "198.19.0.0/28",
            "router_address": "198.19.0.1/28",
            "hosts": [{"name": "n1", "mac": "52:54:00:00:00:01", "address": "198.19.0.2"}],
        }
    ]
    assert r["ETag"] and r["Cache-Control"] == "no-cache"
    # a node added: the list (and its ETag) says so, for the router's DHCP and DNS
    from clusters import services
    from network.models import Host

    etag = r["ETag"]
    services.cluster_nodes_add(
        cluster=VirtualCluster.objects.get(pk=one["id"]),
        nodes=[services.NodeRequest(name="n2", host=Host.objects.get(name="pilsen1"), mac="52:54:00:00:00:09")],
    )
    again = client_with(TokenScope.ROUTER).get("/api/public-networks/", HTTP_IF_NONE_MATCH=etag)
    assert again.status_code == 200 and again["ETag"] != etag
    assert again.data["networks"][0]["hosts"][1] == {"name": "n2", "mac": "52:54:00:00:00:09", "address": "198.19.0.3"}


def test_nobody_but_the_router_middleware_or_an_admin_reads_it(public, alice, root):
    public("web", "52:54:00:00:00:01")
    assert client_with(TokenScope.CLUSTERS_MANAGE).get("/api/public-networks/").status_code == 200
    others = ([TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE], [TokenScope.GATEWAY], [TokenScope.NETWORK_READ])
    for scopes in others:
        assert client_with(*scopes).get("/api/public-networks/").status_code == 403
    user = APIClient()
    user.force_login(alice)
    assert user.get("/api/public-networks/").status_code == 403  # a user's own session: not every owner's list
    admin = APIClient()
    admin.force_login(root)
    assert admin.get("/api/public-networks/").status_code == 200
    assert APIClient().get("/api/public-networks/").status_code == 401


def test_an_unchanged_list_is_a_304_and_a_change_a_new_etag(public):
    api = client_with(TokenScope.ROUTER)
    public("web", "52:54:00:00:00:01")
    first = api.get("/api/public-networks/")
    again = api.get("/api/public-networks/", HTTP_IF_NONE_MATCH=first["ETag"])
    assert again.status_code == 304 and again["ETag"] == first["ETag"]
    assert api.get("/api/public-networks/", HTTP_IF_NONE_MATCH="*").status_code == 304
    public("db", "52:54:00:00:00:02")
    changed = api.get("/api/public-networks/", HTTP_IF_NONE_MATCH=first["ETag"])
    assert changed.status_code == 200 and len(changed.data["networks"]) == 2 and changed["ETag"] != first["ETag"]


def test_a_site_gets_only_the_clusters_whose_core_joins_it(public, fabric):
    public("web", "52:54:00:00:00:01")
    api = client_with(TokenScope.ROUTER)
    assert len(api.get("/api/public-networks/?site=brno").data["networks"]) == 1
    CoreTransportFactory(name="elsewhere", sites=[SiteFactory(name="ostrava")])
    assert api.get("/api/public-networks/?site=ostrava").data["networks"] == []
    # a name no site has (a typo, a renamed site) is a 400, never the empty list that would clear a router
    for bad in ("nowhere", "BRNO", "", "x" * 101):
        refused = api.get("/api/public-networks/", {"site": bad})
        assert refused.status_code == 400 and "site" in refused.data, bad


def test_the_reference_hook_reads_the_list_over_http_and_makes_one_link_per_vlan(public, live_server):
    web = public("web", "52:54:00:00:00:01")
    portal = router.Portal(live_server.url, secret_with(TokenScope.ROUTER), site="brno")
    doc = portal.fetch()
    assert router.wanted(doc) == ({web["vlan_id"]: "198.19.0.1/28"}, [])
    assert portal.fetch() is None  # the ETag it kept: unchanged
    public("db", "52:54:00:00:00:02")
    legs, problems = router.wanted(portal.fetch())
    assert sorted(legs.values()) == ["198.19.0.1/28", "198.19.0.17/28"] and problems == []

    wrong = router.Portal(live_server.url, secret_with(TokenScope.CLUSTERS_READ))
    with pytest.raises(router.RouterError, match="the portal answered 403"):
        wrong.fetch()
