"""A released VLAN id goes to another cluster only once no access gateway can still map it to the cluster that
had it: every gateway has installed a state made after the release (it told the portal through its pulls),
or so long has passed that a gateway that did not has failed closed (``GATEWAY_STATE_MAX_AGE``)."""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests.fixtures are parameters here)

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from access.models import Gateway, GatewayKind
from access.selectors import stale_gateway_lifetime, vlan_reuse_horizon
from access.tests.fixtures import gateway
from access.tests.test_api import client_for
from network import services
from network.errors import PoolExhausted
from network.models import VlanAllocation
from network.tests.factories import VlanPoolFactory
from portal.models import TokenScope
from portal.tokens import token_create

STATE = "/api/access/gateway/state/"


@pytest.fixture
def old_gateway(gateway):
    """A gateway set up an hour ago that has never said what it installed."""
    Gateway.objects.filter(pk=gateway.pk).update(created_at=timezone.now() - timedelta(hours=1))
    return gateway


@pytest.fixture
def pool(db):
    """One VLAN id and no hold-down time: only the gateways keep it back."""
    return VlanPoolFactory(name="one", ranges="100-100", reserved="", quarantine_seconds=0)


def _gateway_with_token(root, name: str) -> tuple[Gateway, str]:
    token, secret = token_create(user=root, name=name, scopes=[TokenScope.GATEWAY])
    gw = Gateway.objects.create(name=name, kind=GatewayKind.BOTH, address="198.18.100.9", token=token)
    Gateway.objects.filter(pk=gw.pk).update(created_at=timezone.now() - timedelta(hours=1))
    return gw, secret


def _release_a_while_ago(pool, *, gateway_mapped: bool = True) -> VlanAllocation:
    """Allocate (for a closed cluster's segment: the gateways map it) and release the pool's id, its release
    2 s back (a state made since is plainly after it)."""
    allocation = services.vlan_allocate(pool=pool, owner="cluster:1")
    if gateway_mapped:
        services.vlan_map_to_gateways(allocation_id=allocation.pk)
    services.vlan_release(allocation=allocation)
    VlanAllocation.objects.filter(pk=allocation.pk).update(released_at=timezone.now() - timedelta(seconds=2))
    allocation.refresh_from_db()
    return allocation


def _held(pool) -> bool:
    try:
        allocation = services.vlan_allocate(pool=pool, owner="cluster:2")
    except PoolExhausted as exc:
        assert "1 of them only wait for an access gateway to pull" in str(exc)
        return True
    services.vlan_release(allocation=allocation)  # (for the next check: released now, so held again)
    return False


def test_an_id_no_gateway_ever_mapped_waits_for_none(pool, old_gateway):
    """A public cluster's VLAN is on no gateway's trunk nor in any VLAN map: a stale gateway holds it back
    for nothing."""
    _release_a_while_ago(pool, gateway_mapped=False)
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100


def test_a_gateway_set_up_after_the_release_never_had_its_mapping(pool, gateway):
    _release_a_while_ago(pool)
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100


def test_without_gateways_only_the_hold_down_time_counts(pool):
    _release_a_while_ago(pool)
    assert vlan_reuse_horizon(timezone.now()) is None
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100


