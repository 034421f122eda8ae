"""Clusters in Django admin: the expiry is the one editable field, checked before anything is saved."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from clusters import services
from clusters.models import ClusterState, Node, VirtualCluster
from clusters.tests.helpers import create_cluster
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import AuditEntry

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cluster(fabric, alice):
    return VirtualCluster.objects.get(pk=create_cluster(alice))


def bulk_delete(client, cluster):
    """The change list's "delete selected" on ``cluster``, confirmed."""
    return client.post(
        "/admin/clusters/virtualcluster/",
        {"action": "delete_selected", "_selected_action": [cluster.pk], "post": "yes"},
        follow=True,
    )


def change_form(client, cluster, expires_at) -> dict:
    """What the admin change page posts (its hidden inputs: the inline management forms), with a new expiry."""
    page = client.get(f"/admin/clusters/virtualcluster/{cluster.pk}/change/").content.decode()
    data = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
    data.pop("csrfmiddlewaretoken", None)
    local = timezone.localtime(expires_at)
    data.update({"expires_at_0": local.strftime("%Y-%m-%d"), "expires_at_1": local.strftime("%H:%M:%S")})
    return data


def post(client, cluster, expires_at):
    return client.post(
        f"/admin/clusters/virtualcluster/{cluster.pk}/change/", change_form(client, cluster, expires_at), follow=True
    )


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_admin_extends_a_ready_cluster_and_it_is_audited(client, root, cluster):
    client.force_login(root)
    later = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    r = post(client, cluster, later)
    assert r.status_code == 200
    assert any("changed successfully" in m for m in messages_of(r))
    cluster.refresh_from_db()
    assert cluster.expires_at == later
    assert AuditEntry.objects.filter(object_id=str(cluster.pk), changes__has_key="expires_at").exists()


@pytest.mark.parametrize(
    "when, error",
    [
        (timedelta(days=1000), "the lifetime must be at most 90 days from creation"),
        (timedelta(seconds=-5), "the expiry is in the past: it must be at least 1 min from now"),
        (timedelta(seconds=30), "the lifetime must be at least 1 min from now"),
    ],
)
def test_admin_refuses_an_expiry_out_of_bounds_on_the_field(client, root, cluster, when, error):
    client.force_login(root)
    before = cluster.expires_at
    r = post(client, cluster, timezone.now() + when)
    assert r.status_code == 200
    assert error in str(r.context["adminform"].form.errors["expires_at"])
    assert not any("changed successfully" in m for m in messages_of(r))
    cluster.refresh_from_db()
    assert cluster.expires_at == before


def test_admin_refuses_to_extend_an_ended_cluster(client, root, cluster):
    services.cluster_teardown(cluster=cluster, reason="test")
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TORN_DOWN  # eager Celery: the teardown ran
    client.force_login(root)
    before = cluster.expires_at
    r = post(client, cluster, timezone.now() + timedelta(days=2))
    assert "cannot be extended" in str(r.context["adminform"].form.errors["expires_at"])
    assert not any("changed successfully" in m for m in messages_of(r))
    cluster.refresh_from_db()
    assert cluster.expires_at == before


def test_a_teardown_between_the_check_and_the_save_is_reported_not_called_a_success(client, root, cluster, monkeypatch):
    """The form's check passed, then the cluster stopped being active before the save: the service, which
    checks again under the row lock, refuses; the page says why and does not say "changed successfully"."""
    real_check = services.cluster_extend_check
    calls = []

    def check_then_teardown(*, cluster, expires_at):
        real_check(cluster=cluster, expires_at=expires_at)
        calls.append(cluster.pk)
        if len(calls) == 1:  # the form's check: a teardown lands right after it
            VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.TEARING_DOWN)

    monkeypatch.setattr(services, "cluster_extend_check", check_then_teardown)
    client.force_login(root)
    before = cluster.expires_at
    r = post(client, cluster, timezone.now() + timedelta(days=2))
    msgs = messages_of(r)
    assert any(m.startswith("Not saved: cluster c1 is tearing down") for m in msgs), msgs
    assert not any("changed successfully" in m for m in msgs)
    cluster.refresh_from_db()
    assert cluster.expires_at == before


