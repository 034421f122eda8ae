"""User-provided images (paper §2.1): registered through the API, bootable by their owner and the group they are
shared with only, never approved but by an admin, deleted or retired without breaking history; on the fake
fabric with eager Celery."""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth.models import Group
from django.db import connection, transaction
from django.utils import timezone
from rest_framework.test import APIClient

from clusters import services
from clusters.errors import Conflict
from clusters.models import Image, VirtualCluster
from network.models import VlanAllocation
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.models import AuditEntry, TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def catalogue(db):
    return Image.objects.create(name="debian-12", approved=True)


def client(user) -> APIClient:
    api = APIClient()
    api.force_authenticate(user)
    return api


def token_client(user, *scopes) -> APIClient:
    _, secret = token_create(user=user, name="t", scopes=list(scopes))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return api


def register(user, name="alice-img", **extra):
    return client(user).post("/api/images/", {"name": name, **extra}, format="json")


def cluster_body(image: str, name="c1", mac="52:54:00:00:00:01", **extra) -> dict:
    return {"name": name, "image": image, "nodes": [{"name": "n1", "host": "brno1", "mac": mac}], **extra}


def names(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [i["name"] for i in response.data["results"]]


def test_a_user_registers_an_image_that_is_never_approved(alice):
    r = register(alice, source="https://example.org/alice.qcow2", description="my stack")
    assert r.status_code == 201, r.content
    assert r.data["approved"] is False and r.data["owner"] == "alice" and r.data["group"] is None
    assert r.data["source"] == "https://example.org/alice.qcow2"
    image = Image.objects.get(name="alice-img")
    assert image.owner == alice and not image.approved
    assert AuditEntry.objects.filter(object_id=str(image.pk), message__contains="registered by alice").exists()

    again = register(alice, source="https://example.org/alice.qcow2", description="my stack")  # a retry
    assert again.status_code == 200 and again.data == r.data and Image.objects.filter(owner=alice).count() == 1
    other = register(alice, source="https://example.org/other.qcow2")  # not the same registration
    assert other.status_code == 400 and "already exists" in str(other.data["name"])

    refused = register(alice, name="sneaky", approved=True)  # approval is the admin's
    assert refused.status_code == 400 and refused.data["approved"] == ["unknown field"]
    assert not Image.objects.filter(name="sneaky").exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "debian-12"}, "name"),  # the catalogue's
        ({"name": "Not a slug!"}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "ok", "group": "no-such-group"}, "group"),
        ({"name": "ok", "source": "s" * 501}, "source"),
    ],
)
def test_bad_registrations_are_400s_on_the_field(alice, catalogue, body, field):
    r = client(alice).post("/api/images/", body, format="json")
    assert r.status_code == 400, r.content
    assert field in r.data
    assert Image.objects.count() == 1


def test_sharing_needs_membership(fabric, alice, charlie):
    Group.objects.create(name="chemistry")
    r = register(alice, group="chemistry")
    assert r.status_code == 400 and r.data["group"] == ["chemistry: not a group the owner is a member of"]
    assert not Image.objects.filter(name="alice-img").exists()
    # a name no group has: the same words (which group names exist is not told to whoever asks)
    r = register(alice, group="no-such-group")
    assert r.status_code == 400 and r.data["group"] == ["no-such-group: not a group the owner is a member of"]
    assert register(alice).status_code == 201
    plan = client(alice).post("/api/clusters/plan/", cluster_body("alice-img", group="chemistry"), format="json")
    nothing = client(alice).post("/api/clusters/plan/", cluster_body("alice-img", group="no-such-group"), format="json")
    assert plan.status_code == nothing.status_code == 400
    assert plan.data["group"] == ["chemistry: not a group the owner is a member of"]
    assert nothing.data["group"] == ["no-such-group: not a group the owner is a member of"]


