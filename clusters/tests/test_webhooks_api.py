"""Webhooks registered through the API (``/api/webhooks/``): by the middleware with a token that has
``clusters:manage`` (every cluster's events), by a user with a ``clusters:write`` token (the clusters they see), the
secret shown once, the feed pushed to it signed with that secret (a real HTTP endpoint on
loopback), changed and deleted by the account that made it only; anyone else is refused, bad input is a 400 that
makes nothing."""
# ruff: noqa: F401, F811 (pytest fixtures imported from clusters.tests)

from __future__ import annotations

import hashlib
import hmac

import pytest
from rest_framework.test import APIClient

from clusters.models import Webhook
from clusters.tasks import deliver_webhooks
from clusters.tests.helpers import create_cluster
from clusters.tests.test_webhooks import receiver
from network.tests.fakefabric import fabric_fixture
from portal.models import AuditEntry, TokenScope
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def client_with(user, *scopes) -> APIClient:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token_create(user=user, name='t', scopes=list(scopes))[1]}")
    return api


@pytest.fixture
def middleware(django_user_model):
    return client_with(django_user_model.objects.create_user("pbs"), TokenScope.CLUSTERS_MANAGE)


def test_the_middleware_registers_a_webhook_and_gets_the_feed_signed_with_its_secret(
    fabric, alice, receiver, middleware
):
    r = middleware.post(
        "/api/webhooks/", {"name": "pbs-events", "url": receiver.url, "states": ["ready"]}, format="json"
    )
    assert r.status_code == 201, r.content
    assert r["Cache-Control"] == "no-store"
    secret = r.data["secret"]
    assert len(secret) >= 40 and r.data["states"] == ["ready"] and r.data["kinds"] == []
    hook = Webhook.objects.get(name="pbs-events")
    assert hook.owner.username == "pbs" and hook.secret == secret
    entry = AuditEntry.objects.get(content_type__model="webhook", object_id=str(hook.pk), action="create")
    assert secret not in str(entry.changes)
    listed = middleware.get("/api/webhooks/").data["results"]
    assert [w["name"] for w in listed] == ["pbs-events"] and "secret" not in listed[0]

    cluster = create_cluster(alice, "c1")
    deliver_webhooks()
    ((headers, body),) = receiver.requests
    assert headers["X-Virtcloud-Signature"] == "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert [(e["cluster"], e["state"]) for e in receiver.events(0)] == [(cluster, "ready")]

    r = middleware.patch(f"/api/webhooks/{hook.pk}/", {"enabled": False, "states": []}, format="json")
    assert r.status_code == 200 and (r.data["enabled"], r.data["states"]) == (False, [])
    assert middleware.delete(f"/api/webhooks/{hook.pk}/").status_code == 204
    assert not Webhook.objects.filter(pk=hook.pk).exists()