def test_the_id_waits_until_every_gateway_has_installed_a_state_made_after_the_release(pool, root):
    gw1, secret1 = _gateway_with_token(root, "gw1")
    gw2, secret2 = _gateway_with_token(root, "gw2")
    first = client_for(token=secret1).get(STATE)  # gw1 got a state, not yet said it installed it
    assert first.status_code == 200
    _release_a_while_ago(pool)
    assert _held(pool)

    # gw1 comes back with the ETag of the current state (304): it has every change, the release too.
    assert client_for(token=secret1).get(STATE, HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    gw1.refresh_from_db()
    assert gw1.state_as_of is not None and gw1.last_pull_at is not None
    assert _held(pool)  # gw2 has not

    # gw2 fetches a new state (200): the one it says it installed predates the release, so still held.
    older = (timezone.now() - timedelta(minutes=5)).isoformat()
    response = client_for(token=secret2).get(STATE, HTTP_VIRTCLOUD_STATE_GENERATED_AT=older)
    assert response.status_code == 200
    assert _held(pool)
    # Its next pull says it installed that state, made after the release: the id is free again.
    made = response.json()["generated_at"]
    assert client_for(token=secret2).get(STATE, HTTP_VIRTCLOUD_STATE_GENERATED_AT=made).status_code == 200
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100


@pytest.mark.parametrize(
    "said",
    ["yesterday", "2026-01-01T00:00:00", "\x00", "9999-12-31T00:00:00+00:00", ""],
    ids=["not a time", "naive", "NUL", "future", "empty"],
)
def test_what_a_gateway_says_it_installed_moves_nothing_when_it_cannot_be_right(pool, root, said):
    gw, secret = _gateway_with_token(root, "gw1")
    Gateway.objects.filter(pk=gw.pk).update(state_as_of=timezone.now() - timedelta(minutes=1))
    gw.refresh_from_db()
    before = gw.state_as_of
    assert client_for(token=secret).get(STATE, HTTP_VIRTCLOUD_STATE_GENERATED_AT=said).status_code == 200
    gw.refresh_from_db()
    assert gw.state_as_of == before  # a future time would have freed ids it may still map
    # Nor does it move backwards.
    older = (before - timedelta(hours=1)).isoformat()
    assert client_for(token=secret).get(STATE, HTTP_VIRTCLOUD_STATE_GENERATED_AT=older).status_code == 200
    gw.refresh_from_db()
    assert gw.state_as_of == before


def test_a_gateway_that_never_pulls_holds_the_id_only_until_it_has_failed_closed(pool, old_gateway, settings):
    allocation = _release_a_while_ago(pool)
    assert _held(pool)
    lifetime = stale_gateway_lifetime()
    assert lifetime == timedelta(seconds=2 * settings.GATEWAY_STATE_MAX_AGE + 300)
    almost = timezone.now() - lifetime + timedelta(seconds=5)
    VlanAllocation.objects.filter(pk=allocation.pk).update(released_at=almost)
    assert _held(pool)
    past = timezone.now() - lifetime - timedelta(seconds=1)
    VlanAllocation.objects.filter(pk=allocation.pk).update(released_at=past)
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100


def test_a_disabled_gateway_still_counts(pool, old_gateway):
    """It may still be running on what it pulled (a disabled gateway's pulls are refused): only deleting its
    row says it is gone."""
    Gateway.objects.filter(pk=old_gateway.pk).update(enabled=False)
    _release_a_while_ago(pool)
    assert _held(pool)
    old_gateway.delete()
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100


def test_the_metric_counts_an_id_held_for_a_gateway_as_quarantined(pool, old_gateway):
    from portal.metrics import collect

    _release_a_while_ago(pool)

    def ids(state: str) -> float:
        family = next(f for f in collect() if f.name == "virtcloud_vlan_ids")
        return next(value for labels, value in family.samples if labels == {"pool": "one", "state": state})

    assert (ids("quarantined"), ids("free")) == (1, 0)
    old_gateway.delete()
    assert (ids("quarantined"), ids("free")) == (0, 1)


def test_a_process_reuses_its_answer_for_a_moment_which_only_holds_ids_back_longer(pool, root, settings, monkeypatch):
    """VLAN_REUSE_HORIZON_TTL: a burst of allocations asks the gateways once. The answer only moves forward
    in time, so one a moment old is earlier than the truth: ids wait a little longer, none goes out early."""
    from network import services as network_services

    settings.VLAN_REUSE_HORIZON_TTL = 30
    monkeypatch.setattr(network_services, "_horizon_cache", None)
    clock = [1000.0]
    monkeypatch.setattr(network_services, "monotonic", lambda: clock[0])
    gw, secret = _gateway_with_token(root, "gw1")
    first = client_for(token=secret).get(STATE)
    _release_a_while_ago(pool)
    assert _held(pool)  # (computed now, and kept)
    assert client_for(token=secret).get(STATE, HTTP_IF_NONE_MATCH=first["ETag"]).status_code == 304
    assert _held(pool)  # the gateway has caught up, but this process still goes by its earlier answer
    clock[0] += 31
    assert services.vlan_allocate(pool=pool, owner="cluster:2").vid == 100