def test_who_sees_which_image(alice, bob, charlie, root, catalogue):
    assert register(alice).status_code == 201
    assert register(charlie, name="charlie-img").status_code == 201
    assert names(client(alice).get("/api/images/")) == ["alice-img", "debian-12"]
    assert names(client(bob).get("/api/images/")) == ["debian-12"]  # not shared yet
    assert client(bob).get("/api/images/alice-img/").status_code == 404

    shared = client(alice).patch("/api/images/alice-img/", {"group": "physics"}, format="json")
    assert shared.status_code == 200 and shared.data["group"] == "physics"
    assert names(client(bob).get("/api/images/")) == ["alice-img", "debian-12"]
    assert client(bob).get("/api/images/alice-img/").data["owner"] == "alice"
    assert names(client(charlie).get("/api/images/")) == ["charlie-img", "debian-12"]

    scheduler = token_client(root, TokenScope.CLUSTERS_MANAGE)  # middleware names images for any owner
    assert names(scheduler.get("/api/images/")) == ["alice-img", "charlie-img", "debian-12"]
    assert names(scheduler.get("/api/images/?owner=-")) == ["debian-12"]
    assert names(scheduler.get("/api/images/?owner=charlie")) == ["charlie-img"]
    assert names(scheduler.get("/api/images/?approved=false")) == ["alice-img", "charlie-img"]
    assert names(scheduler.get("/api/images/?approved=true")) == ["debian-12"]
    bad = scheduler.get("/api/images/?approved=perhaps")
    assert bad.status_code == 400 and "approved" in bad.data


def test_only_the_owner_changes_a_user_image_and_nobody_the_catalogue_through_the_api(alice, bob, charlie, catalogue):
    register(alice, group="physics")
    assert client(bob).patch("/api/images/alice-img/", {"description": "x"}, format="json").status_code == 403
    assert client(bob).delete("/api/images/alice-img/").status_code == 403
    assert client(charlie).patch("/api/images/alice-img/", {"description": "x"}, format="json").status_code == 404
    assert client(alice).delete("/api/images/debian-12/").status_code == 403
    assert client(alice).patch("/api/images/debian-12/", {"description": "x"}, format="json").status_code == 403
    assert Image.objects.filter(name="debian-12").exists()

    r = client(alice).patch("/api/images/alice-img/", {"description": "v2", "group": None}, format="json")
    assert r.status_code == 200 and r.data["description"] == "v2" and r.data["group"] is None
    unknown = client(alice).patch("/api/images/alice-img/", {"approved": True}, format="json")
    assert unknown.status_code == 400 and unknown.data["approved"] == ["unknown field"]
    assert not Image.objects.get(name="alice-img").approved


def test_a_new_source_takes_the_approval_away(alice, root):
    """The provider approved the image it looked at: its owner pointing it elsewhere makes it unapproved again
    (audited), so later clusters booting it are closed; a new description keeps the approval."""
    register(alice)
    Image.objects.filter(name="alice-img").update(approved=True)
    r = client(alice).patch("/api/images/alice-img/", {"description": "v2"}, format="json")
    assert r.status_code == 200 and Image.objects.get(name="alice-img").approved
    same = Image.objects.get(name="alice-img").source
    assert client(alice).patch("/api/images/alice-img/", {"source": same}, format="json").status_code == 200
    assert Image.objects.get(name="alice-img").approved
    r = client(alice).patch("/api/images/alice-img/", {"source": "https://example.org/other.qcow2"}, format="json")
    assert r.status_code == 200 and r.data["approved"] is False
    image = Image.objects.get(name="alice-img")
    assert not image.approved
    entry = AuditEntry.objects.filter(object_id=str(image.pk), action="update").latest("id")
    assert entry.changes["approved"] == [True, False] and entry.actor == "alice"


def test_a_share_ends_when_its_owner_leaves_the_group_and_the_owner_still_edits_the_image(fabric, alice, bob, team):
    """Leaving a group takes one's shares along (as it ends access to the group's clusters): bob no longer sees
    or boots alice's image; alice still changes her image's description (the group is checked only when given)."""
    register(alice, group="physics")
    body = cluster_body("alice-img", name="bobs", mac="52:54:00:00:00:0c")
    assert "alice-img" in names(client(bob).get("/api/images/"))
    alice.groups.remove(team)
    assert "alice-img" not in names(client(bob).get("/api/images/"))
    assert client(bob).post("/api/clusters/", body, format="json").json() == {
        "image": ["No image named alice-img is available."]
    }
    r = client(alice).patch("/api/images/alice-img/", {"description": "still mine"}, format="json")
    assert r.status_code == 200 and r.data["description"] == "still mine"
    refused = client(alice).patch("/api/images/alice-img/", {"group": "physics"}, format="json")
    assert refused.status_code == 400 and refused.data["group"] == ["physics: not a group the owner is a member of"]


