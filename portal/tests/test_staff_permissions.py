"""Staff get in the API and the browser pages what the Django admin grants them, no more: a superuser everything;
another staff member sees everyone's clusters (credentials, images) only with the model's ``view`` (or ``change``)
permission and acts on them only with ``change``; one without either is an ordinary user. (Being staff only lets
one into the admin: an LDAP staff group also holds the help desk.)"""
# ruff: noqa: F401, F811 (pytest fixtures imported from other test modules are parameters here)

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from access import services as access_services
from access.models import Credential, CredentialKind
from access.tests.fixtures import make_cluster, make_gateway
from clusters.models import ClusterState, Image, Node, NodeState, PublicPrefix, VirtualCluster
from clusters.tests.helpers import create_cluster, life_cycle_attempts
from network.tests.fakefabric import fabric_fixture
from portal.models import TokenScope
from portal.tests.helpers import logged_in
from portal.tokens import token_create


def staff(name: str, *codenames: str) -> User:
    """A staff member (who may open the admin) with only the permissions ``codenames`` ("app.codename")."""
    user = User.objects.create_user(name, f"{name}@example.org", "x", is_staff=True)
    for full in codenames:
        app, codename = full.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app, codename=codename))
    return User.objects.get(pk=user.pk)  # (no permission cache from before they were given)


