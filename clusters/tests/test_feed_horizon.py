"""The feed's horizon: events are pruned after ``CLUSTER_EVENT_RETENTION`` days, and a reader whose cursor is
behind what pruning deleted is told so — the API answers 410 with where to go on, a webhook's next batch
carries ``missed`` — instead of going on as if nothing was skipped. A quiet reader's cursor moves with the feed,
so only one that stopped reading that long is. A webhook failing for ``WEBHOOK_ALERT_AFTER`` has its owner
mailed, once per run of failures."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.core import mail as django_mail
from django.utils import timezone

from clusters import services
from clusters.models import ClusterEvent, EventHorizon, Webhook
from clusters.tasks import deliver_webhooks, prune_events
from clusters.tests.helpers import client_for, create_cluster
from clusters.tests.test_webhooks import SECRET, receiver  # noqa: F401 (the fixture)
from network.tests.fakefabric import fabric_fixture  # noqa: F401
from portal.tokens import token_create

pytestmark = pytest.mark.django_db(transaction=True)


def _age(days: int = 31, **filters) -> None:
    ClusterEvent.objects.filter(**filters).update(at=timezone.now() - timedelta(days=days))


def _ids() -> list[int]:
    return list(ClusterEvent.objects.order_by("id").values_list("id", flat=True))


def test_pruning_keeps_the_newest_event_and_records_how_far_it_went(fabric, alice, settings):
    """Every event old: all but the newest go (a new webhook starts after the newest: with none left it would
    start behind what was pruned), and the highest id deleted is recorded."""
    settings.CLUSTER_EVENT_RETENTION = 30
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    first, second, newest = _ids()
    _age()
    assert prune_events() == 2
    assert _ids() == [newest]
    assert EventHorizon.through() == second
    assert prune_events() == 0  # the newest stays, however old
    assert EventHorizon.through() == second
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    assert min(_ids()[1:]) > newest


def test_a_reader_behind_pruned_events_is_told_where_to_go_on(fabric, alice, settings):
    settings.CLUSTER_EVENT_RETENTION = 30
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    first, second, newest = _ids()
    _age(id__lte=second)
    prune_events()
    api = client_for(alice)
    r = api.get("/api/clusters/events/", {"after": first})
    assert r.status_code == 410, r.content
    assert r.data["code"] == "events_pruned" and r.data["resume_after"] == second
    assert "after=" in r.data["detail"] and "30 days" in r.data["detail"]
    # going on from where it says: nothing more is missing
    r = api.get("/api/clusters/events/", {"after": second})
    assert r.status_code == 200 and [e["id"] for e in r.data["events"]] == [newest]
    # a reader starting afresh (after 0) gets what is kept, without a 410
    r = api.get("/api/clusters/events/")
    assert r.status_code == 200 and [e["id"] for e in r.data["events"]] == [newest]


def test_a_quiet_readers_cursor_moves_with_the_feed_and_is_never_left_behind(fabric, alice, charlie, settings):
    """Alice's clusters stay quiet while charlie's change: her ``last`` moves to the feed's newest id anyway, so
    pruning charlie's old events later does not make her next read a 410 (she missed nothing)."""
    settings.CLUSTER_EVENT_RETENTION = 30
    create_cluster(alice, "a1", "52:54:00:00:00:01")
    api = client_for(alice)
    last = api.get("/api/clusters/events/").data["last"]
    create_cluster(charlie, "c1", "52:54:00:00:00:02")
    create_cluster(charlie, "c2", "52:54:00:00:00:03")
    page = api.get("/api/clusters/events/", {"after": last}).data
    assert page["events"] == [] and page["last"] == _ids()[-1]
    _age(id__lt=_ids()[-1])
    prune_events()
    assert EventHorizon.through() > last
    r = api.get("/api/clusters/events/", {"after": page["last"]})
    assert r.status_code == 200 and r.data["events"] == []


def test_a_full_page_goes_on_from_its_last_event(fabric, alice, charlie):
    create_cluster(alice, "a1", "52:54:00:00:00:01")
    create_cluster(charlie, "c1", "52:54:00:00:00:02")
    page = client_for(alice).get("/api/clusters/events/", {"limit": 2}).data
    assert page["last"] == page["events"][-1]["id"] < _ids()[-1]  # the third of alice's still to read