def test_no_quota_at_zero_and_none_for_staff(alice, root, settings):
    settings.IMAGE_QUOTA = 0
    for i in range(3):
        assert register(alice, name=f"free{i}").status_code == 201
    settings.IMAGE_QUOTA = 1
    assert register(root, name="root-one").status_code == 201
    assert register(root, name="root-two").status_code == 201  # staff are not limited
    assert register(alice, name="free9").status_code == 409


def test_a_change_of_an_image_deleted_or_retired_meanwhile_is_a_conflict_not_a_500(alice):
    register(alice)
    image = Image.objects.get(name="alice-img")  # as the PATCH read it
    Image.objects.filter(pk=image.pk).update(retired_at="2026-01-01T00:00Z")  # a DELETE retired it meanwhile
    with pytest.raises(Conflict, match="deleted meanwhile"):
        services.image_update(image=image, changes={"description": "x"})
    Image.objects.filter(pk=image.pk).delete()
    with pytest.raises(Conflict, match="deleted meanwhile"):
        services.image_update(image=image, changes={"description": "x"})


def test_a_delete_of_an_image_deleted_or_retired_meanwhile_is_done_not_a_500(alice):
    """Two deletes at once (a retry, a double click): the second, its row gone once it got the lock, says the
    image is deleted (it raised DoesNotExist: a 500); one retired meanwhile stays retired as it was."""
    register(alice)
    image = Image.objects.get(name="alice-img")  # as the second DELETE read it
    Image.objects.filter(pk=image.pk).update(retired_at="2026-01-01T00:00Z")  # the first one retired it
    assert services.image_delete(image=image) == "retired"
    assert str(Image.objects.get(pk=image.pk).retired_at.date()) == "2026-01-01"  # kept as the first one set it
    Image.objects.filter(pk=image.pk).delete()
    assert services.image_delete(image=image) == "deleted"


def test_read_only_tokens_cannot_register(alice):
    reader = token_client(alice, TokenScope.CLUSTERS_READ)
    assert reader.get("/api/images/").status_code == 200
    assert reader.post("/api/images/", {"name": "x"}, format="json").status_code == 403
    assert (
        token_client(alice, TokenScope.CLUSTERS_WRITE).post("/api/images/", {"name": "x"}, format="json").status_code
        == 201
    )


def test_only_middleware_registers_for_others(alice, bob, root):
    r = client(bob).post("/api/images/", {"name": "for-alice", "owner": "alice"}, format="json")
    assert r.status_code == 403
    scheduler = token_client(root, TokenScope.CLUSTERS_MANAGE)
    r = scheduler.post("/api/images/", {"name": "for-alice", "owner": "alice"}, format="json")
    assert r.status_code == 201 and r.data["owner"] == "alice"


def test_the_quota_counts_live_images(alice, settings):
    settings.IMAGE_QUOTA = 2
    assert register(alice, name="one").status_code == 201
    assert register(alice, name="two").status_code == 201
    r = register(alice, name="three")
    assert r.status_code == 409 and r.data["code"] == "quota_exceeded"
    assert client(alice).delete("/api/images/one/").status_code == 204
    assert register(alice, name="three").status_code == 201
    Image.objects.filter(name="two").update(retired_at=timezone.now())  # retired (ended clusters name it)
    assert register(alice, name="four").status_code == 201  # a retired image takes no slot


def test_a_user_image_makes_the_cluster_closed_and_only_owner_and_group_boot_it(fabric, alice, bob, charlie, root):
    register(alice)
    r = client(alice).post("/api/clusters/", cluster_body("alice-img"), format="json")
    assert r.status_code == 201, r.content
    assert r.data["connectivity"] == "closed" and "user-provided" in r.data["connectivity_reason"]

    # someone else's image answers exactly like one that does not exist, and nothing is left allocated
    vlans = VlanAllocation.objects.filter(state="allocated").count()
    theirs = client(charlie).post("/api/clusters/", cluster_body("alice-img", mac="52:54:00:00:00:09"), format="json")
    missing = client(charlie).post("/api/clusters/", cluster_body("no-such", mac="52:54:00:00:00:09"), format="json")
    assert theirs.status_code == missing.status_code == 400
    assert theirs.json() == {"image": ["No image named alice-img is available."]}
    assert missing.json() == {"image": ["No image named no-such is available."]}
    # with another field refused too, both answers name both fields, at the same stage
    for name in ("alice-img", "no-such"):
        body = cluster_body(name, mac="52:54:00:00:00:09", lifetime=1)
        both = client(charlie).post("/api/clusters/", body, format="json")
        assert both.status_code == 400 and set(both.json()) == {"image", "lifetime"}, both.json()
    assert VlanAllocation.objects.filter(state="allocated").count() == vlans
    assert not VirtualCluster.objects.filter(owner=charlie).exists()

    scheduler = token_client(root, TokenScope.CLUSTERS_MANAGE)  # for charlie: charlie's rights count, not its own
    body = cluster_body("alice-img", name="c2", mac="52:54:00:00:00:0a", owner="charlie")
    assert scheduler.post("/api/clusters/", body, format="json").status_code == 400
    assert bob_boots_after_sharing(alice, bob).status_code == 201


