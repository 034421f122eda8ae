"""Webhooks get the cluster event feed pushed to a real HTTP endpoint (a server on 127.0.0.1 that this test
runs): signed, in commit order, at least once across failures, filtered by state, from their creation on."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from clusters import webhooks
from clusters.models import ClusterEvent, VirtualCluster, Webhook
from clusters.tasks import deliver_webhooks
from clusters.tests.helpers import create_cluster
from network.tests.fakefabric import fabric_fixture  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)
SECRET = "hook-secret-0123456789"


class Receiver:
    """An HTTP endpoint on 127.0.0.1: records every POST; answers with the statuses queued in ``answers``."""

    def __init__(self):
        self.requests: list[tuple[dict, bytes]] = []
        self.answers: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                code = outer.answers.pop(0) if outer.answers else 204
                self.send_response(code)
                if 300 <= code < 400:
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/moved")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):  # noqa: N802 - a redirect followed as a GET would land here
                outer.requests.append((dict(self.headers), b""))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def events(self, i: int) -> list[dict]:
        return json.loads(self.requests[i][1])["events"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_events_are_pushed_signed_in_order_once(fabric, alice, receiver):
    before = create_cluster(alice, "old", "52:54:00:00:00:09")  # before the webhook: not sent
    hook = Webhook.objects.create(name="accounting", url=receiver.url, secret=SECRET)
    assert hook.last_event_id == ClusterEvent.objects.order_by("-id").first().id
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    deliver_webhooks()
    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Virtcloud-Signature"] == expected
    assert headers["X-Virtcloud-Webhook"] == "accounting"
    stamp = headers["X-Virtcloud-Timestamp"]  # the signature a receiver checks to refuse a replayed delivery
    assert abs(int(stamp) - timezone.now().timestamp()) < 60
    stamped = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Virtcloud-Signature-Timestamped"] == "sha256=" + stamped
    sent = receiver.events(0)
    assert [(e["cluster"], e["state"]) for e in sent] == [(cid, "requested"), (cid, "provisioning"), (cid, "ready")]
    assert all(e["cluster"] != before for e in sent)
    assert [e["id"] for e in sent] == sorted(e["id"] for e in sent)
    hook.refresh_from_db()
    assert (hook.last_event_id, hook.last_status, hook.failures) == (sent[-1]["id"], 204, 0)
    deliver_webhooks()
    assert len(receiver.requests) == 1  # nothing new, nothing sent


def test_metrics_show_a_webhook_falling_behind(fabric, alice, root, receiver):
    from prometheus_client.parser import text_string_to_metric_families

    def figures() -> dict:
        api = APIClient()
        api.force_login(root)
        text = api.get("/metrics").content.decode()
        return {
            (s.name, s.labels.get("webhook"), s.labels.get("owner")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("virtcloud_webhook")
        }

    Webhook.objects.create(name="acct", url=receiver.url, secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    receiver.answers = [503]
    deliver_webhooks()
    assert figures() == {
        ("virtcloud_webhook_events_behind", "acct", ""): 3,
        ("virtcloud_webhook_failures", "acct", ""): 1,
    }
    Webhook.objects.filter(name="acct").update(next_attempt_at=timezone.now())
    deliver_webhooks()
    assert figures() == {
        ("virtcloud_webhook_events_behind", "acct", ""): 0,
        ("virtcloud_webhook_failures", "acct", ""): 0,
    }
    # a webhook that gets nothing any more (its token revoked, its owner gone) is not "behind" for ever; the
    # backlogs of many webhooks cost one query
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from portal.models import TokenScope
    from portal.tokens import token_create, token_revoke

    token, _ = token_create(user=alice, name="t", scopes=[TokenScope.CLUSTERS_WRITE])
    Webhook.objects.create(name="gone", url=receiver.url, secret=SECRET, owner=alice, token=token)
    token_revoke(token=token)
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    shown = figures()
    assert ("virtcloud_webhook_events_behind", "gone", "alice") not in shown
    assert shown[("virtcloud_webhook_stopped", "gone", "alice")] == 1
    with CaptureQueriesContext(connection) as few:
        figures()
    for i in range(5):
        Webhook.objects.create(name=f"more{i}", url=receiver.url, secret=SECRET)
    with CaptureQueriesContext(connection) as many:
        assert figures()[("virtcloud_webhook_events_behind", "more4", "")] == 0
    assert len(many) == len(few)


def test_a_failing_endpoint_gets_the_same_events_again_after_a_backoff(fabric, alice, receiver):
    hook = Webhook.objects.create(name="flaky", url=receiver.url, secret=SECRET)
    cid = create_cluster(alice, "c1", "52:54:00:00:00:01")
    receiver.answers = [500]
    deliver_webhooks()
    hook.refresh_from_db()
    assert (hook.failures, hook.last_status) == (1, 500) and "500" in hook.last_error
    assert hook.next_attempt_at > timezone.now()
    deliver_webhooks()
    assert len(receiver.requests) == 1  # backing off
    Webhook.objects.filter(pk=hook.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    VirtualCluster.objects.filter(pk=cid).update(state="updating")  # a new event meanwhile
    deliver_webhooks()
    assert len(receiver.requests) == 2
    assert receiver.events(1)[:3] == receiver.events(0)  # the same batch again, then what came since
    assert [e["state"] for e in receiver.events(1)] == ["requested", "provisioning", "ready", "updating"]
    hook.refresh_from_db()
    assert hook.failures == 0 and hook.last_event_id == receiver.events(1)[-1]["id"]


def test_a_url_changed_while_a_batch_is_on_its_way_gets_that_batch(fabric, alice, receiver, monkeypatch):
    """The owner points the webhook elsewhere while a batch is being posted to the old URL: the old endpoint's
    2xx moved the cursor past a batch the new one never got (and its failure gave the new URL the old one's
    backoff). The answer counts only for the URL it came from: the new endpoint gets the batch."""
    from clusters import services

    old = Webhook.objects.create(name="moving", url="http://127.0.0.1:9/old", secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    real_post = webhooks._post

    def answered_by_the_old_one(url, body, headers, **kwargs):
        if url.endswith("/old"):  # meanwhile: the owner's PATCH
            services.webhook_update(hook=Webhook.objects.get(pk=old.pk), changes={"url": receiver.url})
            return 204, ""
        return real_post(url, body, headers, **kwargs)

    monkeypatch.setattr(webhooks, "_post", answered_by_the_old_one)
    assert webhooks.deliver(old.pk).status == 204
    hook = Webhook.objects.get(pk=old.pk)
    assert (hook.url, hook.last_event_id, hook.failures) == (receiver.url, 0, 0)
    assert webhooks.deliver(old.pk).status == 204
    assert [e["state"] for e in receiver.events(0)] == ["requested", "provisioning", "ready"]


def test_an_unreachable_endpoint_is_recorded_and_retried(fabric, alice):
    hook = Webhook.objects.create(name="gone", url="http://127.0.0.1:9/nowhere", secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    [delivery] = webhooks.deliver_due()
    assert delivery.status is None and delivery.error
    hook.refresh_from_db()
    assert hook.failures == 1 and hook.last_event_id < ClusterEvent.objects.order_by("-id").first().id


def test_states_filter_what_is_sent_and_the_cursor_moves_past_the_rest(fabric, alice, receiver):
    hook = Webhook.objects.create(name="ready-only", url=receiver.url, secret=SECRET, states=["ready"])
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    deliver_webhooks()
    assert [e["state"] for e in receiver.events(0)] == ["ready"]
    hook.refresh_from_db()
    assert hook.last_event_id == ClusterEvent.objects.order_by("-id").first().id


def test_kinds_leave_out_the_lifetime_and_expiring_events_that_carry_a_state(fabric, alice, receiver):
    """A middleware subscribed to ["ready"] got every extension ("lifetime") of a ready cluster as an event of
    state ready, and took the cluster for newly ready. ``kinds: ["state"]`` leaves them out (in the query too)."""
    from datetime import timedelta

    from clusters import services

    states_only = Webhook.objects.create(name="ready", url=receiver.url, secret=SECRET, states=["ready"])
    changes_only = Webhook.objects.create(
        name="ready-changes", url=receiver.url, secret=SECRET, states=["ready"], kinds=["state"]
    )
    from clusters.models import VirtualCluster

    cluster = VirtualCluster.objects.get(pk=create_cluster(alice, "c1", "52:54:00:00:00:01"))
    services.cluster_extend(cluster=cluster, by=timedelta(hours=1))
    assert ClusterEvent.objects.filter(kind="lifetime", state="ready").exists()
    deliver_webhooks()
    bodies = [json.loads(body) for _headers, body in receiver.requests]
    got = {b["webhook"]: [(e["kind"], e["state"]) for e in b["events"]] for b in bodies}
    assert got["ready"] == [("state", "ready"), ("lifetime", "ready")]
    assert got["ready-changes"] == [("state", "ready")]
    deliver_webhooks()  # (past the events it does not want, without a request)
    assert len(receiver.requests) == 2
    changes_only.refresh_from_db()
    states_only.refresh_from_db()
    assert changes_only.last_event_id == states_only.last_event_id == ClusterEvent.objects.latest("id").id


def test_a_filtered_webhook_after_failures_catches_up_past_unwanted_events_at_once(fabric, alice, receiver):
    """After failures a batch is one event; the states it does not want are left out in the query, so one round
    sends the next wanted event instead of skipping a single unwanted one per round."""
    hook = Webhook.objects.create(name="ready-only", url=receiver.url, secret=SECRET, states=["ready"])
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    assert ClusterEvent.objects.exclude(state="ready").count() >= 4  # (requested, provisioning … before each ready)
    Webhook.objects.filter(pk=hook.pk).update(failures=7)
    webhooks.deliver(hook.pk)
    assert [e["state"] for e in receiver.events(0)] == ["ready"]
    webhooks.deliver(hook.pk)
    assert [e["state"] for e in receiver.events(1)] == ["ready"] and len(receiver.requests) == 2
    hook.refresh_from_db()
    assert hook.failures == 0 and hook.last_event_id == ClusterEvent.objects.filter(state="ready").latest("id").id


def test_disabled_webhooks_get_nothing(fabric, alice, receiver):
    Webhook.objects.create(name="off", url=receiver.url, secret=SECRET, enabled=False)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    deliver_webhooks()
    assert receiver.requests == []


@pytest.mark.parametrize("code", [301, 302, 303, 307])
def test_a_redirect_is_a_failed_delivery_not_followed(fabric, alice, receiver, code):
    """urllib follows a POST's 301/302/303 as a GET without the body: its 200 moved the cursor past events
    nobody received (and carried the signature to wherever the redirect pointed)."""
    hook = Webhook.objects.create(name="moved", url=receiver.url, secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    receiver.answers = [code]
    deliver_webhooks()
    hook.refresh_from_db()
    assert len(receiver.requests) == 1 and receiver.requests[0][1]  # the POST, nothing followed
    assert (hook.last_event_id, hook.failures, hook.last_status) == (0, 1, code)
    assert "a redirect (to http://127.0.0.1:" in hook.last_error and "is not followed" in hook.last_error


def test_admin_creates_a_webhook_with_a_secret_it_never_shows(root, receiver):
    api = APIClient()
    api.force_login(root)
    r = api.post(
        "/admin/clusters/webhook/add/",
        {"name": "acct", "url": receiver.url, "secret": SECRET, "states": "[]", "enabled": "on"},
    )
    assert r.status_code == 302, r.content[:2000]
    hook = Webhook.objects.get(name="acct")
    assert hook.secret == SECRET
    page = api.get(f"/admin/clusters/webhook/{hook.pk}/change/").content.decode()
    assert SECRET not in page
    from portal.models import AuditEntry

    entry = AuditEntry.objects.get(content_type__model="webhook", object_id=str(hook.pk), action="create")
    assert entry.changes["url"] == [None, receiver.url] and SECRET not in json.dumps(entry.changes)
    r = api.post(
        "/admin/clusters/webhook/add/",
        {"name": "bad", "url": "ftp://example.org/x", "secret": "", "states": '["nope"]', "enabled": "on"},
    )
    assert r.status_code == 200 and not Webhook.objects.filter(name="bad").exists()
    assert r.context["adminform"].form.errors["url"] == ["Enter a valid URL."]  # said once
    for states, message in (('"ready"', "a list of state names"), ("5", "a list of state names"), ('["nope"]', "nope")):
        r = api.post(
            "/admin/clusters/webhook/add/",
            {"name": "bad", "url": receiver.url, "secret": SECRET, "states": states, "enabled": "on"},
        )
        assert r.status_code == 200 and message in r.content.decode(), states  # the form says why, no 500
    assert not Webhook.objects.filter(name="bad").exists()
    r = api.post(  # the admin's names are one set (a user's "acct" is theirs)
        "/admin/clusters/webhook/add/",
        {"name": "acct", "url": receiver.url, "secret": SECRET, "states": "[]", "enabled": "on"},
    )
    assert r.status_code == 200 and "a webhook made in the admin has this name already" in r.content.decode()


def test_only_staff_who_see_every_cluster_add_or_change_webhooks_in_the_admin(django_user_model, receiver):
    """An admin's webhook is fed every cluster's events: a staff member with webhook permissions alone may not
    make one (or point one elsewhere) — with the clusters' view permission too, they may."""
    from django.contrib.auth.models import Permission

    hook = Webhook.objects.create(name="sched", url=receiver.url, secret=SECRET)
    staff = django_user_model.objects.create_user("wes", password="x", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["add_webhook", "change_webhook", "view_webhook"])
    )
    api = APIClient()
    api.force_login(staff)
    form = {"name": "mine", "url": "https://example.org/x", "secret": SECRET, "states": "[]", "enabled": "on"}
    assert api.post("/admin/clusters/webhook/add/", form).status_code == 403
    changed = {**form, "name": "sched"}
    r = api.post(f"/admin/clusters/webhook/{hook.pk}/change/", changed)
    assert r.status_code == 403
    assert list(Webhook.objects.values_list("name", "url")) == [("sched", receiver.url)]

    staff.user_permissions.add(Permission.objects.get(codename="view_virtualcluster"))
    staff = django_user_model.objects.get(pk=staff.pk)  # (permissions are cached on the instance)
    api.force_login(staff)
    assert api.post("/admin/clusters/webhook/add/", form).status_code == 302
    assert Webhook.objects.filter(name="mine", owner=None).exists()


