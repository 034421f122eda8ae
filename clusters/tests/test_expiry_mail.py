"""E-mail to a cluster's owner before its expiry tears it down: sent over SMTP (a real connection to a loopback
server) once per expiry, again after an extension, tried again while the relay is down, never without an
address; and ``EMAIL_URL`` read as the README says."""
# ruff: noqa: F401, F811 (the pytest fixtures fabric and relay are imported)

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from clusters import services
from clusters.models import ClusterState, VirtualCluster
from clusters.tests.helpers import create_cluster, fabric
from portal import mail
from portal.tests.smtp import closed_port, relay

pytestmark = pytest.mark.django_db


def _expiring(cluster_id: int, hours: float) -> VirtualCluster:
    VirtualCluster.objects.filter(pk=cluster_id).update(
        state=ClusterState.READY,
        created_at=timezone.now()
        - timedelta(days=3),  # (a cluster that has lived: warned CLUSTER_EXPIRY_WARNING before)
        expires_at=timezone.now() + timedelta(hours=hours),
    )
    services.clusters_warn_expiring()  # (the expiry's periodic run: the 'expiring' event first)
    return VirtualCluster.objects.get(pk=cluster_id)


def test_the_owner_is_mailed_once_per_expiry_and_again_after_an_extension(fabric, alice, bob, relay):
    mine = create_cluster(alice, "mpi", job_id="42.pbs")
    later = create_cluster(bob, "later", mac="52:54:00:00:00:02")
    cluster = _expiring(mine, hours=3)
    _expiring(later, hours=48)  # not within CLUSTER_EXPIRY_WARNING (a day): no mail yet
    assert services.clusters_mail_expiring() == [mine]
    ((sender, to, message),) = relay.received
    assert (sender, to) == ("virtcloud@example.org", ["alice@example.org"])
    when = f"{cluster.expires_at:%Y-%m-%d %H:%M} UTC"
    assert message["Subject"] == f"VirtCloud: your cluster mpi ends {when}"
    body = message.get_payload(decode=True).decode()
    assert f"your virtual cluster mpi (id {mine}, job 42.pbs) ends at {when}, in about 3 h" in body
    assert "extend its lifetime on https://portal.example.org/" in body

    assert services.clusters_mail_expiring() == []  # once per expiry
    services.cluster_extend(cluster=cluster, expires_at=cluster.expires_at + timedelta(hours=1))
    assert services.clusters_mail_expiring() == []  # the new expiry is not warned of yet
    _expiring(mine, hours=2)
    assert services.clusters_mail_expiring() == [mine] and len(relay.received) == 2


def test_a_relay_that_is_down_is_tried_again_and_an_owner_without_address_is_not_mailed(
    fabric, alice, bob, relay, settings
):
    bob.email = ""
    bob.save()
    mine, theirs = create_cluster(alice, "a"), create_cluster(bob, "b", mac="52:54:00:00:00:02")
    _expiring(mine, hours=1)
    _expiring(theirs, hours=1)
    settings.EMAIL_PORT = closed_port()
    assert services.clusters_mail_expiring() == []  # refused: logged, given back
    assert VirtualCluster.objects.get(pk=mine).expiry_mailed_for is None
    settings.EMAIL_PORT = relay.port
    assert services.clusters_mail_expiring() == [mine]
    assert [to for _sender, to, _message in relay.received] == [["alice@example.org"]]
    assert services.clusters_mail_expiring() == []  # bob has no address: never tried again


def test_an_address_the_relay_refuses_for_good_is_not_tried_again_one_it_defers_is(fabric, alice, relay):
    cluster = create_cluster(alice, "a")
    _expiring(cluster, hours=1)
    relay.rcpt_reply = (450, "mailbox busy, try later")
    assert services.clusters_mail_expiring() == [] and relay.rcpts == 1
    assert VirtualCluster.objects.get(pk=cluster).expiry_mailed_for is None  # given back: tried again
    # a relay set up wrong (our sender refused) refuses every message alike: each is tried again once it is right
    relay.rcpt_reply, relay.mail_reply = (250, "ok"), (553, "sender not allowed")
    assert services.clusters_mail_expiring() == []
    assert VirtualCluster.objects.get(pk=cluster).expiry_mailed_for is None
    relay.mail_reply = (250, "ok")
    relay.rcpt_reply = (550, "no such user")
    assert services.clusters_mail_expiring() == [] and relay.rcpts == 2
    assert services.clusters_mail_expiring() == [] and relay.rcpts == 2  # refused for good: not asked again


def test_email_needs_the_portals_address_in_production(tmp_path):
    from portal.tests.test_settings import PRODUCTION, loaded, refused

    assert "EMAIL_URL needs SITE_URL" in refused(tmp_path, **PRODUCTION, EMAIL_URL="smtp://127.0.0.1")
    site = {"SITE_URL": "https://portal.example.org"}
    assert loaded(tmp_path, **PRODUCTION, **site, EMAIL_URL="smtp://127.0.0.1")["DEBUG"] is False


def test_no_mail_without_email_url(fabric, alice, settings):
    settings.EMAIL_ENABLED = False
    _expiring(create_cluster(alice, "a"), hours=1)
    assert services.clusters_mail_expiring() == []
    assert VirtualCluster.objects.get(name="a").expiry_mailed_for is None


@pytest.mark.parametrize(
    "url, expected",
    [
        ("", {"EMAIL_ENABLED": False}),
        ("console://", {"EMAIL_ENABLED": True, "EMAIL_BACKEND": "django.core.mail.backends.console.EmailBackend"}),
        ("smtp://127.0.0.1", {"EMAIL_HOST": "127.0.0.1", "EMAIL_PORT": 25, "EMAIL_USE_TLS": False}),
        ("smtp://u:p%40ss@localhost:2525", {"EMAIL_PORT": 2525, "EMAIL_HOST_USER": "u", "EMAIL_HOST_PASSWORD": "p@ss"}),
        ("smtp+starttls://u:p@mail.example.org", {"EMAIL_PORT": 587, "EMAIL_USE_TLS": True, "EMAIL_USE_SSL": False}),
        ("smtps://u:p@mail.example.org", {"EMAIL_PORT": 465, "EMAIL_USE_TLS": False, "EMAIL_USE_SSL": True}),
    ],
)
def test_email_url_is_read_as_documented(url, expected):
    got = mail.settings_from_url(url, debug=False)
    assert {key: got.get(key) for key in expected} == expected


@pytest.mark.parametrize(
    "url, message",
    [
        ("smtp://u:p@mail.example.org", "would cross the network in clear"),
        ("imap://mail.example.org", r"is not one of smtp, smtp\+starttls, smtps, console"),
        ("smtp://mail.example.org:99999", "is not a number"),
        ("smtps://", "no host"),
    ],
)
def test_a_bad_email_url_is_refused_naming_the_problem(url, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        mail.settings_from_url(url, debug=False)