def test_admin_refuses_to_delete_a_live_cluster_tear_it_down_first(client, root, cluster):
    """Deleting the row of a live cluster would leave its VLAN on the switches and hosts (the segment
    outlives it) and its VPN and SSH credentials valid: its page has no Delete button (the delete page is
    refused), and the bulk action says to tear it down first."""
    client.force_login(root)
    change = f"/admin/clusters/virtualcluster/{cluster.pk}/change/"
    assert 'class="deletelink"' not in client.get(change).content.decode()
    assert client.get(f"/admin/clusters/virtualcluster/{cluster.pk}/delete/").status_code == 403
    assert client.post(f"/admin/clusters/virtualcluster/{cluster.pk}/delete/", {"post": "yes"}).status_code == 403
    r = bulk_delete(client, cluster)
    assert "tear it down first" in r.content.decode()
    assert VirtualCluster.objects.filter(pk=cluster.pk).exists()

    services.cluster_teardown(cluster=cluster, reason="test")  # eager Celery: it ends now
    ended_long_ago(cluster)
    assert 'class="deletelink"' in client.get(change).content.decode()
    r = client.post(f"/admin/clusters/virtualcluster/{cluster.pk}/delete/", {"post": "yes"}, follow=True)
    assert r.status_code == 200
    assert not VirtualCluster.objects.filter(pk=cluster.pk).exists()


def ended_long_ago(cluster) -> None:
    """As if ``cluster`` had ended longer ago than the event feed keeps its events."""
    from django.conf import settings

    ended = timezone.now() - timedelta(days=settings.CLUSTER_EVENT_RETENTION, minutes=1)
    VirtualCluster.objects.filter(pk=cluster.pk).update(ended_at=ended, updated_at=ended)


def test_admin_keeps_an_ended_clusters_row_while_its_events_and_keys_answer_for_it(client, root, cluster, settings):
    """Its events go with the row: a feed reader or a webhook behind would never learn the cluster ended, and a
    scheduler's retry with its Idempotency-Key would make a second cluster. So the row stays for
    CLUSTER_EVENT_RETENTION days after the cluster ended (the page says until when), then may go."""
    settings.CLUSTER_EVENT_RETENTION = 30
    services.cluster_teardown(cluster=cluster, reason="test")  # eager Celery: it ends now
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TORN_DOWN
    client.force_login(root)
    assert client.get(f"/admin/clusters/virtualcluster/{cluster.pk}/delete/").status_code == 403
    r = bulk_delete(client, cluster)
    until = timezone.localtime(cluster.ended_at + timedelta(days=30))
    assert "ended less than CLUSTER_EVENT_RETENTION (30) days ago" in r.content.decode()
    assert f"it can be deleted from {until:%Y-%m-%d %H:%M}" in r.content.decode()
    assert VirtualCluster.objects.filter(pk=cluster.pk).exists()

    ended_long_ago(cluster)
    r = bulk_delete(client, cluster)
    assert r.status_code == 200 and not VirtualCluster.objects.filter(pk=cluster.pk).exists()


def test_admin_refuses_to_delete_a_failed_cluster_whose_network_is_not_rolled_back_yet(client, root, cluster):
    """A failed cluster whose network is still live (its rollback could not be sent, or is running) keeps its row:
    the sweeper that rolls such networks back works from it; deleted, the VLAN would stay on the devices for good.
    Once the network is rolled back, the row may go."""
    from network.models import Segment

    VirtualCluster.objects.filter(pk=cluster.pk).update(state=ClusterState.FAILED)
    assert cluster.segment.state in Segment.LIVE_STATES
    client.force_login(root)
    assert client.get(f"/admin/clusters/virtualcluster/{cluster.pk}/delete/").status_code == 403
    r = bulk_delete(client, cluster)
    assert "network is still being rolled back: wait until it is released" in r.content.decode()
    assert VirtualCluster.objects.filter(pk=cluster.pk).exists()

    Segment.objects.filter(pk=cluster.segment_id).update(state=Segment.State.FAILED)
    ended_long_ago(cluster)
    r = client.post(f"/admin/clusters/virtualcluster/{cluster.pk}/delete/", {"post": "yes"}, follow=True)
    assert r.status_code == 200 and not VirtualCluster.objects.filter(pk=cluster.pk).exists()