@pytest.mark.parametrize(
    "body, field",
    [
        ({"name": "x", "url": "ftp://example.org/hook"}, "url"),
        ({"name": "x", "url": "http://169.254.169.254/hook"}, "url"),  # link-local (a cloud's metadata service)
        ({"name": "x", "url": "http://example.org:99999/hook"}, "url"),
        ({"name": "x", "url": "https://example.org/hook", "states": ["nope"]}, "states"),
        ({"name": "not a slug", "url": "https://example.org/hook"}, "name"),
        ({"name": "x", "url": "https://example.org/hook", "secret": "mine"}, "secret"),  # unknown field
        ({"name": "x", "url": "http://10.1.2.3/hook"}, "url"),  # the provider's private network: not the API's
        ({"name": "x", "url": None}, "url"),
        ({"name": "x", "url": "https://example.org/hook", "states": None}, "states"),
        ({"name": "x", "url": "https://example.org/hook", "kinds": ["nope"]}, "kinds"),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_makes_nothing(middleware, body, field):
    r = middleware.post("/api/webhooks/", body, format="json")
    assert r.status_code == 400 and field in r.data, r.data
    assert not Webhook.objects.exists()


def test_only_a_token_that_may_write_or_an_admin_and_only_its_own(alice, root, middleware, django_user_model):
    r = middleware.post("/api/webhooks/", {"name": "a", "url": "https://example.org/a"}, format="json")
    theirs = Webhook.objects.get(pk=r.data["id"])
    # an ordinary user's session: refused; a token that only reads (clusters:read): refused too
    session = APIClient()
    session.force_login(alice)
    assert session.get("/api/webhooks/").status_code == 403
    reader = client_with(alice, TokenScope.CLUSTERS_READ)
    assert (
        reader.post("/api/webhooks/", {"name": "b", "url": "https://example.org/b"}, format="json").status_code == 403
    )
    assert theirs.all_clusters  # (the middleware's: every cluster's events)
    # another middleware account: someone else's webhook is a 404
    other = client_with(django_user_model.objects.create_user("slurm"), TokenScope.CLUSTERS_MANAGE)
    assert other.get(f"/api/webhooks/{theirs.pk}/").status_code == 404
    assert other.delete(f"/api/webhooks/{theirs.pk}/").status_code == 404
    assert other.get("/api/webhooks/").data["results"] == []
    # an admin's session registers its own
    admin = APIClient()
    admin.force_login(root)
    assert admin.post("/api/webhooks/", {"name": "c", "url": "https://example.org/c"}, format="json").status_code == 201
    # a name is the account's own: another account has its "a" too (nobody learns or takes another's names);
    # the same account twice is refused, as a quota reached is: nothing made
    assert other.post("/api/webhooks/", {"name": "a", "url": "https://example.org/x"}, format="json").status_code == 201
    again = middleware.post("/api/webhooks/", {"name": "a", "url": "https://example.org/x"}, format="json")
    assert again.status_code == 400 and "exists already" in str(again.data)
    for i in range(9):
        assert (
            middleware.post(
                "/api/webhooks/", {"name": f"m{i}", "url": "https://example.org/m"}, format="json"
            ).status_code
            == 201
        )
    r = middleware.post("/api/webhooks/", {"name": "m10", "url": "https://example.org/m"}, format="json")
    assert r.status_code == 409 and r.data["code"] == "quota_exceeded"
    assert Webhook.objects.count() == 12


def test_a_narrower_token_of_the_account_neither_sees_nor_redirects_a_webhook_of_every_clusters_feed(root):
    """An admin's session webhook (and a ``clusters:manage`` token's) gets every cluster's events. A
    ``clusters:write`` token of the same account, which may have the feed of the account's own clusters only,
    does not see it, cannot point it at another URL, turn it off or delete it (404, as another account's);
    it sees and changes its own kind. A ``clusters:manage`` token of the account sees both."""
    admin = APIClient()
    admin.force_login(root)
    r = admin.post("/api/webhooks/", {"name": "all", "url": "https://example.org/all"}, format="json")
    everything = Webhook.objects.get(pk=r.data["id"])
    assert everything.all_clusters
    writer = client_with(root, TokenScope.CLUSTERS_WRITE)
    r = writer.post("/api/webhooks/", {"name": "mine", "url": "https://example.org/mine"}, format="json")
    own = Webhook.objects.get(pk=r.data["id"])
    assert not own.all_clusters

    assert [h["name"] for h in writer.get("/api/webhooks/").data["results"]] == ["mine"]
    url = f"/api/webhooks/{everything.pk}/"
    assert writer.get(url).status_code == 404
    assert writer.patch(url, {"url": "https://attacker.example/x"}, format="json").status_code == 404
    assert writer.patch(url, {"enabled": False}, format="json").status_code == 404
    assert writer.delete(url).status_code == 404
    everything.refresh_from_db()
    assert everything.url == "https://example.org/all" and everything.enabled
    assert writer.patch(f"/api/webhooks/{own.pk}/", {"enabled": False}, format="json").status_code == 200

    manager = client_with(root, TokenScope.CLUSTERS_MANAGE)
    assert [h["name"] for h in manager.get("/api/webhooks/").data["results"]] == ["all", "mine"]
    assert manager.patch(url, {"url": "https://example.org/moved"}, format="json").status_code == 200


def test_a_change_is_checked_as_a_new_one_is(middleware):
    r = middleware.post("/api/webhooks/", {"name": "a", "url": "https://example.org/a"}, format="json")
    url = f"/api/webhooks/{r.data['id']}/"
    for body, field in (({"url": "http://169.254.169.254/"}, "url"), ({"states": ["nope"]}, "states")):
        answer = middleware.patch(url, body, format="json")
        assert answer.status_code == 400 and field in answer.data, answer.data
    assert Webhook.objects.get(name="a").url == "https://example.org/a"


def test_a_webhook_stops_with_the_token_or_the_account_it_was_registered_with(alice, django_user_model):
    from portal.tokens import token_revoke

    pbs = django_user_model.objects.create_user("pbs")
    token, secret = token_create(user=pbs, name="pbs", scopes=[TokenScope.CLUSTERS_MANAGE])
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    r = api.post("/api/webhooks/", {"name": "a", "url": "https://example.org/a"}, format="json")
    hook = Webhook.objects.get(pk=r.data["id"])
    assert hook.token == token and Webhook.deliverable().filter(pk=hook.pk).exists()
    token_revoke(token=token)
    assert not Webhook.deliverable().filter(pk=hook.pk).exists()  # a leaked token revoked: no feed left behind
    token.revoked_at = None
    token.save()
    pbs.is_active = False
    pbs.save()
    assert not Webhook.deliverable().filter(pk=hook.pk).exists()
    pbs.delete()
    assert not Webhook.objects.filter(pk=hook.pk).exists()  # gone with its account, never left ownerless


def test_a_scope_taken_from_the_token_stops_the_feed_it_gave(fabric, alice, bob, receiver, django_user_model):
    """The feed follows the token's scopes now, not those it had when the webhook was registered: every
    cluster's needs clusters:manage, the owner's own clusters:write."""
    pbs = django_user_model.objects.create_user("pbs")
    manage, manage_secret = token_create(user=pbs, name="pbs", scopes=[TokenScope.CLUSTERS_MANAGE])
    write, write_secret = token_create(user=alice, name="alice", scopes=[TokenScope.CLUSTERS_WRITE])
    for secret, name in ((manage_secret, "everything"), (write_secret, "mine")):
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
        assert api.post("/api/webhooks/", {"name": name, "url": receiver.url}, format="json").status_code == 201
    create_cluster(alice, "c1")
    deliver_webhooks()
    assert len(receiver.requests) == 2
    for token, left in ((manage, [TokenScope.CLUSTERS_READ, TokenScope.METRICS]), (write, [TokenScope.CLUSTERS_READ])):
        token.scopes = left
        token.save()
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    deliver_webhooks()
    assert len(receiver.requests) == 2  # neither is fed any more, and each says why
    assert {h.last_error for h in Webhook.objects.all()} == {
        "not sent: the token it was registered with no longer has the scope for this feed"
    }
    manage.scopes = [TokenScope.CLUSTERS_MANAGE]
    manage.save()
    deliver_webhooks()
    assert len(receiver.requests) == 3
    write.scopes = [TokenScope.CLUSTERS_WRITE]  # back, with nothing new for it: its message goes all the same
    write.save()
    deliver_webhooks()
    assert Webhook.objects.get(name="mine").last_error == ""


def test_a_staff_member_who_may_only_view_clusters_cannot_register_one(django_user_model):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_virtualcluster"))
    session = APIClient()
    session.force_login(viewer)
    assert (
        session.post("/api/webhooks/", {"name": "v", "url": "https://example.org/v"}, format="json").status_code == 403
    )
    assert not Webhook.objects.exists()


def test_an_admins_session_webhook_is_fed_only_while_the_admin_may_view_every_cluster(django_user_model):
    """The feed names every cluster: a webhook an admin registered in the browser stops when the admin may no longer
    view them (the permission taken, given or through a group), not only when the admin stops being staff."""
    from django.contrib.auth.models import Group, Permission

    ops = django_user_model.objects.create_user("ops", is_staff=True)
    change_webhook = Permission.objects.get(codename="change_webhook")
    view_clusters = Permission.objects.get(codename="view_virtualcluster")
    ops.user_permissions.add(change_webhook, view_clusters)
    session = APIClient()
    session.force_login(ops)
    r = session.post("/api/webhooks/", {"name": "ops", "url": "https://example.org/ops"}, format="json")
    assert r.status_code == 201, r.data
    fed = Webhook.deliverable().filter(pk=r.data["id"])
    assert fed.exists()
    ops.user_permissions.remove(view_clusters)
    assert not fed.exists()
    team = Group.objects.create(name="noc")
    team.permissions.add(view_clusters)
    ops.groups.add(team)
    assert fed.exists() and fed.count() == 1  # (once, though reached twice)
    ops.is_staff = False
    ops.save()
    assert not fed.exists()


def test_a_users_webhook_gets_the_events_of_the_clusters_the_user_sees(
    fabric, alice, bob, charlie, team, receiver, django_user_model
):
    """A user's own token (clusters:write) registers a webhook fed with the events of the clusters the user sees —
    their own and their groups', as the groups are at each delivery — never anyone else's."""
    writer = client_with(alice, TokenScope.CLUSTERS_WRITE)
    r = writer.post("/api/webhooks/", {"name": "alice-events", "url": receiver.url, "states": ["ready"]}, format="json")
    assert r.status_code == 201, r.content
    assert r.data["all_clusters"] is False
    own = create_cluster(alice, "mine", "52:54:00:00:00:01")
    shared = create_cluster(bob, "shared", "52:54:00:00:00:02", group=team.name)  # alice is in team
    create_cluster(charlie, "theirs", "52:54:00:00:00:03")
    deliver_webhooks()
    assert sorted(e["cluster"] for e in receiver.events(0)) == sorted([own, shared])
    # alice leaves the team: its clusters' events are no longer hers
    alice.groups.remove(team)
    later = create_cluster(bob, "shared2", "52:54:00:00:00:04", group=team.name)
    again = create_cluster(alice, "mine2", "52:54:00:00:00:05")
    deliver_webhooks()
    assert [e["cluster"] for e in receiver.events(1)] == [again] and later not in [
        e["cluster"] for e in receiver.events(1)
    ]


def test_a_users_event_committed_while_its_webhook_looks_is_not_skipped(fabric, alice, charlie, receiver):
    """A user's webhook that finds none of its owner's events moves past the others': an event of the owner's
    committed just after that query (here: inserted right after it) is sent at the next round, not skipped."""
    from django.db import connection
    from django.utils import timezone

    from clusters.models import ClusterEvent, VirtualCluster

    writer = client_with(alice, TokenScope.CLUSTERS_WRITE)
    r = writer.post("/api/webhooks/", {"name": "alice-events", "url": receiver.url}, format="json")
    hook = Webhook.objects.get(pk=r.data["id"])
    create_cluster(charlie, "theirs", "52:54:00:00:01:01")
    mine = create_cluster(alice, "mine", "52:54:00:00:00:01")
    deliver_webhooks()
    assert {e["cluster"] for e in receiver.events(0)} == {mine}
    create_cluster(charlie, "theirs2", "52:54:00:00:01:02")
    late = []

    def commits_meanwhile(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not late and "clusterevent" in sql and "owner_id" in sql:  # the query for alice's events
            cluster = VirtualCluster.objects.get(pk=mine)
            late.append(ClusterEvent.objects.create(cluster=cluster, state=cluster.state, at=timezone.now()).id)
        return result

    with connection.execute_wrapper(commits_meanwhile):
        deliver_webhooks()
    assert late and len(receiver.requests) == 1
    hook.refresh_from_db()
    assert hook.last_event_id < late[0]
    deliver_webhooks()
    assert [e["id"] for e in receiver.events(1)] == late


def test_a_users_webhook_behind_others_events_catches_up_at_once(fabric, alice, charlie, receiver):
    """Others' events are left out in the query: after failures (a batch of one event) a user's webhook does not
    crawl through everyone else's events one delivery at a time; with none of its own, it moves past them."""
    writer = client_with(alice, TokenScope.CLUSTERS_WRITE)
    r = writer.post("/api/webhooks/", {"name": "alice-events", "url": receiver.url}, format="json")
    hook = Webhook.objects.get(pk=r.data["id"])
    for i in range(5):
        create_cluster(charlie, f"theirs{i}", f"52:54:00:00:01:0{i}")
    deliver_webhooks()
    hook.refresh_from_db()
    assert receiver.requests == []  # nothing sent
    from clusters.models import ClusterEvent

    assert hook.last_event_id == ClusterEvent.objects.order_by("-id").first().id  # moved past them
    for i in range(5, 9):
        create_cluster(charlie, f"theirs{i}", f"52:54:00:00:01:0{i}")
    mine = create_cluster(alice, "mine", "52:54:00:00:00:01")
    Webhook.objects.filter(pk=hook.pk).update(failures=7)  # (a batch is one event now)
    deliver_webhooks()
    assert {e["cluster"] for e in receiver.events(0)} == {mine}
