"""Who held a public address, and when (``PublicSubnetLease``): an abuse report names an address and a time, and
the operator finds the cluster, its owner and its job — through the admin's search or ``manage.py clusters
whois`` — long after the cluster ended and its subnet went to another. On the fake fabric with eager Celery."""
# ruff: noqa: F401, F811 (the pytest fixture public is imported from clusters.tests.helpers)

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from django.utils import timezone

from clusters import selectors, services
from clusters.models import PublicSubnetLease, VirtualCluster
from clusters.tests.helpers import public
from network.tests.fakefabric import fabric_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def create(public):
    def make(name, mac, **extra) -> VirtualCluster:
        return VirtualCluster.objects.get(pk=public(name, mac, **extra)["id"])

    return make


def _at(lease: PublicSubnetLease, seconds: float):
    return lease.started_at + timedelta(seconds=seconds)


def test_an_address_is_traced_to_each_cluster_that_held_it_and_when(create, root, alice, settings):
    settings.PUBLIC_SUBNET_HOLD_DOWN = 0  # (the next cluster gets the same subnet at once)
    first = create("web", "52:54:00:00:00:01", job_id="77.pbs")
    assert first.public_subnet == "198.19.0.0/28"
    lease = PublicSubnetLease.objects.get(cluster=first)
    assert (lease.subnet, lease.owner, lease.group, lease.job_id, lease.ended_at) == (
        "198.19.0.0/28",
        "alice",
        "",
        "77.pbs",
        None,
    )
    address = "198.19.0.9"  # any address of the subnet: the VMs' users are root
    assert list(selectors.public_address_holders(address)) == [lease]
    assert not selectors.public_address_holders("198.19.0.16").exists()  # the next subnet: nobody's

    services.cluster_teardown(cluster=first, reason="job ended")
    lease.refresh_from_db()
    assert lease.ended_at is not None and lease.cluster_name == "web"
    second = create("db", "52:54:00:00:00:02")
    assert second.public_subnet == "198.19.0.0/28"  # the same subnet, someone else's now
    later = PublicSubnetLease.objects.get(cluster=second)
    # the cluster's row deleted (its retention over): the lease stays, with its names
    VirtualCluster.objects.filter(pk=first.pk).delete()
    lease.refresh_from_db()
    assert lease.cluster_id is None and lease.owner == "alice"

    assert list(selectors.public_address_holders(address, at=_at(lease, 0.001))) == [lease]
    assert list(selectors.public_address_holders(address, at=later.started_at)) == [later]
    assert list(selectors.public_address_holders(address)) == [later, lease]
    assert not selectors.public_address_holders(address, at=lease.started_at - timedelta(seconds=1)).exists()

    out = StringIO()
    call_command("clusters", "whois", address, "--at", _at(lease, 0.001).isoformat(), stdout=out)
    assert out.getvalue() == (
        f"198.19.0.0/28: cluster web (owner alice, job 77.pbs) from {lease.started_at.isoformat()} "
        f"until {lease.ended_at.isoformat()}\n"
    )
    out = StringIO()
    call_command("clusters", "whois", address, stdout=out)
    assert out.getvalue().splitlines()[0].startswith("198.19.0.0/28: cluster db (owner alice) from ")
    assert out.getvalue().splitlines()[0].endswith(" until now")
    with pytest.raises(CommandError, match="no public cluster held 198.19.0.200"):
        call_command("clusters", "whois", "198.19.0.200")
    with pytest.raises(CommandError, match="not an IP address: 'web'"):
        call_command("clusters", "whois", "web")
    with pytest.raises(CommandError, match="not an ISO 8601 time"):
        call_command("clusters", "whois", address, "--at", "yesterday")

    # the admin's search: an address, or an address and a time
    from django.test import Client

    admin = Client()
    admin.force_login(root)
    url = reverse("admin:clusters_publicsubnetlease_changelist")
    page = admin.get(url, {"q": address})
    assert page.status_code == 200 and list(page.context["cl"].result_list) == [later, lease]
    page = admin.get(url, {"q": f"{address} {_at(lease, 0.001).isoformat()}"})
    assert list(page.context["cl"].result_list) == [lease]
    assert list(admin.get(url, {"q": "db"}).context["cl"].result_list) == [later]  # by name, as any search
    assert admin.get(reverse("admin:clusters_publicsubnetlease_add")).status_code == 403  # the portal's rows


