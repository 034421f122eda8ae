"""Fixtures of the access service's Django-side tests (imported by the test modules that use them).

Clusters are made directly in the state a test needs (READY and closed, with a VLAN); the workflow that
gets them there is the clusters app's business and tested there.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools

import pytest
from django.utils import timezone

from access.models import Gateway, GatewayKind
from network.tests.factories import HostFactory

_vlans = itertools.count(300)


def make_cluster(owner, *, name="mpi", group=None, state="ready", connectivity="closed", nodes=("node1",)):
    from clusters.models import Image, Node, VirtualCluster

    image, _ = Image.objects.get_or_create(name="user-image", defaults={"approved": False})
    cluster = VirtualCluster.objects.create(
        name=name,
        owner=owner,
        group=group,
        image=image,
        admin_rights=True,
        connectivity=connectivity,
        connectivity_reason="test",
        state=state,
        vlan_id=next(_vlans),
        expires_at=timezone.now() + dt.timedelta(days=1),
    )
    for i, node in enumerate(nodes):
        Node.objects.create(
            cluster=cluster, name=node, host=HostFactory(), mac=f"52:54:00:00:{cluster.pk % 256:02x}:{i:02x}"
        )
    return cluster


@pytest.fixture
def cluster(alice, team):
    """alice's closed READY cluster shared with the group physics (bob)."""
    return make_cluster(alice, name="mpi", group=team)


@pytest.fixture
def other_cluster(charlie):
    """charlie's cluster: alice and bob may not enter it."""
    return make_cluster(charlie, name="lab")


@functools.cache
def server_certificate(name: str) -> str:
    """A certificate for gateway ``name`` (one per name for the run: VPN profiles pin its fingerprint)."""
    from access import pki

    return pki.create_ca(f"virtcloud-gateway-{name}").cert_pem().decode()


def make_gateway(name="gw1", *, kind=GatewayKind.BOTH, address="198.18.100.1", **fields) -> Gateway:
    """A gateway that is set up (``selectors.gateways_ready``): enrolled (a server certificate, which VPN profiles
    pin) and pulled once just now — what ``manage.py gateway config --dir`` leaves. Users are only offered such
    gateways."""
    fields = {"server_certificate": server_certificate(name), "last_pull_at": timezone.now()} | fields
    return Gateway.objects.create(name=name, kind=kind, address=address, **fields)


@pytest.fixture
def gateway(db):
    return make_gateway("gw1", vpn_port=1194)


@pytest.fixture(scope="module", autouse=True)
def certificates_start_at_module_now(request):
    """For a module whose tests check certificates at its ``NOW`` (taken at import; autouse where imported):
    certificates issued without explicit dates start at that NOW too. A slow run reaches such a module more
    than the clock skew after the import, and NOW would precede their validity."""
    from access import pki

    now = request.module.NOW
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pki, "_now", lambda: now)
        yield


def client_for(user=None, token: str | None = None):
    """An API client acting as ``user`` (forced), or with the bearer ``token``."""
    from rest_framework.test import APIClient

    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    if token:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client
