"""E-mail to the holder of a publish profile (the router that bridges a cluster into their network) a week before
it ends while its cluster lives on: over SMTP to a loopback relay, once, not for a profile that ends with its
cluster, tried again while the relay is down."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures and portal.tests.smtp)

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone

from access import services
from access.models import Credential
from access.tests.fixtures import cluster, gateway, make_cluster
from clusters.models import VirtualCluster
from portal.tests.smtp import closed_port, relay

pytestmark = pytest.mark.django_db


def _publish(user, clusters, *, ends_in: dt.timedelta, cluster_ends_in: dt.timedelta, label: str = "") -> Credential:
    profile = services.vpn_profile_issue(user=user, clusters=clusters, publish=True, label=label)
    now = timezone.now()
    VirtualCluster.objects.filter(pk__in=[c.pk for c in clusters]).update(expires_at=now + cluster_ends_in)
    Credential.objects.filter(pk=profile.credential.pk).update(not_after=now + ends_in)
    return Credential.objects.get(pk=profile.credential.pk)


def test_the_holder_is_mailed_a_week_before_a_publish_profile_ends_and_only_then(
    alice, cluster, gateway, relay, settings
):
    soon = _publish(
        alice, [cluster], ends_in=dt.timedelta(days=3), cluster_ends_in=dt.timedelta(days=30), label="home router"
    )
    assert services.credentials_mail_expiring() == [soon.pk]
    ((_sender, to, message),) = relay.received
    assert to == ["alice@example.org"]
    assert (
        message["Subject"]
        == f"VirtCloud: your publish VPN profile {soon.serial} ends {soon.not_after:%Y-%m-%d %H:%M} UTC"
    )
    body = message.get_payload(decode=True).decode()
    assert f"your publish VPN profile {soon.serial} (home router), which bridges" in body
    assert "https://portal.example.org/access/" in body
    assert services.credentials_mail_expiring() == []  # once

    later = make_cluster(alice, name="later")
    _publish(alice, [later], ends_in=dt.timedelta(days=20), cluster_ends_in=dt.timedelta(days=30))  # not yet
    other = make_cluster(alice, name="other")
    _publish(alice, [other], ends_in=dt.timedelta(days=3), cluster_ends_in=dt.timedelta(days=3))  # ends with it
    assert services.credentials_mail_expiring() == [] and len(relay.received) == 1


def test_a_relay_that_is_down_is_tried_again(alice, cluster, gateway, relay, settings):
    soon = _publish(alice, [cluster], ends_in=dt.timedelta(days=1), cluster_ends_in=dt.timedelta(days=30))
    settings.EMAIL_PORT = closed_port()
    assert services.credentials_mail_expiring() == []
    assert Credential.objects.get(pk=soon.pk).expiry_mailed is False
    settings.EMAIL_PORT = relay.port
    assert services.credentials_mail_expiring() == [soon.pk]


def test_a_profile_that_ends_with_its_cluster_is_mailed_once_the_cluster_is_extended(alice, cluster, gateway, relay):
    days = dt.timedelta(days=1)
    profile = _publish(alice, [cluster], ends_in=3 * days, cluster_ends_in=3 * days)
    assert services.credentials_mail_expiring() == []  # it ends with the cluster: the cluster's e-mail says so
    assert Credential.objects.get(pk=profile.pk).expiry_mailed is False  # not given up on
    VirtualCluster.objects.filter(pk=cluster.pk).update(expires_at=timezone.now() + 30 * days)
    assert services.credentials_mail_expiring() == [profile.pk]