def test_a_webhook_repaired_in_admin_starts_afresh(root, receiver):
    """A new URL, or enabled again, ends the backoff of the failures of before, as through the API; another
    change (its states) does not."""
    from datetime import timedelta

    from django.utils import timezone

    later = timezone.now() + timedelta(hours=1)
    hook = Webhook.objects.create(
        name="acct", url="http://127.0.0.1:9/x", secret=SECRET, failures=7, next_attempt_at=later, last_error="refused"
    )
    api = APIClient()
    api.force_login(root)

    def save(**changes) -> Webhook:
        form = {"name": "acct", "url": hook.url, "secret": "", "states": "[]", "enabled": "on", **changes}
        form = {k: v for k, v in form.items() if v is not None}
        r = api.post(f"/admin/clusters/webhook/{hook.pk}/change/", form)
        assert r.status_code == 302, r.content[:2000]
        return Webhook.objects.get(pk=hook.pk)

    saved = save(states='["ready"]')
    assert (saved.failures, saved.next_attempt_at, saved.last_error) == (7, later, "refused")
    saved = save(url=receiver.url, states='["ready"]')
    assert (saved.failures, saved.last_error) == (0, "") and saved.next_attempt_at <= timezone.now()
    assert saved.secret == SECRET
    Webhook.objects.filter(pk=hook.pk).update(failures=3, next_attempt_at=later)
    hook.url = receiver.url
    saved = save(enabled=None)  # turned off: the backoff stays
    assert (saved.enabled, saved.failures) == (False, 3)
    saved = save()  # on again
    assert (saved.enabled, saved.failures) == (True, 0) and saved.next_attempt_at <= timezone.now()


