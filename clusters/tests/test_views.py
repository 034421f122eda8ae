"""The home page lists the clusters a person can see, with their network, and nobody else's."""

import pytest
from rest_framework.test import APIClient

from clusters.models import Image
from network.tests.fakefabric import fabric_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def test_home_lists_own_and_group_clusters_only(
    fabric, client, alice, bob, charlie, team, django_assert_max_num_queries
):
    Image.objects.create(name="my-own", approved=False)
    api = APIClient()
    api.force_authenticate(alice)
    for i in range(3):
        r = api.post(
            "/api/clusters/",
            {
                "name": f"sim{i}",
                "image": "my-own",
                "group": team.name,
                "lifetime": 3600,
                "nodes": [{"name": "n1", "host": "brno1", "mac": f"52:54:00:00:0a:0{i}", "address": "198.18.1.1"}],
            },
            format="json",
        )
        assert r.status_code == 201, r.content
    client.force_login(bob)
    with django_assert_max_num_queries(12):
        page = client.get("/").content.decode()
    assert "sim0" in page and "sim2" in page and ">ready<" in page and "198.18.1.1" in page
    client.force_login(charlie)
    page = client.get("/").content.decode()
    assert "sim0" not in page and "No live cluster." in page
    client.logout()
    assert client.get("/").status_code == 302


def test_home_says_its_times_are_utc(fabric, client, alice):
    """The portal's times are UTC (the access page says so too): a user elsewhere must not read them as local."""
    from django.utils import timezone

    from clusters.models import VirtualCluster

    Image.objects.create(name="my-own", approved=False)
    api = APIClient()
    api.force_authenticate(alice)
    for i, name in enumerate(("kept", "gone")):
        r = api.post(
            "/api/clusters/",
            {
                "name": name,
                "image": "my-own",
                "nodes": [{"name": "n1", "host": "brno1", "mac": f"52:54:00:00:0b:0{i}"}],
            },
            format="json",
        )
        assert r.status_code == 201, r.content
    gone = VirtualCluster.objects.get(name="gone")
    assert api.post(f"/api/clusters/{gone.pk}/teardown/", {}, format="json").status_code == 202
    kept, gone = VirtualCluster.objects.get(name="kept"), VirtualCluster.objects.get(name="gone")
    assert gone.ended_at is not None
    client.force_login(alice)
    page = client.get("/").content.decode()
    utc = timezone.get_fixed_timezone(0)
    assert f">{kept.expires_at.astimezone(utc):%Y-%m-%d %H:%M} UTC</time>" in page  # (its "Extend" follows)
    assert f">{gone.ended_at.astimezone(utc):%Y-%m-%d %H:%M} UTC</time></td>" in page


def test_home_rows_lead_to_their_access_section_and_for_an_admin_to_the_admin(client, alice, bob, root, team):
    """A closed cluster of one's own or of one's group links to its row on the access page (which has that id);
    a public one, or another's that an admin sees, does not; an admin's rows link to the admin's change page."""
    from access.tests.fixtures import make_cluster

    closed = make_cluster(alice, name="closed", group=team)
    public = make_cluster(alice, name="public", connectivity="public")
    client.force_login(bob)  # a member of team
    page = client.get("/").content.decode()
    assert f'href="/access/#cluster-{closed.pk}"' in page and f"#cluster-{public.pk}" not in page
    assert "/admin/" not in page
    assert f'id="cluster-{closed.pk}"' in client.get("/access/").content.decode()
    row = page.split(f'data-cluster="{closed.pk}"')[1].split("</tr>")[0]
    assert '<ul class="nodes"><li><span class="nowrap"><code>node1</code> on ' in row  # name, host, address apart
    client.force_login(root)
    page = client.get("/").content.decode()
    assert f'href="/admin/clusters/virtualcluster/{closed.pk}/change/"' in page
    assert f'href="/admin/clusters/virtualcluster/{public.pk}/change/"' in page
    assert f"#cluster-{closed.pk}" not in page  # not root's: the access page would not list it


