"""The access API's clusters: whether and where each cluster the caller sees can be entered (what the access page
shows beside it), for a scheduler's token or a user's script."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

import datetime as dt

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from access import services
from access.errors import ClusterNotReady
from access.models import Gateway, GatewayKind
from access.selectors import cluster_label
from access.tests.fixtures import client_for, cluster, gateway, make_cluster, make_gateway, other_cluster
from clusters.models import VirtualCluster
from network.tests.factories import SiteFactory
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db

URL = "/api/access/clusters/"


def listed(client, **params) -> dict[int, dict]:
    """The clusters of the list's (one) page, by id."""
    response = client.get(URL, params)
    assert response.status_code == 200, response.content
    return {row["id"]: row for row in response.json()["results"]}


def on_a_core(cluster, *sites):
    """Give ``cluster`` (made directly, without a workflow) the segment a workflow gives it: a VLAN of a pool whose
    core joins its node's site and ``sites``. Before any gateway at a site exists (the network then needs the core
    to reach one)."""
    from network import services as net
    from network.tests.factories import CoreTransportFactory, VlanPoolFactory

    host = cluster.nodes.get().host
    core = CoreTransportFactory(sites=[host.site, *sites])
    VlanPoolFactory(core=core, ranges=str(cluster.vlan_id))
    segment = net.segment_create(owner=cluster.ref, hosts=[host], gateway=True)
    VirtualCluster.objects.filter(pk=cluster.pk).update(segment=segment)