def test_an_admin_save_leaves_the_delivery_state_of_a_round_that_ended_meanwhile(root, monkeypatch):
    """The admin's save wrote every column as the page read them: a delivery round that ended in between (its
    cursor moved, its failures reset) was undone — the batch sent twice, or a claim undone for two rounds to
    send at once. Now only the fields the form changed are written."""
    from clusters.admin import WebhookAdmin

    hook = Webhook.objects.create(name="acct", url="http://127.0.0.1:9/x", secret=SECRET, failures=7)
    real = WebhookAdmin.save_form

    def delivered_meanwhile(self, request, form, change):
        Webhook.objects.filter(pk=hook.pk).update(last_event_id=42, failures=0, last_status=204)
        return real(self, request, form, change)

    monkeypatch.setattr(WebhookAdmin, "save_form", delivered_meanwhile)
    api = APIClient()
    api.force_login(root)
    form = {"name": "acct", "url": hook.url, "secret": "", "states": '["ready"]', "enabled": "on"}
    assert api.post(f"/admin/clusters/webhook/{hook.pk}/change/", form).status_code == 302
    saved = Webhook.objects.get(pk=hook.pk)
    assert (saved.states, saved.last_event_id, saved.failures, saved.last_status) == (["ready"], 42, 0, 204)
    assert saved.secret == SECRET