def test_home_tells_an_admin_the_list_is_everyone_s(client, alice, root):
    client.force_login(alice)
    assert "Virtual clusters you own or share through a group." in client.get("/").content.decode()
    client.force_login(root)
    page = client.get("/").content.decode()
    assert "you own or share" not in page and "Every user's virtual clusters (you are an administrator)." in page


def test_home_shows_the_step_a_cluster_in_transition_is_at(client, alice):
    from django.utils import timezone

    from access.tests.fixtures import make_cluster
    from clusters.models import ClusterStep, StepStatus

    busy = make_cluster(alice, name="busy", state="provisioning")
    done = make_cluster(alice, name="done")
    now = timezone.now()
    for cluster, name, status in (
        (busy, "allocate", StepStatus.OK),
        (busy, "network", StepStatus.RUNNING),
        (done, "network", StepStatus.RUNNING),
    ):
        ClusterStep.objects.create(cluster=cluster, name=name, status=status, started_at=now)
    client.force_login(alice)
    page = client.get("/").content.decode()
    assert "step network, 25 % done" in page
    assert page.count("step network") == 1  # a READY cluster shows no step (a stale one, say)
    api = APIClient()
    api.force_authenticate(alice)
    assert api.get(f"/api/clusters/{busy.pk}/").data["progress"] == {"percent": 25, "current": "network"}


def test_home_recently_ended_are_the_last_ten_to_end(client, alice):
    """ "Recently ended" is by the time each ended, not by creation: an old cluster torn down a minute ago is there
    although ten clusters made after it ended before."""
    from datetime import timedelta

    from django.utils import timezone

    from access.tests.fixtures import make_cluster
    from clusters.models import VirtualCluster

    now = timezone.now()
    old = make_cluster(alice, name="long-lived", state="torn_down")
    VirtualCluster.objects.filter(pk=old.pk).update(ended_at=now - timedelta(minutes=1))
    for i in range(10):
        job = make_cluster(alice, name=f"job{i}", state="torn_down")
        VirtualCluster.objects.filter(pk=job.pk).update(ended_at=now - timedelta(hours=1, minutes=i))
    client.force_login(alice)
    ended = client.get("/").context["ended"]
    assert [c.name for c in ended] == ["long-lived"] + [f"job{i}" for i in range(9)]


def test_home_lists_the_newest_live_clusters_up_to_a_cap_and_says_how_many_there_are(
    fabric, client, alice, root, monkeypatch
):
    """An administrator's page lists every user's live clusters: the newest ``HOME_LIVE_SHOWN`` of them (each row
    with its nodes and steps; thousands were one page), saying how many there are and where the rest are; the
    page is never cached (a shared browser's Back after logout showed the list)."""
    from clusters import views
    from clusters.tests.helpers import create_cluster

    for i in range(3):
        create_cluster(alice, f"c{i}", f"52:54:00:00:0b:0{i}")
    monkeypatch.setattr(views, "HOME_LIVE_SHOWN", 2)
    client.force_login(root)
    response = client.get("/")
    assert "no-store" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]
    page = response.content.decode()
    assert 'data-cluster="' in page and page.count('<tr data-cluster="') == 2
    assert ">c2<" in page and ">c1<" in page and ">c0<" not in page
    assert "The 2 newest of 3 live clusters: the " in page and "/admin/clusters/virtualcluster/" in page
    monkeypatch.setattr(views, "HOME_LIVE_SHOWN", 3)
    assert "newest of" not in client.get("/").content.decode()


def test_the_access_link_follows_the_share_rule(alice, bob, team, client):
    """An admin who is in the cluster's group sees its row (every cluster), but the link to enter it only while
    its owner is still in the group: the share ends when the owner leaves."""
    from access.tests.fixtures import make_cluster
    from portal.tests.test_staff_permissions import staff

    cluster = make_cluster(alice, name="mpi", group=team)
    viewer = staff("bobby", "clusters.view_virtualcluster")
    viewer.groups.add(team)
    client.force_login(viewer)
    link = f"/access/#cluster-{cluster.pk}"
    assert link in client.get("/").content.decode()
    alice.groups.remove(team)
    page = client.get("/").content.decode()
    assert f'data-cluster="{cluster.pk}"' in page and link not in page