def test_an_override_to_closed_ends_the_lease_and_one_to_public_starts_another(create, root):
    cluster = create("web", "52:54:00:00:00:01")
    services.connectivity_override(cluster=cluster, connectivity="closed", admin=root, reason="legacy software")
    (lease,) = PublicSubnetLease.objects.filter(cluster=cluster)
    assert lease.ended_at is not None
    services.connectivity_override(
        cluster=VirtualCluster.objects.get(pk=cluster.pk), connectivity="public", admin=root, reason="fixed"
    )
    again = PublicSubnetLease.objects.filter(cluster=cluster, ended_at=None).get()
    assert again.subnet == VirtualCluster.objects.get(pk=cluster.pk).public_subnet and again.pk != lease.pk


def test_withdrawing_an_images_approval_closes_its_live_public_clusters(create, root, client):
    """The provider no longer vouches for the image: its live public clusters become closed (an override by the
    admin, saying why: their subnets' leases end), an admin's own override to public stays, and later clusters
    booting it are closed by the policy."""
    from clusters.models import Image

    web = create("web", "52:54:00:00:00:01")
    vouched = create("vouched", "52:54:00:00:00:02")
    services.connectivity_override(cluster=vouched, connectivity="closed", admin=root, reason="x")
    services.connectivity_override(
        cluster=VirtualCluster.objects.get(pk=vouched.pk), connectivity="public", admin=root, reason="checked it"
    )
    image = Image.objects.get(name="debian-12")
    from portal.tests.test_staff_permissions import staff

    images_only = staff("curator", "clusters.change_image", "clusters.view_image")  # not the clusters'
    client.force_login(images_only)
    r = client.post(
        reverse("admin:clusters_image_changelist"),
        {"action": "withdraw_approval", "_selected_action": [image.pk]},
        follow=True,
    )
    assert r.status_code == 200 and "Nothing withdrawn: only an administrator who may change images and" in (
        r.content.decode()
    )
    assert Image.objects.get(pk=image.pk).approved
    client.force_login(root)
    r = client.post(
        reverse("admin:clusters_image_changelist"),
        {"action": "withdraw_approval", "_selected_action": [image.pk]},
        follow=True,
    )
    assert "1 image(s) no longer approved; 1 public cluster(s) booting them closed." in r.content.decode()
    web.refresh_from_db()
    assert (web.connectivity, web.public_subnet) == ("closed", "")
    assert web.connectivity_reason == "overridden by root: image debian-12 is no longer approved"
    assert PublicSubnetLease.objects.get(cluster=web).ended_at is not None
    assert VirtualCluster.objects.get(pk=vouched.pk).connectivity == "public"
    assert not Image.objects.get(pk=image.pk).approved
    assert create("later", "52:54:00:00:00:03").connectivity == "closed"


def test_a_public_cluster_left_by_a_withdrawal_is_closed_by_the_periodic_sweep(create, root):
    """A cluster in a workflow when the approval was withdrawn (or committed public by a create meanwhile) was
    only named "withdraw again later" — and stayed public, on the provider's routed addresses, until it ended. The
    periodic expiry closes it once it is READY, by the policy (not an override), and ends its lease."""
    from clusters import tasks
    from clusters.models import ClusterState, Image

    web = create("web", "52:54:00:00:00:01")
    vouched = create("vouched", "52:54:00:00:00:02")
    services.connectivity_override(cluster=vouched, connectivity="closed", admin=root, reason="x")
    services.connectivity_override(
        cluster=VirtualCluster.objects.get(pk=vouched.pk), connectivity="public", admin=root, reason="checked it"
    )
    VirtualCluster.objects.filter(pk=web.pk).update(state=ClusterState.UPDATING)  # a node change, say
    image = Image.objects.get(name="debian-12")
    closed, left = services.image_approval_withdraw(image=image, admin=root)
    assert closed == [] and [(c.pk, why) for c, why in left] == [(web.pk, "in a workflow now")]
    assert services.clusters_close_unapproved_public() == []  # still in its workflow: a later run
    VirtualCluster.objects.filter(pk=web.pk).update(state=ClusterState.READY)  # its workflow ended
    tasks.expire()
    web.refresh_from_db()
    assert (web.connectivity, web.public_subnet, web.connectivity_overridden_by) == ("closed", "", None)
    assert web.connectivity_reason == "closed by the policy: image debian-12 is no longer approved"
    assert PublicSubnetLease.objects.get(cluster=web).ended_at is not None
    assert VirtualCluster.objects.get(pk=vouched.pk).connectivity == "public"  # the admin vouched for it
    assert services.clusters_close_unapproved_public() == []
    # the admin's account deleted since (the override's column is emptied): still their override, still public
    VirtualCluster.objects.filter(pk=vouched.pk).update(connectivity_overridden_by=None)
    assert services.clusters_close_unapproved_public() == []
    assert VirtualCluster.objects.get(pk=vouched.pk).connectivity == "public"