def test_an_endpoint_that_hangs_holds_no_lock_and_its_attempt_is_counted_meanwhile(fabric, alice, settings):
    """The POST runs outside any transaction: while an endpoint takes its time, the webhook's row is not
    locked and the attempt is already counted as a failure with its backoff — a worker cut by its time limit
    mid-POST (which rolled the whole attempt back: no failure, no backoff) leaves the webhook backed off."""
    import socket
    import time

    from django.db import connections, transaction

    settings.WEBHOOK_TIMEOUT = 5
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    seen = {}

    def endpoint():
        connection, _ = listener.accept()
        connection.recv(65536)
        time.sleep(0.5)  # meanwhile: how does the portal's database see the webhook?
        try:
            with transaction.atomic(using="default"):
                row = Webhook.objects.select_for_update(nowait=True).get(name="slow")
                seen.update(failures=row.failures, due_later=row.next_attempt_at > timezone.now())
        except Exception as exc:  # a lock held by the delivery: the bug
            seen["error"] = repr(exc)
        finally:
            connections.close_all()
        connection.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        connection.close()

    threading.Thread(target=endpoint, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    hook = Webhook.objects.create(name="slow", url=url, secret="s")
    create_cluster(alice)
    result = webhooks.deliver(hook.pk)
    listener.close()
    assert seen == {"failures": 1, "due_later": True}, seen
    assert result.status == 204
    hook.refresh_from_db()
    assert hook.failures == 0 and hook.last_event_id > 0


def test_a_webhook_never_reaches_this_machine_or_the_link_local_network(fabric, alice, receiver, settings, monkeypatch):
    """Loopback, link-local (a cloud's metadata service), multicast and reserved addresses are refused — in
    the admin when the URL names one, and at delivery when the name resolves to one; the POST goes to the
    address that was checked (a second DNS answer cannot send it elsewhere). ``WEBHOOK_ALLOWED_NETWORKS``
    lets an operator allow one (the tests' receivers are allowed 127.0.0.0/8)."""
    import socket

    from django.core.exceptions import ValidationError

    settings.WEBHOOK_ALLOWED_NETWORKS = []
    for url in (
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1:5432/",
        "http://[::1]:6379/",
        "http://localhost/hook",
        "http://0.0.0.0/",
    ):
        with pytest.raises(ValidationError, match="not delivered to"):
            Webhook(name="x", url=url, secret="s", states=[]).full_clean()
    Webhook(name="x", url="http://10.1.2.3/hook", secret="s", states=[]).full_clean()  # an internal service: fine
    port = receiver.server.server_port
    hook = Webhook.objects.create(name="sneaky", url=f"http://hooks.example.test:{port}/hook", secret=SECRET)
    real = socket.getaddrinfo
    answers = iter(["127.0.0.1", "127.0.0.1"])

    def resolve(host, *args, **kwargs):  # the name resolves to this machine
        if host == "hooks.example.test":
            return real(next(answers), *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    create_cluster(alice)
    result = webhooks.deliver(hook.pk)
    assert result.status is None and "resolves to 127.0.0.1: not delivered to" in result.error
    assert receiver.requests == []
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    Webhook.objects.filter(pk=hook.pk).update(next_attempt_at=timezone.now())
    answers = iter(["127.0.0.1", "192.0.2.1"])  # checked, then a second lookup would go elsewhere: none is made
    assert webhooks.deliver(hook.pk).status == 204 and len(receiver.requests) == 1


def test_a_webhook_whose_host_and_port_bypass_the_proxy_is_checked_as_a_direct_one(
    fabric, alice, receiver, settings, monkeypatch
):
    """With a proxy configured, a webhook goes through it unchecked (the proxy connects, and decides) — but only
    when urllib's proxy handler will really use it. A ``no_proxy`` entry ``host:port`` makes the handler connect
    directly to that host and port; the check asked about the bare host, took the proxy path, and the POST went
    straight to an address no webhook may reach."""
    settings.WEBHOOK_ALLOWED_NETWORKS = []
    port = receiver.server.server_port
    monkeypatch.setenv("http_proxy", "http://192.0.2.1:3128")  # (never reached: TEST-NET-1)
    monkeypatch.setenv("no_proxy", f"127.0.0.1:{port}")
    hook = Webhook.objects.create(name="bypass", url=f"http://127.0.0.1:{port}/hook", secret=SECRET)
    create_cluster(alice)
    result = webhooks.deliver(hook.pk)
    assert result.status is None and "not delivered to" in result.error, result.error
    assert receiver.requests == []
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]  # allowed: delivered, directly (no_proxy)
    Webhook.objects.filter(pk=hook.pk).update(next_attempt_at=timezone.now())
    assert webhooks.deliver(hook.pk).status == 204 and len(receiver.requests) == 1


def test_each_checked_address_is_tried_in_turn_until_one_answers(fabric, alice, receiver, monkeypatch):
    """A name with several addresses (a dual-stack endpoint whose IPv6 address this host cannot reach, one of its
    A records down): only the first was tried, and every delivery failed. Each checked address is tried in turn."""
    import socket

    port = receiver.server.server_port
    hook = Webhook.objects.create(name="multi", url=f"http://hooks.example.test:{port}/hook", secret=SECRET)
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # first an address nothing listens on (refused), then the endpoint's
        if host == "hooks.example.test":
            return real("127.0.0.2", *args, **kwargs) + real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    create_cluster(alice)
    assert webhooks.deliver(hook.pk).status == 204 and len(receiver.requests) == 1


def _raw_endpoint(answer, tls=None, *, read_request: bool = True) -> tuple[str, threading.Thread]:
    """An endpoint on 127.0.0.1 that reads one request and then runs ``answer(connection)``; with ``tls`` (a
    server SSLContext) over TLS; without ``read_request``, ``answer`` is run as soon as the client connects."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        connection, _ = listener.accept()
        try:
            if not read_request:
                return answer(connection)
            if tls is not None:
                connection = tls.wrap_socket(connection, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request:  # the whole request (closing with some unread resets the connection)
                request += connection.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *([0-9]+)", head)[1])
            while len(body) < length:
                body += connection.recv(65536)
            answer(connection)
        except OSError:
            pass  # the portal hung up
        finally:
            connection.close()
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/hook", thread


def test_an_endpoint_that_trickles_its_answer_is_cut_at_the_timeout(fabric, alice, settings):
    """``WEBHOOK_TIMEOUT`` bounds the whole exchange, not each read: an endpoint sending a byte every 0.2 s
    (no read ever times out) is cut after it, a failure with its backoff — it held a worker's thread for as
    long as it liked, and Celery's threads pool enforces no task time limit."""
    import time

    settings.WEBHOOK_TIMEOUT = 1

    def trickle(connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            connection.sendall(b"X")
            time.sleep(0.2)

    url, thread = _raw_endpoint(trickle)
    hook = Webhook.objects.create(name="trickle", url=url, secret="s")
    start = hook.last_event_id
    create_cluster(alice)
    started = time.monotonic()
    result = webhooks.deliver(hook.pk)
    assert time.monotonic() - started < 3
    assert result.status is None and result.error == "no complete answer within 1 s (WEBHOOK_TIMEOUT)"
    hook.refresh_from_db()
    assert (hook.last_event_id, hook.failures) == (start, 1)
    assert hook.last_error == result.error and hook.next_attempt_at > timezone.now()
    thread.join(5)
    assert not thread.is_alive()  # its connection was cut


@pytest.mark.parametrize(
    "answer, error",
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "SSH-2.0-OpenSSH_9.2"),  # not HTTP at all (http.client's BadStatusLine)
        (b"", "Remote end closed connection without response"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n", "got more than 65536 bytes"),
    ],
)
def test_an_endpoint_that_answers_garbage_is_a_failed_delivery(fabric, alice, answer, error):
    url, _thread = _raw_endpoint(lambda connection: connection.sendall(answer))
    hook = Webhook.objects.create(name="garbage", url=url, secret="s")
    create_cluster(alice)
    result = webhooks.deliver(hook.pk)
    assert result.status is None and re.search(error, result.error), result.error
    hook.refresh_from_db()
    assert hook.failures == 1 and hook.last_error == result.error and hook.next_attempt_at > timezone.now()


def test_a_url_with_an_impossible_port_is_refused_and_never_breaks_a_round(fabric, alice, receiver, monkeypatch):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="Port out of range"):
        Webhook(name="x", url="http://hooks.example.org:99999/hook", secret="s", states=[]).full_clean()
    bad = Webhook.objects.create(name="a-bad", url="http://hooks.example.org:99999/hook", secret="s")
    good = Webhook.objects.create(name="b-good", url=receiver.url, secret=SECRET)
    create_cluster(alice)
    by_name = {d.webhook: d for d in webhooks.deliver_due()}
    assert "Port out of range" in by_name["a-bad"].error and by_name["b-good"].status == 204
    bad.refresh_from_db()
    assert bad.failures == 1 and "Port out of range" in bad.last_error

    # whatever else goes wrong with one webhook, the round goes on with the others
    real = webhooks.deliver

    def deliver(pk):
        if pk == bad.pk:
            raise RuntimeError("a bug")
        return real(pk)

    monkeypatch.setattr(webhooks, "deliver", deliver)
    Webhook.objects.update(next_attempt_at=timezone.now())
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    by_name = {d.webhook: d for d in webhooks.deliver_due()}
    assert by_name["a-bad"].error == "RuntimeError: a bug" and by_name["b-good"].status == 204
    assert good.pk and len(receiver.requests) == 2