def api_as(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def api_with_token(user, *scopes: str) -> APIClient:
    _, secret = token_create(user=user, name="t", scopes=list(scopes))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def host_key() -> str:
    from access import ssh

    return " ".join(ssh.generate_user_key().public_line.split()[:2]) + " root@node1"


def host_cert_post(client, cluster, node="node1"):
    body = {"cluster": cluster.pk, "node": node, "public_key": host_key()}
    return client.post("/api/access/host-certificates/", body, format="json")


def host_access_get(client, cluster, node="node1"):
    return client.get("/api/access/host-certificates/access/", {"cluster": cluster.pk, "node": node})


# --- clusters, through the API (a real cluster on the fake fabric) ---------------------------------------------


@pytest.fixture
def fabric_cluster(fabric, transactional_db, alice) -> VirtualCluster:
    """alice's READY cluster (one node n1 on brno1), built by the workflow; a public prefix to override to."""
    Image.objects.create(name="debian-12", approved=True)
    PublicPrefix.objects.create(name="provider", prefix="198.19.0.0/24", subnet_length=28)
    return VirtualCluster.objects.get(pk=create_cluster(alice, name="mpi"))


def _snapshot(cluster: VirtualCluster) -> tuple:
    cluster = VirtualCluster.objects.get(pk=cluster.pk)
    nodes = sorted(Node.objects.filter(cluster=cluster).values_list("name", "host__name", "state", "target_host_id"))
    return cluster.state, cluster.expires_at, cluster.connectivity, cluster.public_subnet, nodes


def _every_change(client, cluster) -> dict[str, int]:
    """Each change of the clusters API tried on ``cluster`` by ``client``: its status code."""
    base = f"/api/clusters/{cluster.pk}"
    node = Node.objects.get(cluster=cluster, name="n1")
    later = (cluster.expires_at + timedelta(hours=1)).isoformat()
    more = {"nodes": [{"name": "n2", "host": "pilsen1", "mac": "52:54:00:00:00:02"}]}
    target = {"target_host": "pilsen1"}
    return {
        "extend": client.patch(f"{base}/", {"expires_at": later}, format="json").status_code,
        "nodes": client.post(f"{base}/nodes/", more, format="json").status_code,
        "migrate": client.post(f"{base}/nodes/{node.pk}/migrate/", target, format="json").status_code,
        "migrated": client.post(f"{base}/nodes/{node.pk}/migrated/", {}, format="json").status_code,
        "cancel": client.post(f"{base}/nodes/{node.pk}/migrate/cancel/", {}, format="json").status_code,
        "remove": client.delete(f"{base}/nodes/{node.pk}/").status_code,
        "connectivity": client.post(
            f"{base}/connectivity/", {"connectivity": "public", "reason": "vetted"}, format="json"
        ).status_code,
        "teardown": client.post(f"{base}/teardown/", {"reason": "help desk"}, format="json").status_code,
    }


@pytest.mark.django_db(transaction=True)
def test_a_view_only_staff_member_sees_every_cluster_but_changes_none(fabric_cluster, alice):
    viewer = staff("vera", "clusters.view_virtualcluster")
    api = api_as(viewer)
    listed = api.get("/api/clusters/").json()
    assert [c["id"] for c in listed["results"]] == [fabric_cluster.pk]  # alice's, though not vera's
    assert api.get(f"/api/clusters/{fabric_cluster.pk}/").status_code == 200
    assert api.get(f"/api/clusters/{fabric_cluster.pk}/wait/?timeout=0").status_code == 200
    before = _snapshot(fabric_cluster)
    assert _every_change(api, fabric_cluster) == dict.fromkeys(
        ("extend", "nodes", "migrate", "migrated", "cancel", "remove", "connectivity", "teardown"), 403
    )
    assert _snapshot(fabric_cluster) == before
    assert (before[0], before[2]) == (ClusterState.READY, "closed")
    # nor does she act for alice: no cluster created in her name, no quota of hers read as if an admin's
    body = {
        "name": "x",
        "owner": "alice",
        "image": "my-own",
        "lifetime": 3600,
        "nodes": [{"name": "n", "host": "brno1", "mac": "52:54:00:00:09:01"}],
    }
    assert api.post("/api/clusters/", body, format="json").status_code == 403
    assert not VirtualCluster.objects.filter(name="x").exists()
    assert api.get("/api/clusters/quota/?owner=alice").status_code == 200  # a read: she sees alice's clusters
    # the clusters page says she sees every user's, and offers her no action on alice's
    page = logged_in(viewer).get("/").content.decode()
    assert "Every user&#x27;s virtual clusters" in page or "Every user's virtual clusters" in page
    assert f"/clusters/{fabric_cluster.pk}/teardown/" not in page


@pytest.mark.django_db(transaction=True)
def test_a_staff_member_who_may_change_clusters_acts_on_everyones(fabric_cluster, alice):
    operator = staff("otto", "clusters.change_virtualcluster")
    api = api_as(operator)
    base = f"/api/clusters/{fabric_cluster.pk}"
    assert api.get("/api/clusters/").json()["count"] == 1  # change lets one view too
    later = (fabric_cluster.expires_at + timedelta(hours=1)).replace(microsecond=0)
    r = api.patch(f"{base}/", {"expires_at": later.isoformat()}, format="json")
    assert r.status_code == 200, r.content
    r = api.post(f"{base}/connectivity/", {"connectivity": "public", "reason": "vetted"}, format="json")
    assert r.status_code == 202, r.content
    cluster = VirtualCluster.objects.get(pk=fabric_cluster.pk)
    assert (cluster.expires_at, cluster.connectivity) == (later, "public")
    assert cluster.connectivity_overridden_by == operator
    r = api.post(f"{base}/teardown/", {"reason": "help desk"}, format="json")
    assert r.status_code == 202, r.content
    assert VirtualCluster.objects.get(pk=fabric_cluster.pk).state in (ClusterState.TEARING_DOWN, ClusterState.TORN_DOWN)


@pytest.mark.django_db(transaction=True)
def test_a_staff_member_without_permissions_is_an_ordinary_user(fabric_cluster, alice):
    nobody = staff("nora")
    api = api_as(nobody)
    assert api.get("/api/clusters/").json()["count"] == 0
    assert api.get(f"/api/clusters/{fabric_cluster.pk}/").status_code == 404
    before = _snapshot(fabric_cluster)
    assert set(_every_change(api, fabric_cluster).values()) == {404}
    assert _snapshot(fabric_cluster) == before
    assert api.get("/api/clusters/quota/?owner=alice").status_code == 403
    assert api.get("/api/clusters/events/?timeout=0").json()["events"] == []
    assert api.get("/api/access/clusters/").json()["count"] == 0
    assert api.get("/api/public-networks/").status_code == 403
    assert logged_in(nobody).get("/metrics").status_code == 403
    # her own clusters are hers to change, as anyone's
    own = create_cluster(nobody, name="mine", mac="52:54:00:00:00:09")
    assert api.post(f"/api/clusters/{own}/teardown/", {}, format="json").status_code == 202


@pytest.mark.django_db(transaction=True)
def test_an_admins_token_is_as_strong_as_its_scopes_and_the_connectivity_override_as_its_user(fabric_cluster):
    """A ``clusters:manage`` token (the middleware) acts on every cluster, as before; the policy override also
    needs its user to be an administrator who may change clusters, as in the admin."""
    viewer = staff("vera", "clusters.view_virtualcluster")
    write = api_with_token(viewer, TokenScope.CLUSTERS_WRITE)
    assert write.get("/api/clusters/").json()["count"] == 0  # through clusters:write: her own only
    manage = api_with_token(viewer, TokenScope.CLUSTERS_MANAGE)
    r = manage.post(
        f"/api/clusters/{fabric_cluster.pk}/connectivity/", {"connectivity": "public", "reason": "x"}, format="json"
    )
    assert r.status_code == 403, r.content
    assert VirtualCluster.objects.get(pk=fabric_cluster.pk).connectivity == "closed"
    later = (fabric_cluster.expires_at + timedelta(hours=1)).replace(microsecond=0)
    r = manage.patch(f"/api/clusters/{fabric_cluster.pk}/", {"expires_at": later.isoformat()}, format="json")
    assert r.status_code == 200, r.content


# --- the browser pages -----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_browser_teardown_and_extend_follow_the_same_permissions(alice):
    cluster = make_cluster(alice, name="mpi")  # no group
    before = cluster.expires_at
    viewer = logged_in(staff("vera", "clusters.view_virtualcluster"))
    for response in life_cycle_attempts(viewer, cluster):
        assert response.status_code == 403
        assert "Only alice, who owns mpi, or an administrator" in response.content.decode()
    nobody = logged_in(staff("nora"))
    assert "mpi" not in nobody.get("/").content.decode().split("<main>")[1]
    for response in life_cycle_attempts(nobody, cluster):
        assert response.status_code == 404
    cluster.refresh_from_db()
    assert (cluster.state, cluster.expires_at) == (ClusterState.READY, before)

    operator = logged_in(staff("otto", "clusters.change_virtualcluster"))
    assert operator.post(f"/clusters/{cluster.pk}/extend/", {"by": "1h"}).status_code == 302
    assert operator.post(f"/clusters/{cluster.pk}/teardown/").status_code == 302
    cluster.refresh_from_db()
    assert (cluster.state, cluster.expires_at) == (ClusterState.TEARING_DOWN, before + timedelta(hours=1))


@pytest.mark.django_db
def test_the_browser_revokes_only_ones_own_credentials(alice, team):
    cluster = make_cluster(alice, name="mpi", group=team)
    make_gateway("gw1", vpn_port=1194)
    theirs = access_services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    for user in (staff("vera", "access.view_credential"), staff("otto", "access.change_credential")):
        client = logged_in(user)
        assert client.get(f"/access/credentials/{theirs.pk}/revoke/").status_code == 404
        assert client.post(f"/access/credentials/{theirs.pk}/revoke/").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


# --- node host certificates and credentials, through the API ----------------------------------------------------


@pytest.mark.django_db
def test_host_certificates_and_node_access_need_the_change_permission(alice):
    cluster = make_cluster(alice, name="mpi")
    viewer = api_as(staff("vera", "clusters.view_virtualcluster"))
    assert host_cert_post(viewer, cluster).status_code == 403  # she sees the cluster: refused, not unknown
    assert host_access_get(viewer, cluster).status_code == 403
    nobody = api_as(staff("nora"))
    assert host_cert_post(nobody, cluster).status_code == 404
    assert host_access_get(nobody, cluster).status_code == 404
    assert not Credential.objects.filter(kind=CredentialKind.SSH_HOST).exists()
    operator = api_as(staff("otto", "clusters.change_virtualcluster"))
    r = host_cert_post(operator, cluster)
    assert r.status_code == 201, r.content
    assert host_access_get(operator, cluster).status_code == 200
    assert Credential.objects.filter(kind=CredentialKind.SSH_HOST).count() == 1


@pytest.mark.django_db
def test_credentials_are_listed_with_view_and_revoked_with_change(alice, team):
    cluster = make_cluster(alice, name="mpi", group=team)
    make_gateway("gw1", vpn_port=1194)
    theirs = access_services.vpn_profile_issue(user=alice, clusters=[cluster]).credential
    url = f"/api/access/credentials/{theirs.pk}/revoke/"

    viewer = staff("vera", "access.view_credential")
    api = api_as(viewer)
    assert [c["id"] for c in api.get("/api/access/credentials/").json()["results"]] == [theirs.pk]
    r = api.post(url, {"note": "help desk"}, format="json")
    assert r.status_code == 403, r.content
    # through a token: as strong as its scopes (clusters:manage) and its user's permissions
    assert api_with_token(viewer, TokenScope.CLUSTERS_WRITE).get("/api/access/credentials/").json()["count"] == 0
    manage = api_with_token(viewer, TokenScope.CLUSTERS_MANAGE)
    assert manage.get("/api/access/credentials/").json()["count"] == 1
    assert manage.post(url, {}, format="json").status_code == 403

    nobody = api_as(staff("nora", "clusters.change_virtualcluster"))  # clusters, not credentials
    assert nobody.get("/api/access/credentials/").json()["count"] == 0
    assert nobody.post(url, {}, format="json").status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None

    operator = api_as(staff("otto", "access.change_credential"))
    r = operator.post(url, {}, format="json")
    assert r.status_code == 200, r.content
    assert (r.json()["status"], r.json()["revoked_by"]) == ("revoked", "otto")


# --- images, public networks, metrics -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_others_images_are_changed_with_the_images_change_permission(alice):
    Image.objects.create(name="alices", owner=alice)
    viewer = api_as(staff("vera", "clusters.view_image"))
    assert "alices" in [i["name"] for i in viewer.get("/api/images/").json()["results"]]
    assert viewer.patch("/api/images/alices/", {"description": "mine now"}, format="json").status_code == 403
    assert viewer.delete("/api/images/alices/").status_code == 403
    assert api_as(staff("nora")).delete("/api/images/alices/").status_code == 404
    assert Image.objects.get(name="alices").description == ""
    operator = api_as(staff("otto", "clusters.change_image"))
    assert operator.patch("/api/images/alices/", {"description": "vetted"}, format="json").status_code == 200
    assert Image.objects.get(name="alices").description == "vetted"


@pytest.mark.django_db
def test_public_networks_and_metrics_need_a_staff_member_who_may_view_clusters(root):
    viewer = staff("vera", "clusters.view_virtualcluster")
    nobody = staff("nora")
    assert api_as(viewer).get("/api/public-networks/").status_code == 200
    assert api_as(nobody).get("/api/public-networks/").status_code == 403
    assert logged_in(viewer).get("/metrics").status_code == 200
    assert logged_in(nobody).get("/metrics").status_code == 403
    assert logged_in(root).get("/metrics").status_code == 200


def test_only_a_superuser_sets_where_the_portal_writes_a_gateways_state(root):
    """``local_state_dir`` is where the portal's own processes write a gateway's state (each revocation, a user's
    "lost my laptop" too): a staff member who may change gateways sees it, read-only; a superuser sets it."""
    gateway = make_gateway("gw-local", vpn_port=1194)
    url = f"/admin/access/gateway/{gateway.pk}/change/"
    operator = staff("gwop", "access.change_gateway", "access.view_gateway")
    page = logged_in(operator).get(url)
    assert page.status_code == 200
    assert 'name="local_state_dir"' not in page.content.decode() and "Local state dir" in page.content.decode()
    assert 'name="local_state_dir"' in logged_in(root).get(url).content.decode()
    assert "local_state_dir" not in page.context["adminform"].form.fields  # a value posted is never read


def test_a_user_admin_who_is_not_a_superuser_grants_no_superuser_permissions_or_groups(root, alice):
    """A staff member with ``change_user`` edits accounts, but never who is a superuser, what permissions or
    groups an account has (themselves included), and never a superuser's account (its password above all)."""
    from django.contrib.auth.models import Group

    group = Group.objects.create(name="astro-helpdesk-test")
    helpdesk = staff("helpdesk", "auth.change_user", "auth.view_user", "auth.delete_user")
    client = logged_in(helpdesk)
    page = client.get(f"/admin/auth/user/{helpdesk.pk}/change/")
    assert page.status_code == 200
    form = page.context["adminform"].form
    assert not {"is_superuser", "user_permissions", "groups"} & set(form.fields)
    data = {
        "username": "helpdesk",
        "email": "helpdesk@example.org",
        "is_active": "on",
        "is_staff": "on",
        "is_superuser": "on",
        "groups": [group.pk],
        "user_permissions": [Permission.objects.get(codename="add_apitoken").pk],
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
    }
    r = client.post(f"/admin/auth/user/{helpdesk.pk}/change/", data)
    assert r.status_code == 302, r.context["adminform"].form.errors if r.context else r
    helpdesk = User.objects.get(pk=helpdesk.pk)
    assert not helpdesk.is_superuser and not helpdesk.groups.exists()
    assert not helpdesk.user_permissions.filter(codename="add_apitoken").exists()

    # a superuser's account: seen, not changed (nor its password), not deleted
    assert client.get(f"/admin/auth/user/{root.pk}/change/").status_code == 200  # (view only)
    assert client.post(f"/admin/auth/user/{root.pk}/password/", {"password1": "x", "password2": "x"}).status_code == 403
    assert client.post(f"/admin/auth/user/{root.pk}/delete/", {"post": "yes"}).status_code == 403
    assert User.objects.filter(pk=root.pk, is_superuser=True).exists()

    # an ordinary account: still changed
    r = client.post(
        f"/admin/auth/user/{alice.pk}/change/",
        {**data, "username": "alice", "email": "alice@example.org", "is_staff": "", "is_superuser": "on"},
    )
    assert r.status_code == 302
    alice = User.objects.get(pk=alice.pk)
    assert alice.email == "alice@example.org" and not alice.is_superuser

    # a superuser still grants them
    r = logged_in(root).post(f"/admin/auth/user/{helpdesk.pk}/change/", data)
    assert r.status_code == 302 and User.objects.get(pk=helpdesk.pk).is_superuser


def test_an_admin_change_saves_only_what_it_changed_never_undoing_a_service_meanwhile(root, alice, monkeypatch):
    """The admin's change page loads the row, then saves it: a full save wrote back the read-only fields as
    loaded — a token revoked meanwhile ("lost my laptop") was live again, an image's withdrawn approval back."""
    from django.contrib.admin.options import ModelAdmin

    from clusters.models import Image
    from portal.models import ApiToken
    from portal.tokens import token_revoke

    token, _ = token_create(user=alice, name="laptop", scopes=[TokenScope.CLUSTERS_READ])
    image = Image.objects.create(name="vetted", source="https://images.example.org/a.qcow2", approved=True)
    real = ModelAdmin.get_object

    def loaded_then_changed_meanwhile(self, request, object_id, from_field=None):
        obj = real(self, request, object_id, from_field)
        if isinstance(obj, ApiToken):
            token_revoke(token=ApiToken.objects.get(pk=obj.pk))  # "lost my laptop", while the admin's POST runs
        if isinstance(obj, Image):
            Image.objects.filter(pk=obj.pk).update(approved=False)  # the approval withdrawn meanwhile
        return obj

    monkeypatch.setattr(ModelAdmin, "get_object", loaded_then_changed_meanwhile)
    client = logged_in(root)
    r = client.post(
        f"/admin/portal/apitoken/{token.pk}/change/",
        {"name": "old laptop", "scopes": [TokenScope.CLUSTERS_READ], "expires_at_0": "", "expires_at_1": ""},
    )
    assert r.status_code == 302, r.context["adminform"].form.errors if r.context else r
    token = ApiToken.objects.get(pk=token.pk)
    assert token.name == "old laptop" and token.revoked_at is not None
    r = client.post(
        f"/admin/clusters/image/{image.pk}/change/",
        {"name": "vetted", "owner": "", "group": "", "description": "checked", "source": image.source},
    )
    assert r.status_code == 302, r.context["adminform"].form.errors if r.context else r
    image = Image.objects.get(pk=image.pk)
    assert image.description == "checked" and image.approved is False


def test_node_tokens_in_the_admin_keep_their_cluster_scope_and_end_and_list_in_constant_queries(
    root, alice, django_assert_max_num_queries
):
    """A node token is what it is (its cluster, its scope, no expiry: it ends with the cluster) for every staff
    member; the token list names each one's cluster without a query per row."""
    from access import services as access_services
    from access.tests.fixtures import make_cluster

    cluster = make_cluster(alice, name="mpi")
    token, _ = access_services.node_token_issue(cluster=cluster)
    clerk = staff("clerk", "portal.change_apitoken", "portal.view_apitoken")
    for who in (clerk, root):
        form = logged_in(who).get(f"/admin/portal/apitoken/{token.pk}/change/").context["adminform"].form
        assert not {"expires_at", "scopes"} & set(form.fields), who
    client = logged_in(root)
    client.get("/admin/portal/apitoken/")  # (warm: the session, the content types)
    with django_assert_max_num_queries(12) as few:
        client.get("/admin/portal/apitoken/")
    for i in range(10):
        access_services.node_token_issue(cluster=make_cluster(alice, name=f"c{i}"))
    with django_assert_max_num_queries(len(few.captured_queries)):
        assert client.get("/admin/portal/apitoken/").status_code == 200


def test_a_user_admin_changes_neither_a_groups_permissions_nor_another_staff_members_account(root, alice):
    """A staff member with ``change_group`` gave a group of their own every permission; one with ``change_user``
    reset another staff member's password and logged in with that account's rights."""
    from django.contrib.auth.models import Group

    group = Group.objects.create(name="helpdesk-group")
    helpdesk = staff("helper", "auth.change_user", "auth.view_user", "auth.change_group", "auth.view_group")
    helpdesk.groups.add(group)
    operator = staff("operator", "clusters.change_virtualcluster")
    client = logged_in(helpdesk)
    form = client.get(f"/admin/auth/group/{group.pk}/change/").context["adminform"].form
    assert "permissions" not in form.fields
    everything = list(Permission.objects.values_list("pk", flat=True))
    client.post(f"/admin/auth/group/{group.pk}/change/", {"name": "helpdesk-group", "permissions": everything})
    assert not Group.objects.get(pk=group.pk).permissions.exists()
    r = client.post(f"/admin/auth/user/{operator.pk}/password/", {"password1": "Xq9-pass", "password2": "Xq9-pass"})
    assert r.status_code == 403 and not User.objects.get(pk=operator.pk).check_password("Xq9-pass")
    assert client.get(f"/admin/auth/user/{helpdesk.pk}/change/").status_code == 200  # (their own: still theirs)
    assert client.get(f"/admin/auth/user/{alice.pk}/change/").status_code == 200
    # a superuser does both
    logged_in(root).post(
        f"/admin/auth/group/{group.pk}/change/", {"name": "helpdesk-group", "permissions": everything[:1]}
    )
    assert Group.objects.get(pk=group.pk).permissions.count() == 1