def test_an_approved_images_source_stays_while_public_clusters_boot_it(create, alice):
    """Its live public clusters are public because the image was approved, and a node added would boot the new
    source on the provider's addresses: the owner changes its source once they have ended."""
    from rest_framework.test import APIClient

    from clusters.models import Image

    Image.objects.filter(name="debian-12").update(owner=alice)
    web = create("web", "52:54:00:00:00:01")
    api = APIClient()
    api.force_authenticate(alice)
    r = api.patch("/api/images/debian-12/", {"source": "https://example.org/other.qcow2"}, format="json")
    assert r.status_code == 409 and "live public clusters boot image debian-12" in r.data["detail"]
    assert Image.objects.get(name="debian-12").approved
    services.cluster_teardown(cluster=web, reason="done")
    assert (
        api.patch("/api/images/debian-12/", {"source": "https://example.org/other.qcow2"}, format="json").status_code
        == 200
    )
    assert not Image.objects.get(name="debian-12").approved


def test_a_closed_cluster_holds_no_public_subnet(create):
    create("quiet", "52:54:00:00:00:01", connectivity="closed")
    assert not PublicSubnetLease.objects.exists()


def test_leases_are_pruned_after_the_history_retention(create, settings):
    from clusters.services import cluster_events_prune

    cluster = create("web", "52:54:00:00:00:01")
    services.cluster_teardown(cluster=cluster, reason="done")
    create("db", "52:54:00:00:00:02")  # live: never pruned
    PublicSubnetLease.objects.filter(cluster=cluster).update(
        ended_at=timezone.now() - timedelta(days=settings.HISTORY_RETENTION, seconds=1)
    )
    cluster_events_prune()
    assert list(PublicSubnetLease.objects.values_list("cluster_name", flat=True)) == ["db"]


def test_a_job_id_as_long_as_the_api_takes_is_leased_whole(create):
    cluster = create("long", "52:54:00:00:00:01", job_id="j" * 200)
    assert PublicSubnetLease.objects.get(cluster=cluster).job_id == "j" * 200


def test_a_subnet_given_back_rests_before_another_cluster_gets_it(create, root, settings):
    settings.PUBLIC_SUBNET_HOLD_DOWN = 600
    first = create("web", "52:54:00:00:00:01")
    services.cluster_teardown(cluster=first, reason="done")
    overridden = create("db", "52:54:00:00:00:02")
    assert overridden.public_subnet == "198.19.0.16/28"  # not web's: its router may still route it there
    services.connectivity_override(cluster=overridden, connectivity="closed", admin=root, reason="legacy software")
    assert create("third", "52:54:00:00:00:03").public_subnet == "198.19.0.32/28"  # nor db's, now closed
    PublicSubnetLease.objects.filter(ended_at__isnull=False).update(ended_at=timezone.now() - timedelta(seconds=601))
    assert create("fourth", "52:54:00:00:00:04").public_subnet == "198.19.0.0/28"  # rested: the lowest again


def test_a_public_cluster_a_process_of_the_release_before_made_gets_its_lease(create):
    """A rolling upgrade: web processes of the release before make public clusters without a lease until they
    restart; the periodic expiry records it (once)."""
    cluster = create("web", "52:54:00:00:00:01")
    PublicSubnetLease.objects.filter(cluster=cluster).delete()  # as the release before made it
    assert services.clusters_lease_public_subnets() == [cluster.pk]
    assert services.clusters_lease_public_subnets() == []
    lease = PublicSubnetLease.objects.get(cluster=cluster)
    assert (lease.subnet, lease.ended_at) == (cluster.public_subnet, None)
    assert list(selectors.public_address_holders("198.19.0.5")) == [lease]


def test_a_search_time_is_read_in_utc_and_one_beyond_the_calendar_is_none():
    """``moment`` (the admin's lease search, an abuse report's time): in UTC; a time whose UTC falls outside
    years 1-9999 is no time (SQLite's conversion raised OverflowError: a 500 in the admin)."""
    from datetime import UTC, datetime

    assert selectors.moment("2026-12-01T10:00Z") == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert selectors.moment("2026-12-01T11:00+01:00") == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert selectors.moment("2026-12-01 10:00") == datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    assert selectors.moment("9999-12-31T23:59-05:00") is None
    assert selectors.moment("0001-01-01T00:00+05:00") is None
    assert selectors.moment("yesterday") is None