def test_the_teardown_action_on_an_ended_cluster_says_why_and_nothing_else(client, root, cluster):
    services.cluster_teardown(cluster=cluster, reason="test")  # eager Celery: torn down now
    client.force_login(root)
    r = client.post(
        "/admin/clusters/virtualcluster/",
        {"action": "teardown", "_selected_action": [cluster.pk], "apply": "1"},
        follow=True,
    )
    page = r.content.decode()
    assert f"cluster {cluster.name} has ended (torn down): nothing to tear down" in page
    assert "Teardown started" not in page


def test_the_teardown_action_asks_first_then_tears_down(client, root, cluster):
    """The action names the clusters and what a teardown does, and changes nothing until confirmed."""
    client.force_login(root)
    selected = {"action": "teardown", "_selected_action": [cluster.pk]}
    page = client.post("/admin/clusters/virtualcluster/", selected)
    assert page.status_code == 200
    text = page.content.decode()
    assert f"{cluster.name} (alice): ready, VLAN {cluster.vlan_id}" in text
    assert "its VLAN goes back to the pool after the pool's quarantine" in text and "is revoked" in text
    assert 'name="apply"' in text and "csrfmiddlewaretoken" in text
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY

    r = client.post("/admin/clusters/virtualcluster/", {**selected, "apply": "1"}, follow=True)
    assert "Teardown started for 1 cluster(s)." in messages_of(r)
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TORN_DOWN  # eager Celery: the teardown ran
    assert cluster.state_reason == "admin root"
    assert AuditEntry.objects.filter(object_id=str(cluster.pk), message="teardown: admin root").exists()


def test_a_live_clusters_page_has_a_tear_down_button_behind_the_confirmation(client, root, cluster):
    client.force_login(root)
    change = f"/admin/clusters/virtualcluster/{cluster.pk}/change/"
    teardown = f"/admin/clusters/virtualcluster/{cluster.pk}/teardown/"
    assert f'href="{teardown}"' in client.get(change).content.decode()
    page = client.get(teardown)
    assert page.status_code == 200 and f"{cluster.name} (alice): ready" in page.content.decode()
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY

    r = client.post(teardown, {"apply": "1"})
    assert r.status_code == 302 and r.url == change
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.TORN_DOWN
    assert teardown not in client.get(change).content.decode()  # ended: nothing to tear down