def bob_boots_after_sharing(alice, bob):
    body = cluster_body("alice-img", name="bobs", mac="52:54:00:00:00:0b")
    assert client(bob).post("/api/clusters/", body, format="json").status_code == 400
    client(alice).patch("/api/images/alice-img/", {"group": "physics"}, format="json")
    return client(bob).post("/api/clusters/", body, format="json")


def test_delete_refuses_live_clusters_then_retires_an_image_with_history(fabric, alice):
    register(alice)
    created = client(alice).post("/api/clusters/", cluster_body("alice-img"), format="json")
    r = client(alice).delete("/api/images/alice-img/")
    assert r.status_code == 409 and r.data["detail"] == "1 live cluster(s) boot image alice-img: they must end first"

    assert client(alice).post(f"/api/clusters/{created.data['id']}/teardown/", {}, format="json").status_code == 202
    assert client(alice).delete("/api/images/alice-img/").status_code == 204
    image = Image.objects.get(name="alice-img")  # kept: the ended cluster still names it
    assert image.retired_at is not None
    assert client(alice).get(f"/api/clusters/{created.data['id']}/").data["image"] == "alice-img"
    assert names(client(alice).get("/api/images/")) == []
    assert client(alice).get("/api/images/alice-img/").status_code == 404
    again = client(alice).post("/api/clusters/", cluster_body("alice-img", name="c3"), format="json")
    assert again.status_code == 400 and again.data["image"] == ["No image named alice-img is available."]
    assert register(alice).status_code == 400  # the name stays taken

    register(alice, name="unused")
    assert client(alice).delete("/api/images/unused/").status_code == 204
    assert not Image.objects.filter(name="unused").exists()  # nothing named it: gone


def sent_back(page) -> str:
    """What a browser sends back of the approval page's hidden source field (one image): its value, newlines as
    CRLF (HTML form submission normalizes line breaks)."""
    import html
    import re

    value = html.unescape(re.search(r'name="source-\d+" value="([^"]*)"', page.content.decode(), re.S)[1])
    return value.replace("\r\n", "\n").replace("\n", "\r\n")


def test_admin_approves_and_withdraws_with_an_audit_entry(alice, root):
    register(alice)
    image = Image.objects.get(name="alice-img")
    admin = APIClient()
    admin.force_login(root)
    url = "/admin/clusters/image/"
    page = admin.post(url, {"action": "approve", "_selected_action": [image.pk]})  # what is approved, first
    assert page.status_code == 200 and image.source in page.content.decode() and not Image.objects.get().approved
    confirm = {"action": "approve", "_selected_action": [image.pk], "post": "yes"}
    confirm[f"source-{image.pk}"] = sent_back(page)
    r = admin.post(url, confirm, follow=True)
    assert r.status_code == 200 and "1 image(s) approved" in r.content.decode()
    image.refresh_from_db()
    assert image.approved
    entry = AuditEntry.objects.filter(object_id=str(image.pk), action="update").latest("id")
    assert entry.changes["approved"] == [False, True] and entry.actor == "root"
    admin.post(url, {"action": "withdraw_approval", "_selected_action": [image.pk]})
    image.refresh_from_db()
    assert not image.approved
    withdrawn = AuditEntry.objects.filter(object_id=str(image.pk), action="update").latest("id")
    assert withdrawn.changes["approved"] == [True, False]


