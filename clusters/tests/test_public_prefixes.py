"""The public prefixes' usage (API, admin, metrics): what the allocator would give, counted the allocator's way —
a scheduler asks before it places a public cluster, an operator alerts before they run out. And one family of
addresses for every prefix. On the fake fabric with eager Celery."""
# ruff: noqa: F401, F811 (the pytest fixture public is imported from clusters.tests.helpers)

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from clusters import selectors, services
from clusters.models import PublicPrefix, VirtualCluster
from clusters.tests.helpers import public
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def _usage(name: str) -> dict[str, int]:
    prefix = PublicPrefix.objects.get(name=name)
    return selectors.public_prefix_usage([prefix])[prefix.pk]


def test_usage_is_what_the_allocator_gives_until_it_refuses(public, alice, settings):
    settings.PUBLIC_SUBNET_HOLD_DOWN = 600
    PublicPrefix.objects.filter(name="provider").update(prefix="198.19.0.0/26")  # four /28 subnets
    assert _usage("provider") == {"size": 4, "free": 4, "allocated": 0, "resting": 0}
    first = VirtualCluster.objects.get(pk=public("a", "52:54:00:00:00:01")["id"])
    public("b", "52:54:00:00:00:02")
    services.cluster_teardown(cluster=first, reason="job ended")
    assert _usage("provider") == {"size": 4, "free": 2, "allocated": 1, "resting": 1}
    # A second prefix overlapping the first, of /27 subnets: its first holds a live /28 and a resting one.
    PublicPrefix.objects.create(name="wide", prefix="198.19.0.0/25", subnet_length=27)
    assert _usage("wide") == {"size": 4, "free": 3, "allocated": 1, "resting": 0}
    PublicPrefix.objects.filter(name="wide").delete()
    # As many more public clusters as it says are free, and not one more.
    public("c", "52:54:00:00:00:03")
    public("d", "52:54:00:00:00:04")
    assert _usage("provider") == {"size": 4, "free": 0, "allocated": 3, "resting": 1}
    api = APIClient()
    api.force_authenticate(alice)
    body = {"name": "e", "image": "debian-12", "nodes": [{"name": "n1", "host": "brno1", "mac": "52:54:00:00:00:05"}]}
    r = api.post("/api/clusters/", body, format="json")
    assert r.status_code == 409 and "no free subnet left (1 held back" in r.data["detail"], r.data
    settings.PUBLIC_SUBNET_HOLD_DOWN = 0  # its rest is over
    assert _usage("provider") == {"size": 4, "free": 1, "allocated": 3, "resting": 0}


def test_a_large_prefix_is_counted_without_listing_its_subnets(db):
    """An IPv6 /32 of /64 subnets holds 2**32 of them: counted, not enumerated."""
    big = PublicPrefix.objects.create(name="v6", prefix="2001:db8::/32", subnet_length=64)
    assert selectors.public_prefix_usage([big])[big.pk] == {"size": 2**32, "free": 2**32, "allocated": 0, "resting": 0}


def test_every_public_prefix_is_of_one_family(db):
    PublicPrefix.objects.create(name="v4", prefix="198.19.0.0/24", subnet_length=28)
    v6 = PublicPrefix(name="v6", prefix="2001:db8::/48", subnet_length=64)
    with pytest.raises(ValidationError, match="IPv6, prefix v4 is not; a public cluster gets one subnet"):
        v6.full_clean()
    PublicPrefix(name="v4-more", prefix="198.19.1.0/24", subnet_length=28).full_clean()  # the same family: fine


def test_a_subnet_of_the_other_family_taken_does_not_block_one(public, settings):
    """A live IPv6 subnet whose number reads as an IPv4 address (::c613:0/124 is 198.19.0.0 as an integer) does
    not keep 198.19.0.0/28 from a new cluster: families never overlap."""
    odd = VirtualCluster.objects.get(pk=public("a", "52:54:00:00:00:01")["id"])
    VirtualCluster.objects.filter(pk=odd.pk).update(public_subnet="::c613:0/124")
    assert public("b", "52:54:00:00:00:02")["public_subnet"] == "198.19.0.0/28"


def test_the_api_the_admin_and_the_metrics_say_it(public, alice, root, client, settings):
    public("a", "52:54:00:00:00:01")
    _, manage = token_create(user=root, name="pbs", scopes=[TokenScope.CLUSTERS_MANAGE])
    _, network = token_create(user=root, name="noc", scopes=[TokenScope.NETWORK_READ])
    _, user = token_create(user=alice, name="laptop", scopes=[TokenScope.CLUSTERS_READ, TokenScope.CLUSTERS_WRITE])
    expected = {"size": 16, "free": 15, "allocated": 1, "resting": 0}
    for secret in (manage, network):
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        r = api.get("/api/public-prefixes/")
        assert r.status_code == 200
        [row] = r.data["results"]
        assert (row["name"], row["prefix"], row["subnet_length"], row["usage"]) == (
            "provider",
            "198.19.0.0/24",
            28,
            expected,
        )
        assert api.get(f"/api/public-prefixes/{row['id']}/").data["usage"] == expected
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {user}")
    assert api.get("/api/public-prefixes/").status_code == 403
    session = APIClient()
    session.force_login(alice)
    assert session.get("/api/public-prefixes/").status_code == 403  # not an administrator
    session.force_login(root)
    assert session.get("/api/public-prefixes/").data["results"][0]["usage"] == expected
    client.force_login(root)
    page = client.get("/admin/clusters/publicprefix/").content.decode()
    assert "15 of 16 (1, 0)" in page
    from portal.metrics import collect, render

    text = render(collect())
    assert 'virtcloud_public_subnets{prefix="provider",state="free"} 15' in text
    assert 'virtcloud_public_subnets{prefix="provider",state="allocated"} 1' in text