def test_a_view_only_admin_neither_tears_down_nor_sees_the_button(client, cluster, django_user_model):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("vera", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_virtualcluster"))
    client.force_login(viewer)
    teardown = f"/admin/clusters/virtualcluster/{cluster.pk}/teardown/"
    assert teardown not in client.get(f"/admin/clusters/virtualcluster/{cluster.pk}/change/").content.decode()
    assert client.post(teardown, {"apply": "1"}).status_code == 403
    client.post(
        "/admin/clusters/virtualcluster/", {"action": "teardown", "_selected_action": [cluster.pk], "apply": "1"}
    )
    cluster.refresh_from_db()
    assert cluster.state == ClusterState.READY


def test_the_cluster_page_shows_node_addresses_without_row_titles_or_internals(client, root, cluster):
    Node.objects.filter(cluster=cluster).update(address="10.0.0.11")
    client.force_login(root)
    page = client.get(f"/admin/clusters/virtualcluster/{cluster.pk}/change/").content.decode()
    assert re.search(r'<td class="field-address">\s*<p>10\.0\.0\.11</p>', page)
    assert page.count('class="module no-row-titles"') == 2  # nodes and steps: their rows' raw names hidden
    assert ".no-row-titles td.original p { display: none; }" in page
    assert "Workflow generation" not in page
    listing = client.get("/admin/clusters/virtualcluster/").content.decode()
    assert "column-vlan_id" in listing and "column-created_at" not in listing


def test_admin_overrides_the_connectivity_policy_with_a_reason_and_it_is_audited(client, root, cluster):
    """Admin action: a page asks the connectivity and the reason (required); the override is applied through
    the service (audited with the admin's name), and a cluster that is not ready is named with why."""
    from clusters.models import Connectivity, PublicPrefix

    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    ended = VirtualCluster.objects.get(pk=create_cluster(root, name="ended", mac="52:54:00:00:00:02", host="brno2"))
    services.cluster_teardown(cluster=ended, reason="test")
    client.force_login(root)
    url = "/admin/clusters/virtualcluster/"
    selected = {"action": "override_connectivity", "_selected_action": [cluster.pk, ended.pk]}
    page = client.post(url, selected)
    assert page.status_code == 200 and "Override the connectivity policy" in page.content.decode()
    assert "reason" in page.context["form"].fields
    refused = client.post(url, {**selected, "apply": "1", "connectivity": Connectivity.PUBLIC, "reason": ""})
    assert refused.status_code == 200 and refused.context["form"].errors["reason"]
    assert VirtualCluster.objects.get(pk=cluster.pk).connectivity == cluster.connectivity
    target = Connectivity.PUBLIC if cluster.connectivity == Connectivity.CLOSED else Connectivity.CLOSED
    r = client.post(url, {**selected, "apply": "1", "connectivity": target, "reason": "a test"}, follow=True)
    assert r.status_code == 200
    text = messages_of(r)
    assert "Connectivity set for 1 cluster(s); their network follows." in text, text
    assert any(m.startswith("ended: ") for m in text), text
    cluster.refresh_from_db()
    assert cluster.connectivity == target and cluster.connectivity_overridden_by == root
    assert "a test" in cluster.connectivity_reason
    assert AuditEntry.objects.filter(object_id=str(cluster.pk), message__startswith="connectivity ").exists()


def test_the_cluster_change_page_costs_the_same_queries_for_many_nodes(client, root, cluster, fabric):
    """Its node rows showed each node's hosts and, in the row title, its cluster: three queries a row — a
    300-node cluster's page took ~900."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client.force_login(root)
    url = f"/admin/clusters/virtualcluster/{cluster.pk}/change/"

    def queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(url).status_code == 200
        return len(ctx.captured_queries)

    few = queries()
    host = fabric.hosts["pilsen1"]
    for n in range(8):
        Node.objects.create(
            cluster_id=cluster.pk, name=f"x{n}", host=host, target_host=host, mac=f"52:54:00:00:10:{n:02x}"
        )
    assert queries() == few


def test_the_image_admin_shares_a_users_image_only_with_a_group_of_its_owner_and_never_retires_it(client, root, alice):
    """As the owner's own change is refused: shared with a group its owner is not in, its members never saw it
    (``images_usable``) while the admin was told it was saved. Retiring is a delete (which live clusters booting it
    refuse), not a date to type in."""
    from django.contrib.auth.models import Group

    from clusters.models import Image

    image = Image.objects.create(owner=alice, name="mine", source="https://images.example.org/mine.qcow2")
    other, own = Group.objects.create(name="strangers"), Group.objects.create(name="image-sharers")
    alice.groups.add(own)
    client.force_login(root)
    url = f"/admin/clusters/image/{image.pk}/change/"
    form = {"name": "mine", "owner": alice.pk, "description": "", "source": image.source}
    response = client.post(url, {**form, "group": other.pk})
    refused = "strangers: not a group the owner is a member of"
    assert response.status_code == 200 and refused in response.content.decode()
    image.refresh_from_db()
    assert image.group is None
    assert client.post(url, {**form, "group": own.pk}).status_code == 302
    image.refresh_from_db()
    assert image.group == own
    assert 'name="retired_at"' not in client.get(url).content.decode()