def test_a_webhook_behind_pruned_events_is_told_what_it_missed(fabric, alice, receiver, settings):  # noqa: F811
    settings.CLUSTER_EVENT_RETENTION = 30
    hook = Webhook.objects.create(name="slow", url=receiver.url, secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    first, second, newest = _ids()
    _age(id__lte=second)
    prune_events()
    deliver_webhooks()
    body = json.loads(receiver.requests[0][1])
    assert body["missed"] == {"after": hook.last_event_id, "through": second}
    assert [e["id"] for e in body["events"]] == [newest]
    hook.refresh_from_db()
    assert hook.last_event_id == newest
    deliver_webhooks()
    assert len(receiver.requests) == 1  # told once


def test_a_filtered_webhook_gets_the_missed_notice_even_with_no_event_for_it(fabric, alice, receiver, settings):  # noqa: F811
    """Nothing left that it wants (a ``failed`` filter): the notice still goes, alone, and the cursor moves past
    what was deleted — a gap is never passed over without a word."""
    settings.CLUSTER_EVENT_RETENTION = 30
    hook = Webhook.objects.create(name="failures", url=receiver.url, secret=SECRET, states=["failed"])
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    _, second, newest = _ids()
    _age(id__lte=second)
    prune_events()
    deliver_webhooks()
    body = json.loads(receiver.requests[0][1])
    assert body["events"] == [] and body["missed"]["through"] == second
    hook.refresh_from_db()
    assert hook.last_event_id == second
    deliver_webhooks()  # then past the events it does not want, without a request
    hook.refresh_from_db()
    assert len(receiver.requests) == 1 and hook.last_event_id == newest


def test_a_webhook_not_told_while_its_endpoint_fails(fabric, alice, receiver, settings):  # noqa: F811
    """The notice's batch failed: the cursor stays behind the horizon, and the next try says it again."""
    settings.CLUSTER_EVENT_RETENTION = 30
    hook = Webhook.objects.create(name="down", url=receiver.url, secret=SECRET)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    _, second, _ = _ids()
    _age(id__lte=second)
    prune_events()
    receiver.answers = [503]
    deliver_webhooks()
    Webhook.objects.filter(pk=hook.pk).update(next_attempt_at=timezone.now())
    deliver_webhooks()
    assert [json.loads(b)["missed"]["through"] for _h, b in receiver.requests] == [second, second]


@pytest.fixture
def mailbox(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    settings.EMAIL_ENABLED = True
    settings.SITE_URL = "https://portal.example.org"
    settings.WEBHOOK_ALERT_AFTER = 3600
    django_mail.outbox = []
    return django_mail.outbox


def _failing_hook(owner, url: str) -> Webhook:
    """A webhook ``owner`` registered with a ``clusters:write`` token of theirs (the clusters they see)."""
    token, _secret = token_create(user=owner, name="hooks", scopes=["clusters:write"])
    return Webhook.objects.create(
        name="accounting", owner=owner, token=token, url=url, secret=SECRET, all_clusters=False
    )


def test_a_webhook_failing_for_an_hour_has_its_owner_mailed_once(fabric, alice, receiver, mailbox):  # noqa: F811
    hook = _failing_hook(alice, receiver.url)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    receiver.answers = [500]
    deliver_webhooks()
    hook.refresh_from_db()
    assert hook.failing_since is not None and hook.failures == 1
    assert services.webhooks_mail_failing() == []  # failing for less than WEBHOOK_ALERT_AFTER
    Webhook.objects.filter(pk=hook.pk).update(failing_since=timezone.now() - timedelta(hours=2))
    assert services.webhooks_mail_failing() == [hook.pk]
    assert services.webhooks_mail_failing() == []  # once per run of failures
    [message] = mailbox
    assert message.to == ["alice@example.org"] and "accounting" in message.subject
    assert receiver.url in message.body and "HTTP 500" in message.body
    assert f"https://portal.example.org/api/clusters/webhooks/{hook.pk}/" in message.body
    assert "The oldest event waiting for it is from" in message.body and "Events are kept 30 days" in message.body
    assert '"missed"' in message.body and "1 tries in a row failed" in message.body


def test_a_webhook_that_recovers_and_fails_again_is_mailed_again(fabric, alice, receiver, mailbox):  # noqa: F811
    hook = _failing_hook(alice, receiver.url)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    receiver.answers = [500]
    deliver_webhooks()
    Webhook.objects.filter(pk=hook.pk).update(
        failing_since=timezone.now() - timedelta(hours=2), next_attempt_at=timezone.now()
    )
    assert services.webhooks_mail_failing() == [hook.pk]
    deliver_webhooks()  # 204: delivered
    hook.refresh_from_db()
    assert (hook.failing_since, hook.failing_mailed_for, hook.failures) == (None, None, 0)
    create_cluster(alice, "c2", "52:54:00:00:00:02")
    receiver.answers = [502]
    deliver_webhooks()
    Webhook.objects.filter(pk=hook.pk).update(failing_since=timezone.now() - timedelta(hours=2))
    assert services.webhooks_mail_failing() == [hook.pk]
    assert len(mailbox) == 2


def test_a_relay_that_cannot_take_the_alert_now_leaves_it_for_the_next_run(fabric, alice, mailbox, monkeypatch):
    from portal import mail

    hook = _failing_hook(alice, "http://127.0.0.1:9/nowhere")
    Webhook.objects.filter(pk=hook.pk).update(failing_since=timezone.now() - timedelta(hours=2), failures=40)
    monkeypatch.setattr(mail, "send", lambda **kwargs: mail.RETRY)
    assert services.webhooks_mail_failing() == []
    hook.refresh_from_db()
    assert hook.failing_mailed_for is None  # the claim given back
    monkeypatch.undo()
    assert services.webhooks_mail_failing() == [hook.pk]


def test_the_admins_webhooks_and_disabled_ones_mail_nobody(fabric, alice, mailbox):
    long_ago = timezone.now() - timedelta(hours=2)
    admins = Webhook.objects.create(name="admins", url="http://127.0.0.1:9/a", secret=SECRET)
    off = _failing_hook(alice, "http://127.0.0.1:9/b")
    Webhook.objects.filter(pk=off.pk).update(enabled=False)
    Webhook.objects.filter(pk__in=[admins.pk, off.pk]).update(failing_since=long_ago, failures=9)
    assert services.webhooks_mail_failing() == [] and mailbox == []


def test_a_new_url_starts_a_new_run_of_failures(fabric, alice, mailbox):
    hook = _failing_hook(alice, "http://127.0.0.1:9/old")
    long_ago = timezone.now() - timedelta(hours=2)
    Webhook.objects.filter(pk=hook.pk).update(failing_since=long_ago, failing_mailed_for=long_ago, failures=9)
    services.webhook_update(hook=hook, changes={"url": "http://127.0.0.1:9/new"})
    hook.refresh_from_db()
    assert (hook.failing_since, hook.failing_mailed_for, hook.failures) == (None, None, 0)


def test_a_webhook_with_nothing_left_to_send_is_failing_no_more(fabric, alice, receiver, mailbox):  # noqa: F811
    """Its endpoint choked on some events, then its owner narrowed ``states``: nothing is tried any more, so no
    run of failures goes on — it was mailed "failing since" an hour later, and the API kept saying so."""
    hook = _failing_hook(alice, receiver.url)
    create_cluster(alice, "c1", "52:54:00:00:00:01")
    receiver.answers = [500]
    deliver_webhooks()
    assert Webhook.objects.get(pk=hook.pk).failing_since is not None
    services.webhook_update(hook=Webhook.objects.get(pk=hook.pk), changes={"states": ["failed"]})
    Webhook.objects.filter(pk=hook.pk).update(
        failing_since=timezone.now() - timedelta(hours=2), next_attempt_at=timezone.now()
    )
    deliver_webhooks()
    hook.refresh_from_db()
    assert (hook.failures, hook.failing_since) == (0, None) and hook.last_event_id == _ids()[-1]
    assert services.webhooks_mail_failing() == [] and len(receiver.requests) == 1