def test_batches_halve_after_each_failure_in_a_row(fabric, alice, receiver, monkeypatch):
    """An endpoint whose answer takes longer the more events it gets (and times out on a full batch) still
    gets through: 4 events, then 2, then 1 after failures; a success goes back to full batches."""
    monkeypatch.setattr(webhooks, "BATCH", 4)
    hook = Webhook.objects.create(name="slow", url=receiver.url, secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    create_cluster(alice, "c3", "52:54:00:00:00:03")  # three events each
    receiver.answers = [503, 503, 204, 204, 204]
    for _ in range(5):
        Webhook.objects.filter(pk=hook.pk).update(next_attempt_at=timezone.now())
        webhooks.deliver(hook.pk)
    sizes = [len(receiver.events(i)) for i in range(5)]
    assert sizes == [4, 2, 1, 4, 4]
    ids = [e["id"] for i in range(2, 5) for e in receiver.events(i)]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 9  # every event once after the failures


def _tls_server(tmp_path):
    """A TLS server context for 127.0.0.1 and the CA file that trusts it (made by the portal's own PKI module)."""
    import ssl

    from access import pki

    ca = pki.create_ca("webhook test CA")
    key = pki.generate_private_key()
    cert = pki.issue_server_cert(
        ca,
        public_key=key.public_key(),
        common_name="127.0.0.1",
        serial=2,
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1"],
    )
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca_file.write_bytes(pki.cert_to_pem(ca.cert))
    cert_file.write_bytes(pki.cert_to_pem(cert))
    key_file.write_bytes(pki.private_key_to_encrypted_pem(key, b"test"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file, password=b"test")
    return server, str(ca_file)


def test_an_https_endpoint_that_trickles_its_answer_is_cut_at_the_timeout(
    fabric, alice, settings, tmp_path, monkeypatch
):
    """The same over TLS: the exchange runs on the TLS socket that wraps (and detaches) the TCP one, and the cut
    reached only the latter — an HTTPS endpoint was never cut."""
    import time

    settings.WEBHOOK_TIMEOUT = 1
    server, ca = _tls_server(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", ca)  # the portal trusts this endpoint's certificate

    def trickle(connection):
        connection.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            connection.sendall(b"X")
            time.sleep(0.2)

    url, thread = _raw_endpoint(trickle, tls=server)
    hook = Webhook.objects.create(name="trickle-tls", url=url.replace("http://", "https://"), secret="s")
    create_cluster(alice)
    started = time.monotonic()
    result = webhooks.deliver(hook.pk)
    assert time.monotonic() - started < 3, result
    assert result.status is None and result.error == "no complete answer within 1 s (WEBHOOK_TIMEOUT)"
    thread.join(5)
    assert not thread.is_alive()


def test_webhooks_are_sent_to_at_once_so_a_slow_endpoint_holds_up_only_itself(fabric, alice, settings):
    """Three endpoints that each answer only once all three have been asked: sent one after the other, the first
    would wait for the others in vain (and fail); sent at once, every one answers."""
    settings.WEBHOOK_ALLOWED_NETWORKS = ["127.0.0.0/8"]
    barrier = threading.Barrier(3, timeout=4)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            try:
                barrier.wait()
                code = 204
            except threading.BrokenBarrierError:
                code = 503
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for i in range(3):
            Webhook.objects.create(name=f"hook{i}", url=f"http://127.0.0.1:{server.server_port}/{i}", secret=SECRET)
        create_cluster(alice, "c1", "52:54:00:00:00:01")
        deliveries = webhooks.deliver_due()
        assert sorted((d.webhook, d.status, d.error) for d in deliveries) == [(f"hook{i}", 204, "") for i in range(3)]
        assert set(Webhook.objects.values_list("failures", flat=True)) == {0}
    finally:
        server.shutdown()
        server.server_close()


def test_a_resolver_that_does_not_answer_costs_one_timeout_not_the_systems_retries(monkeypatch, settings):
    """``getaddrinfo`` has no timeout of its own: the host's lookup is given ``WEBHOOK_TIMEOUT``, then the delivery
    fails (and backs off) like an endpoint that does not answer."""
    import time as clock

    settings.WEBHOOK_TIMEOUT = 0.2
    release = threading.Event()

    def stuck(*args, **kwargs):
        release.wait(5)
        raise OSError("gave up")

    monkeypatch.setattr(webhooks.socket, "getaddrinfo", stuck)
    started = clock.monotonic()
    try:
        # one after the other, as many as a user's webhooks: the lookups still hanging never queue the next
        answers = [webhooks._checked_addresses("https://slow-dns.example.org/hook") for _ in range(10)]
    finally:
        release.set()
    assert answers == [([], "cannot resolve slow-dns.example.org: no answer within 0.2 s")] * 10
    assert clock.monotonic() - started < 4.5  # (ten lookups of 0.2 s; a pool filled by the hanging ones: 5 s)


def test_one_delivery_round_at_a_time(fabric, alice, receiver, settings):
    """Rounds that overlap (beat every WEBHOOK_INTERVAL, a round slowed by its endpoints) would each open their
    threads' connections: a round that finds another running does nothing."""
    import psycopg
    from django.db import connection

    for i in range(2):
        Webhook.objects.create(name=f"hook{i}", url=receiver.url, secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    params = connection.get_connection_params()
    other = psycopg.connect(**{k: v for k, v in params.items() if k in ("dbname", "user", "host", "port", "password")})
    try:
        other.execute("SELECT pg_advisory_lock(%s)", [webhooks._ROUND_LOCK])
        assert webhooks.deliver_due() == [] and receiver.requests == []  # another round is running
        other.execute("SELECT pg_advisory_unlock(%s)", [webhooks._ROUND_LOCK])
    finally:
        other.close()
    assert sorted(d.webhook for d in webhooks.deliver_due() if d.sent) == ["hook0", "hook1"]


def test_a_users_webhook_learns_nothing_of_internal_names_from_its_errors(monkeypatch, settings):
    """A webhook registered through the API (``public_only``) whose name resolves to an internal address, or
    does not resolve, is told the same thing, naming no address: its ``last_error`` would otherwise map the
    provider's split-horizon DNS for anyone with a token. An admin's webhook is told the details."""

    def resolve(host, port, timeout):
        if host == "db.corp.internal":
            return [(None, None, None, "", ("10.20.0.7", port))]
        if host == "local.corp.internal":
            return [(None, None, None, "", ("127.0.0.1", port))]
        raise OSError("Name or service not known")

    monkeypatch.setattr(webhooks, "_resolve", resolve)
    internal = webhooks._checked_addresses("http://db.corp.internal/", public_only=True)
    missing = webhooks._checked_addresses("http://nothing.corp.internal/", public_only=True)
    assert internal[0] == [] and "10.20.0.7" not in internal[1] and "resolves to" not in internal[1]
    assert missing[1] == internal[1].replace("db.corp", "nothing.corp") and "not known" not in missing[1]
    assert webhooks._checked_addresses("http://db.corp.internal/")[0] == ["10.20.0.7"]  # an admin's: allowed
    settings.WEBHOOK_ALLOWED_NETWORKS = []  # (the tests' own receivers are on loopback)
    assert "resolves to 127.0.0.1" in webhooks._checked_addresses("http://local.corp.internal/")[1]
    assert "Name or service not known" in webhooks._checked_addresses("http://nothing.corp.internal/")[1]


def test_the_administrators_allowed_networks_are_not_every_users(settings, monkeypatch):
    """``WEBHOOK_ALLOWED_NETWORKS`` (the README's example: ``127.0.0.0/8``, a receiver on the portal's machine) also
    opened those addresses to every user's webhook: any user could POST to the portal's own services. It holds
    for the administrators' webhooks and the middleware's (the feed of every cluster); a user's own reaches public
    addresses and ``WEBHOOK_USER_ALLOWED_NETWORKS`` only. Through an environment proxy too, and not by NAT64."""
    from types import SimpleNamespace

    from clusters import webhooks

    settings.WEBHOOK_ALLOWED_NETWORKS, settings.WEBHOOK_USER_ALLOWED_NETWORKS = ["127.0.0.0/8", "10.0.0.0/8"], []
    admins, middleware, users = (
        SimpleNamespace(owner_id=None, all_clusters=True),
        SimpleNamespace(owner_id=1, all_clusters=True),
        SimpleNamespace(owner_id=2, all_clusters=False),
    )
    assert not webhooks.refused_address("127.0.0.1", **webhooks.reach(admins))
    assert not webhooks.refused_address("10.1.2.3", **webhooks.reach(middleware))
    for address in ("127.0.0.1", "10.1.2.3", "::ffff:127.0.0.1", "169.254.169.254", "64:ff9b::a01:203"):
        assert webhooks.refused_address(address, **webhooks.reach(users)), address
    assert not webhooks.refused_address("192.0.43.8", **webhooks.reach(users))  # (a public address)
    settings.WEBHOOK_USER_ALLOWED_NETWORKS = ["10.1.0.0/16"]
    assert not webhooks.refused_address("10.1.2.3", **webhooks.reach(users))

    def resolve(host, port, timeout):
        return [(None, None, None, "", ("10.20.0.7", port))]

    monkeypatch.setattr(webhooks, "_resolve", resolve)
    monkeypatch.setenv("http_proxy", "http://proxy.example.org:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with webhooks._Deadline(5) as deadline:
        opener, why = webhooks._opener("http://db.corp.internal/", deadline, **webhooks.reach(users))
        assert opener is None and "not delivered to" in why and "10.20.0.7" not in why
        opener, why = webhooks._opener("http://db.corp.internal/", deadline, **webhooks.reach(admins))
        assert opener is not None and why == ""  # (the administrators' proxy decides)


def test_an_https_endpoint_that_trickles_its_tls_handshake_is_cut_at_the_timeout(fabric, alice, settings):
    """An endpoint sending its TLS handshake a byte at a time (no read ever times out): TLS detaches the TCP socket
    the cut watches as it starts shaking hands, so the cut cannot reach it then — Python's own handshake deadline
    (the socket's timeout, ``WEBHOOK_TIMEOUT``, for the whole handshake) ends it, and the delivery with it."""
    import time

    settings.WEBHOOK_TIMEOUT = 1

    def trickled_handshake(connection):
        connection.recv(65536)  # the ClientHello
        connection.sendall(b"\x16\x03\x03\x03\xe8")  # a handshake record of 1000 bytes: they come slowly
        for _ in range(100):
            connection.sendall(b"\x00")
            time.sleep(0.2)

    url, thread = _raw_endpoint(trickled_handshake, read_request=False)
    hook = Webhook.objects.create(name="slow-tls", url=url.replace("http://", "https://"), secret="s")
    create_cluster(alice)
    started = time.monotonic()
    result = webhooks.deliver(hook.pk)
    assert time.monotonic() - started < 3, result
    assert result.status is None and "within 1 s (WEBHOOK_TIMEOUT)" in result.error, result
    thread.join(5)
    assert not thread.is_alive()