def test_a_cluster_just_ready_is_not_access_ready_until_its_gateway_has_it(bob, root, cluster, gateway):
    """As on the access page ("gateways updating…"): the gateway's state predates the cluster's ready time, so
    access is not ready and the gateway does not have it; its pull brings the state (200) and the next one says
    it has it (304): ready. A group member (bob) asks about the group's cluster."""
    token, secret = token_create(user=root, name="gw1", scopes=[TokenScope.GATEWAY])
    ready = timezone.now()
    Gateway.objects.filter(pk=gateway.pk).update(token=token, state_as_of=ready - dt.timedelta(minutes=1))
    VirtualCluster.objects.filter(pk=cluster.pk).update(ready_at=ready)
    api = client_for(bob)
    row = listed(api)[cluster.pk]
    assert row == {
        "id": cluster.pk,
        "name": "mpi",
        "state": "ready",
        "connectivity": "closed",
        "enterable": True,
        "access_ready": False,
        "gateways": [
            {
                "name": "gw1",
                "kind": "both",
                "site": None,
                "vpn": {"host": "198.18.100.1", "port": 1194, "proto": "udp"},
                "ssh": {"host": "198.18.100.1", "port": 22, "user": "virtcloud"},
                "stale": False,
                "has_cluster": False,
            }
        ],
    }
    assert api.get(f"{URL}{cluster.pk}/").json() == row

    pulls = client_for(token=secret)
    first = pulls.get("/api/access/gateway/state/")
    assert first.status_code == 200
    assert listed(api)[cluster.pk]["access_ready"] is False  # it has the state; it has not said it installed it
    assert pulls.get("/api/access/gateway/state/", HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    row = api.get(f"{URL}{cluster.pk}/").json()
    assert row["access_ready"] is True
    assert [(g["name"], g["has_cluster"]) for g in row["gateways"]] == [("gw1", True)]


def test_a_cluster_an_admin_made_closed_after_it_was_ready_waits_for_a_state_made_after_that(alice, cluster, gateway):
    """Ready (and public) long ago, the gateway's state newer than that: once an admin makes it closed it enters the
    gateways' maps only then, so access is not ready until a gateway's state is newer than the override."""
    ready = timezone.now() - dt.timedelta(hours=1)
    Gateway.objects.filter(pk=gateway.pk).update(state_as_of=ready + dt.timedelta(minutes=5))
    VirtualCluster.objects.filter(pk=cluster.pk).update(ready_at=ready, closed_since=ready - dt.timedelta(seconds=1))
    api = client_for(alice)
    assert listed(api)[cluster.pk]["access_ready"] is True  # closed from the start: it has it
    VirtualCluster.objects.filter(pk=cluster.pk).update(closed_since=timezone.now())  # the override
    assert listed(api)[cluster.pk]["access_ready"] is False
    Gateway.objects.filter(pk=gateway.pk).update(state_as_of=timezone.now())
    assert listed(api)[cluster.pk]["access_ready"] is True


def test_a_cluster_without_a_ready_time_has_no_answer_yet(alice, cluster, gateway):
    """A cluster whose ready time is unknown: the gateway carries it, whether it has it is not known (null)."""
    row = client_for(alice).get(f"{URL}{cluster.pk}/").json()
    assert row["access_ready"] is None
    assert [(g["name"], g["has_cluster"]) for g in row["gateways"]] == [("gw1", None)]


def test_only_gateways_at_sites_the_clusters_core_reaches_are_listed(alice, cluster, gateway):
    """A gateway at a site the cluster's core does not reach never carries its VLAN: not listed, and not waited
    for (access is ready once the others have it). A gateway without a site and one at a reached site are."""
    reached, elsewhere = SiteFactory(name="pilsen"), SiteFactory(name="ostrava")
    on_a_core(cluster, reached)
    now = timezone.now()
    VirtualCluster.objects.filter(pk=cluster.pk).update(ready_at=now - dt.timedelta(minutes=5))
    make_gateway("near", site=reached, address="198.18.100.8", state_as_of=now)
    make_gateway("far", site=elsewhere, address="198.18.100.9")  # never said what it installed
    Gateway.objects.filter(name="gw1").update(state_as_of=now)
    row = client_for(alice).get(f"{URL}{cluster.pk}/").json()
    assert [(g["name"], g["site"]) for g in row["gateways"]] == [("gw1", None), ("near", "pilsen")]
    assert row["access_ready"] is True
    # (the state "far" pulls leaves the cluster out: the API says what the gateways hold)
    far = services.gateway_state(gateway=Gateway.objects.get(name="far"))
    assert cluster_label(cluster) not in far["vpn"]["vlans"]


def test_a_stale_gateway_is_listed_as_stale(alice, cluster, gateway):
    """A gateway that has not installed a current state for GATEWAY_STATE_MAX_AGE refuses everyone: listed (it
    carries the cluster), marked stale; a current one is not."""
    long_ago = timezone.now() - dt.timedelta(seconds=2 * settings.GATEWAY_STATE_MAX_AGE)
    make_gateway("old", address="198.18.100.7", last_pull_at=long_ago, state_as_of=long_ago)
    row = client_for(alice).get(f"{URL}{cluster.pk}/").json()
    assert [(g["name"], g["stale"]) for g in row["gateways"]] == [("gw1", False), ("old", True)]


def test_the_endpoints_are_those_the_downloads_connect_to(alice, cluster):
    """A VPN-only gateway has no SSH endpoint, an SSH-only one no VPN endpoint. A bastion per cluster listens only
    for a cluster with a bastion address (the SSH download is refused without one: no endpoint either), at its
    base port + the cluster's VLAN: the host, port and account the SSH download's ssh_config jumps through."""
    make_gateway("a-vpn", kind=GatewayKind.VPN, address="198.18.100.5", vpn_port=1195, vpn_proto="tcp6")
    make_gateway("b-ssh", kind=GatewayKind.SSH, address="bastion.example.org", ssh_port_base=20000, ssh_user="jump")
    api = client_for(alice)
    vpn, ssh = api.get(f"{URL}{cluster.pk}/").json()["gateways"]
    assert (vpn["name"], vpn["kind"], vpn["ssh"]) == ("a-vpn", "vpn", None)
    assert vpn["vpn"] == {"host": "198.18.100.5", "port": 1195, "proto": "tcp6"}
    assert (ssh["name"], ssh["kind"], ssh["vpn"], ssh["ssh"]) == ("b-ssh", "ssh", None, None)
    with pytest.raises(ClusterNotReady, match="no address for the SSH bastion"):
        services.ssh_certificate_issue(user=alice, cluster=cluster)

    VirtualCluster.objects.filter(pk=cluster.pk).update(bastion_address="10.0.0.254/24")
    _, ssh = api.get(f"{URL}{cluster.pk}/").json()["gateways"]
    assert ssh["ssh"] == {"host": "bastion.example.org", "port": 20000 + cluster.vlan_id, "user": "jump"}
    cluster.refresh_from_db()
    config = services.ssh_certificate_issue(user=alice, cluster=cluster).ssh_config
    assert f"  HostName bastion.example.org\n  Port {20000 + cluster.vlan_id}\n  User jump\n" in config
    profile = services.vpn_profile_issue(user=alice, clusters=[cluster]).text
    assert "remote 198.18.100.5 1195\n" in profile


def test_ssh_goes_through_a_gateway_that_relays_to_the_cluster_when_the_best_does_not(alice, cluster):
    """The best-ranked SSH gateway runs a bastion per cluster, which does not listen for a cluster without a
    bastion address; another one forwards by address: the SSH download jumps through that one, the gateway the
    access API lists as the cluster's SSH endpoint, rather than being refused."""
    make_gateway("a-per-cluster", kind=GatewayKind.SSH, address="198.18.100.5", ssh_port_base=20000)
    make_gateway("b-shared", kind=GatewayKind.SSH, address="198.18.100.6", ssh_user="jump")
    gateways = client_for(alice).get(f"{URL}{cluster.pk}/").json()["gateways"]
    assert [(g["name"], g["ssh"]) for g in gateways] == [
        ("a-per-cluster", None),
        ("b-shared", {"host": "198.18.100.6", "port": 22, "user": "jump"}),
    ]
    config = services.ssh_certificate_issue(user=alice, cluster=cluster).ssh_config
    assert "  HostName 198.18.100.6\n  Port 22\n  User jump\n" in config


def test_clusters_no_gateway_carries(alice, cluster, gateway):
    """A public cluster is reached directly and a closed one whose network is not up (or no longer) is in no
    gateway's map: not enterable, no gateway, no answer. One being updated keeps its network: enterable."""
    public = make_cluster(alice, name="web", connectivity="public")
    starting = make_cluster(alice, name="new", state="provisioning")
    ending = make_cluster(alice, name="old", state="tearing_down")
    updating = make_cluster(alice, name="grow", state="updating")
    ready = timezone.now()
    VirtualCluster.objects.update(ready_at=ready)
    Gateway.objects.update(state_as_of=ready)
    rows = listed(client_for(alice))
    for c in (public, starting, ending):
        assert (rows[c.pk]["enterable"], rows[c.pk]["gateways"], rows[c.pk]["access_ready"]) == (False, [], None)
    for c in (cluster, updating):
        assert rows[c.pk]["enterable"] is True and rows[c.pk]["access_ready"] is True
        assert [g["name"] for g in rows[c.pk]["gateways"]] == ["gw1"]


def test_someone_elses_cluster_is_not_found(alice, bob, charlie, cluster, other_cluster, gateway):
    """charlie's cluster is not alice's or bob's to ask about (404, as in the clusters API); alice's group
    cluster is not charlie's. A middleware token (clusters:manage) sees both."""
    for user in (alice, bob):
        assert set(listed(client_for(user))) == {cluster.pk}
        response = client_for(user).get(f"{URL}{other_cluster.pk}/")
        assert (response.status_code, response.json()["code"]) == (404, "not_found")
    assert set(listed(client_for(charlie))) == {other_cluster.pk}
    assert client_for(charlie).get(f"{URL}{cluster.pk}/").status_code == 404
    _, middleware = token_create(user=charlie, name="pbs", scopes=[TokenScope.CLUSTERS_MANAGE])
    assert set(listed(client_for(token=middleware))) == {cluster.pk, other_cluster.pk}


@pytest.mark.parametrize("scope", [TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE, TokenScope.CLUSTERS_MANAGE])
def test_a_clusters_scope_reads(alice, cluster, scope):
    _, secret = token_create(user=alice, name="script", scopes=[scope])
    assert client_for(token=secret).get(f"{URL}{cluster.pk}/").status_code == 200


def test_a_token_without_the_scope_and_no_authentication_are_refused(alice, cluster, gateway):
    _, secret = token_create(user=alice, name="netops", scopes=[TokenScope.NETWORK_READ, TokenScope.GATEWAY])
    for url in (URL, f"{URL}{cluster.pk}/"):
        response = client_for(token=secret).get(url)
        assert response.status_code == 403, url
        assert "scope" in response.json()["detail"]
        response = client_for().get(url)
        assert (response.status_code, response.json()["code"]) == (401, "not_authenticated"), url


def test_filters_and_their_400s(alice, cluster, gateway):
    VirtualCluster.objects.filter(pk=cluster.pk).update(job_id="pbs.1234")
    make_cluster(alice, name="new", state="provisioning")
    api = client_for(alice)
    assert set(listed(api, job_id="pbs.1234")) == {cluster.pk}
    assert set(listed(api, state="ready")) == {cluster.pk}
    for params, field in (({"state": "up"}, "state"), ({"job_id": "a\x00b"}, "job_id"), ({"limit": "0"}, "limit")):
        response = api.get(URL, params)
        assert response.status_code == 400, params
        assert field in response.json(), response.json()
    assert api.get(f"{URL}{2**70}/").status_code == 404


def test_the_list_reads_the_same_few_tables_however_many_clusters_and_gateways(
    alice, bob, team, cluster, gateway, django_assert_max_num_queries
):
    """No query per cluster or per gateway: one cluster and one gateway cost as many queries as eight clusters
    (on cores, public, provisioning) and five gateways (at sites, stale)."""
    api = client_for(bob)

    def count() -> int:
        with CaptureQueriesContext(connection) as queries:
            rows = listed(api)
        assert all(row["gateways"] for row in rows.values() if row["enterable"])  # (they were read)
        return len(queries)

    one = count()
    brno, pilsen = SiteFactory(name="brno"), SiteFactory(name="pilsen")
    for i in range(5):
        on_a_core(make_cluster(alice, name=f"c{i}", group=team), brno if i % 2 else pilsen)
    make_cluster(alice, name="web", group=team, connectivity="public")
    make_cluster(alice, name="new", group=team, state="provisioning")
    VirtualCluster.objects.update(ready_at=timezone.now())
    long_ago = timezone.now() - dt.timedelta(seconds=2 * settings.GATEWAY_STATE_MAX_AGE)
    make_gateway("gw-brno", site=brno, address="198.18.100.2")
    make_gateway("gw-pilsen", site=pilsen, address="198.18.100.3", kind=GatewayKind.SSH, ssh_port_base=20000)
    make_gateway("gw-ssh", address="198.18.100.4", kind=GatewayKind.SSH)
    make_gateway("gw-old", address="198.18.100.5", last_pull_at=long_ago, state_as_of=long_ago)
    many = count()
    assert len(listed(api)) == 8
    assert many == one
    with django_assert_max_num_queries(4):  # the page, its count, the ready gateways, the clusters' sites
        listed(api)