def test_admin_approves_only_the_version_it_was_shown(alice, root):
    """The owner changes the image's source between the page that shows it and the admin's confirmation (the
    change took any approval away): the new version, which nobody reviewed, is not approved."""
    register(alice)
    image = Image.objects.get(name="alice-img")
    admin = APIClient()
    admin.force_login(root)
    url = "/admin/clusters/image/"
    page = admin.post(url, {"action": "approve", "_selected_action": [image.pk]})
    shown = sent_back(page)
    Image.objects.filter(pk=image.pk).update(source="https://example.org/swapped.qcow2")  # meanwhile
    confirm = {"action": "approve", "_selected_action": [image.pk], "post": "yes", f"source-{image.pk}": shown}
    r = admin.post(url, confirm, follow=True)
    text = r.content.decode()
    assert "0 image(s) approved" in text and "Not approved: alice-img: the source changed" in text
    assert not Image.objects.get(pk=image.pk).approved
    forged = {"action": "approve", "_selected_action": [image.pk], "post": "yes"}  # no version shown: none approved
    assert "Not approved: alice-img" in admin.post(url, forged, follow=True).content.decode()
    assert not Image.objects.get(pk=image.pk).approved


def test_admin_approves_a_source_with_a_newline(alice, root):
    """A form sends a text's newlines back as CRLF: the page sends the source's digest, not the source."""
    register(alice)
    Image.objects.filter(name="alice-img").update(source="https://example.org/a.qcow2\nsha256=abc")
    image = Image.objects.get(name="alice-img")
    admin = APIClient()
    admin.force_login(root)
    page = admin.post("/admin/clusters/image/", {"action": "approve", "_selected_action": [image.pk]})
    confirm = {"action": "approve", "_selected_action": [image.pk], "post": "yes"}
    confirm[f"source-{image.pk}"] = sent_back(page)
    assert "1 image(s) approved" in admin.post("/admin/clusters/image/", confirm, follow=True).content.decode()
    assert Image.objects.get(pk=image.pk).approved


def test_the_list_costs_the_same_queries_for_many_images(alice, bob, django_assert_num_queries):
    for i in range(3):
        register(alice, name=f"a{i}", group="physics")
    api = client(bob)
    with django_assert_num_queries(2):  # count, page (owner and group joined)
        assert len(names(api.get("/api/images/"))) == 3
    for i in range(3, 12):
        register(alice, name=f"a{i}", group="physics")
    with django_assert_num_queries(2):
        assert len(names(api.get("/api/images/"))) == 12


def test_the_admin_list_costs_the_same_queries_for_many_users_images(alice, bob, root):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    admin = APIClient()
    admin.force_login(root)

    def queries() -> int:
        with CaptureQueriesContext(connection) as done:
            assert admin.get("/admin/clusters/image/").status_code == 200
        return len(done)

    register(alice, name="a0", group="physics")
    few = queries()
    for i in range(1, 6):
        register(alice, name=f"a{i}", group="physics")
        register(bob, name=f"b{i}")
    assert queries() == few  # owner and group joined


@pytest.mark.skipif("connection.vendor != 'postgresql'")
def test_a_delete_waits_for_a_create_that_uses_the_image(fabric, alice):
    """A create share-locks the image's row: a delete that comes meanwhile waits, then finds the live
    cluster (409) instead of deleting an image a cluster is about to boot."""
    register(alice)
    image = Image.objects.get(name="alice-img")
    checked, go_on, outcome = threading.Event(), threading.Event(), {}

    def create():
        try:
            with transaction.atomic():
                services._check_image(image, owner=alice)
                checked.set()
                go_on.wait(10)
                VirtualCluster.objects.create(
                    name="racing", owner=alice, image=image, connectivity="closed", expires_at=timezone.now()
                )
        finally:
            connection.close()

    def delete():
        try:
            outcome["result"] = services.image_delete(image=image)
        except Conflict as exc:
            outcome["conflict"] = str(exc)
        finally:
            connection.close()

    creator = threading.Thread(target=create)
    creator.start()
    assert checked.wait(10)
    deleter = threading.Thread(target=delete)
    deleter.start()
    deleter.join(0.5)
    assert deleter.is_alive()  # blocked on the create's share lock
    go_on.set()
    creator.join(10)
    deleter.join(10)
    assert "1 live cluster(s) boot image alice-img" in outcome.get("conflict", ""), outcome
    assert Image.objects.filter(name="alice-img", retired_at__isnull=True).exists()
