"""The desired state computed from the database: what each owned port and each host must carry."""

from __future__ import annotations

import pytest

from network import selectors, services
from network.models import Segment
from network.tests.fakefabric import fabric_fixture  # noqa: F401

NONE = frozenset()


def _by_name(fabric, per_switch):
    names = {s.pk: s.name for s in fabric.switches.values()}
    return {names[pk]: ports for pk, ports in per_switch.items()}


def test_single_site_segment_stays_on_its_host_trunks(fabric):
    seg = services.segment_create(owner="c1", hosts=[fabric.hosts["brno1"], fabric.hosts["brno2"]], gateway=False)
    want = _by_name(fabric, selectors.switch_desired())
    v = frozenset({seg.vid})
    assert want["sw-brno"] == {"h1": v, "h2": v, "uplink": NONE, "gw": NONE}
    assert want["sw-pilsen"] == {"h1": NONE, "h2": NONE, "uplink": NONE}
    assert want["sw-prague"] == {"h1": NONE, "h2": NONE, "uplink": NONE}


def test_multi_site_segment_uses_the_uplinks_of_its_sites_only(fabric):
    seg = services.segment_create(owner="c1", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen2"]], gateway=False)
    want = _by_name(fabric, selectors.switch_desired())
    v = frozenset({seg.vid})
    assert want["sw-brno"] == {"h1": v, "h2": NONE, "uplink": v, "gw": NONE}
    assert want["sw-pilsen"] == {"h1": NONE, "h2": v, "uplink": v}
    assert want["sw-prague"] == {"h1": NONE, "h2": NONE, "uplink": NONE}


def test_closed_segment_reaches_the_gateway_across_the_core(fabric):
    seg = services.segment_create(owner="c1", hosts=[fabric.hosts["prague1"]], gateway=True)
    want = _by_name(fabric, selectors.switch_desired())
    v = frozenset({seg.vid})
    assert want["sw-brno"] == {"h1": NONE, "h2": NONE, "uplink": v, "gw": v}
    assert want["sw-prague"] == {"h1": v, "h2": NONE, "uplink": v}
    assert want["sw-pilsen"]["uplink"] == NONE


def test_a_gateway_switch_disabled_for_maintenance_keeps_the_closed_vlans_on_the_other_sites_uplinks(fabric):
    """A disabled switch is never touched — it still forwards — so the way in to a closed cluster stays: the core
    uplinks toward the gateway's site keep the VLAN (the desired state took the enabled gateways only, and the
    reconciler removed the VLAN from prague's uplink as stale: the cluster cut off from its gateway)."""
    from network.models import Switch

    seg = services.segment_create(owner="c1", hosts=[fabric.hosts["prague1"]], gateway=True)
    Switch.objects.filter(name="sw-brno").update(enabled=False)
    want = _by_name(fabric, selectors.switch_desired())
    v = frozenset({seg.vid})
    assert want["sw-prague"] == {"h1": v, "h2": NONE, "uplink": v}
    assert [s.name for s in selectors.segment_devices(seg)[0]] == ["sw-prague"]  # (the disabled one: untouched)


def test_a_gateway_trunk_gets_only_the_closed_vlans_whose_core_reaches_its_site(fabric):
    """A gateway trunk added later at a site the closed segment's core does not reach (another core, whose
    pool may hold the same ids: pools of cores without a common site may overlap) never gets that segment's
    VLAN: there the id is the other core's cluster, and the two would meet on one switch. Every reader of
    the desired state (provisioning, reconciler, dry run) agrees, on one query for the gateway sites."""
    from network.choices import PortRole
    from network.tests.factories import (
        CoreTransportFactory,
        HostFactory,
        SiteFactory,
        SwitchFactory,
        SwitchPortFactory,
        VlanPoolFactory,
    )

    fabric.pool.ranges = "150"
    fabric.pool.save()
    ostrava = SiteFactory(name="ostrava")
    east = VlanPoolFactory(name="east", core=CoreTransportFactory(name="east", sites=[ostrava]), ranges="150")
    east.full_clean()
    sw = SwitchFactory(name="sw-ostrava", site=ostrava, platform="fake", driver_args=fabric.args)
    port = SwitchPortFactory(switch=sw, name="h1", role=PortRole.HOST_TRUNK)
    host = HostFactory(name="ostrava1", site=ostrava, switch_port=port, driver="fake", driver_args=fabric.args)
    closed = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"]], gateway=True)
    public = services.segment_create(owner="b", hosts=[host], gateway=False, pool=east)
    assert closed.vid == public.vid == 150
    SwitchPortFactory(switch=sw, name="gw", role=PortRole.GATEWAY_TRUNK)  # a second gateway, at ostrava
    assert selectors.switch_desired([sw.pk])[sw.pk] == {"h1": frozenset({150}), "gw": NONE}
    assert selectors.switch_desired([fabric.switches["brno"].pk])[fabric.switches["brno"].pk]["gw"] == {150}
    assert selectors.segment_views(Segment.objects.filter(pk=closed.pk))[0].sites == {fabric.sites["brno"].pk}


def test_two_switches_at_one_site_meet_through_their_core_uplinks(fabric):
    """A site with a second switch (more host ports; the access gateway's trunk on one switch, the hosts on the
    other): a cluster on both switches of one site, or a closed one whose hosts are on the switch without the
    gateway trunk, was left without its uplinks — the uplinks were given by number of sites — and its two halves
    (or its hosts and its gateway) could not reach each other."""
    from network.choices import PortRole
    from network.tests.factories import HostFactory, SwitchFactory, SwitchPortFactory

    brno = fabric.sites["brno"]
    second = SwitchFactory(name="sw-brno-b", site=brno, platform="fake", driver_args=fabric.args)
    port = SwitchPortFactory(switch=second, name="h1", role=PortRole.HOST_TRUNK)
    SwitchPortFactory(switch=second, name="uplink", role=PortRole.CORE_UPLINK, core=fabric.core)
    brno3 = HostFactory(name="brno3", site=brno, switch_port=port, driver="fake", driver_args=fabric.args)

    both = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], brno3], gateway=False)
    hidden = services.segment_create(owner="b", hosts=[brno3], gateway=True)  # the gateway trunk is on sw-brno
    alone = services.segment_create(owner="c", hosts=[fabric.hosts["brno2"]], gateway=False)
    names = {s.pk: s.name for s in fabric.switches.values()} | {second.pk: second.name}
    want = {names[pk]: ports for pk, ports in selectors.switch_desired().items()}
    assert want["sw-brno"] == {
        "h1": {both.vid},
        "h2": {alone.vid},
        "uplink": {both.vid, hidden.vid},
        "gw": {hidden.vid},
    }
    assert want["sw-brno-b"] == {"h1": {both.vid, hidden.vid}, "uplink": {both.vid, hidden.vid}}
    assert want["sw-pilsen"]["uplink"] == want["sw-prague"]["uplink"] == NONE
    footprint = selectors.segment_footprint(Segment.objects.get(pk=hidden.pk))
    assert footprint.switches == {fabric.switches["brno"].pk, second.pk}


def test_several_segments_and_hosts(fabric):
    a = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]], gateway=False)
    b = services.segment_create(owner="b", hosts=[fabric.hosts["brno1"]], gateway=True)
    want = _by_name(fabric, selectors.switch_desired())
    assert want["sw-brno"] == {
        "h1": frozenset({a.vid, b.vid}),
        "h2": NONE,
        "uplink": frozenset({a.vid}),
        "gw": frozenset({b.vid}),
    }
    hosts = {fabric.hosts[n].pk: n for n in fabric.hosts}
    per_host = {hosts[pk]: vids for pk, vids in selectors.host_desired().items()}
    assert per_host["brno1"] == frozenset({a.vid, b.vid})
    assert per_host["prague1"] == frozenset({a.vid})
    assert per_host["pilsen1"] == NONE


def test_segments_going_away_leave_the_desired_state(fabric):
    a = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], fabric.hosts["prague1"]], gateway=False)
    b = services.segment_create(owner="b", hosts=[fabric.hosts["brno1"]], gateway=False)
    services.segment_delete(segment=a)
    Segment.objects.filter(pk=b.pk).update(state=Segment.State.COMPENSATING)
    want = _by_name(fabric, selectors.switch_desired())
    assert all(vids == NONE for ports in want.values() for vids in ports.values())
    assert all(vids == NONE for vids in selectors.host_desired().values())


def test_footprint_is_what_the_segment_needs_whatever_its_state(fabric):
    seg = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"], fabric.hosts["pilsen1"]], gateway=False)
    services.segment_delete(segment=seg)
    footprint = selectors.segment_footprint(seg)
    assert footprint.switches == {fabric.switches["brno"].pk, fabric.switches["pilsen"].pk}
    assert footprint.hosts == {fabric.hosts["brno1"].pk, fabric.hosts["pilsen1"].pk}


def test_a_closed_segments_footprint_reaches_the_gateway_site(fabric):
    """The footprint reads only the switches the segment can reach: for a closed one that includes the switch
    at the gateway site (brno) though no member is there."""
    hosts = [fabric.hosts["pilsen1"], fabric.hosts["prague2"]]
    seg = services.segment_create(owner="a", hosts=hosts, gateway=True)
    footprint = selectors.segment_footprint(seg)
    assert footprint.switches == {fabric.switches[site].pk for site in ("brno", "pilsen", "prague")}
    seg = services.segment_create(owner="b", hosts=hosts, gateway=False)
    assert selectors.segment_footprint(seg).switches == {fabric.switches[s].pk for s in ("pilsen", "prague")}


def test_migration_keeps_the_old_devices_in_the_segments_device_list(fabric):
    seg = services.segment_create(owner="a", hosts=[fabric.hosts["brno1"]], gateway=False)
    from network.convergence import change_create

    change_create(device=fabric.hosts["brno1"], segment=seg, cause="provision a")
    change_create(device=fabric.switches["brno"], segment=seg, cause="provision a")
    services.segment_set_hosts(segment=seg, hosts=[fabric.hosts["pilsen1"]])
    switches, hosts = selectors.segment_devices(seg)
    assert {s.name for s in switches} == {"sw-brno", "sw-pilsen"}
    assert {h.name for h in hosts} == {"brno1", "pilsen1"}


def test_desired_state_costs_a_fixed_number_of_queries(fabric, django_assert_max_num_queries):
    for i, name in enumerate(["brno1", "pilsen1", "prague1", "brno2"]):
        services.segment_create(owner=f"c{i}", hosts=[fabric.hosts[name], fabric.hosts["prague2"]], gateway=i % 2 == 0)
    with django_assert_max_num_queries(5):
        selectors.switch_desired()
    with django_assert_max_num_queries(5):
        selectors.host_desired()


def test_the_desired_state_of_some_devices_reads_only_the_segments_that_reach_them(fabric):
    """For every device, the state computed from the segments that can reach it equals the state computed
    from every live segment — over many random segments (single- and multi-site, closed and public, some
    being deleted) and for batches of devices too."""
    import random

    rng = random.Random(7)
    hosts = list(fabric.hosts.values())
    for i in range(40):
        members = rng.sample(hosts, rng.randint(1, 4))
        seg = services.segment_create(owner=f"r{i}", hosts=members, gateway=rng.random() < 0.4)
        if rng.random() < 0.2:
            services.segment_delete(segment=seg)
    everything = selectors.desired_segments()
    full_switches = selectors.switch_desired(segments=everything)
    full_hosts = selectors.host_desired(segments=everything)
    switch_ids = [s.pk for s in fabric.switches.values()]
    for pk in switch_ids:
        assert selectors.switch_desired([pk])[pk] == full_switches[pk]
        assert len(selectors.desired_segments(switch_ids=[pk])) <= len(everything)
    for host in hosts:
        assert selectors.host_desired([host.pk])[host.pk] == full_hosts[host.pk]
    batch = rng.sample(switch_ids, 2)
    assert selectors.switch_desired(batch) == {pk: full_switches[pk] for pk in batch}
    prague = fabric.switches["prague"].pk  # no gateway trunk there: closed segments of other sites stay out
    reaching = {v.owner_ref for v in selectors.desired_segments(switch_ids=[prague])}
    assert reaching < {v.owner_ref for v in everything}
    assert selectors.desired_segments(switch_ids=[], host_ids=[]) == []


def test_a_public_segment_reaches_the_providers_router_across_the_core(fabric):
    """A router trunk (toward the provider's router, which routes public clusters' subnets) carries every
    public segment whose core joins its site — across the core from the hosts' sites — and no closed one; the
    access-gateway trunk carries no public one. Both readers (every switch, or the switches of one layer)
    agree, and the segment's devices include the router's switch."""
    from network import workflows
    from network.choices import PortRole
    from network.tests.factories import SwitchPortFactory

    SwitchPortFactory(switch=fabric.switches["prague"], name="rt", role=PortRole.ROUTER_TRUNK)
    public = services.segment_create(owner="p", hosts=[fabric.hosts["pilsen1"]], gateway=False)
    closed = services.segment_create(owner="c", hosts=[fabric.hosts["pilsen2"]], gateway=True)
    p, c = frozenset({public.vid}), frozenset({closed.vid})
    want = _by_name(fabric, selectors.switch_desired())
    assert want["sw-prague"] == {"h1": NONE, "h2": NONE, "uplink": p, "rt": p}
    assert want["sw-pilsen"] == {"h1": p, "h2": c, "uplink": p | c}
    assert want["sw-brno"] == {"h1": NONE, "h2": NONE, "uplink": c, "gw": c}
    prague = fabric.switches["prague"].pk
    assert selectors.switch_desired([prague])[prague] == want["sw-prague"]
    switches, _hosts = selectors.segment_devices(public)
    assert {s.name for s in switches} == {"sw-pilsen", "sw-prague"}

    workflows.provision(public.pk).apply().get()
    assert fabric.switch_ports("sw-prague")["rt"] == p
    services.segment_delete(segment=public)
    workflows.teardown(public.pk).apply().get()
    assert fabric.switch_ports("sw-prague")["rt"] == NONE


def test_with_routers_a_public_segment_needs_a_core_that_reaches_one(fabric):
    from network.choices import PortRole
    from network.errors import NoCoreForSites
    from network.tests.factories import (
        CoreTransportFactory,
        HostFactory,
        SiteFactory,
        SwitchFactory,
        SwitchPortFactory,
        VlanPoolFactory,
    )

    kosice = SiteFactory(name="kosice")
    VlanPoolFactory(name="kos", core=CoreTransportFactory(name="kos-local", sites=[kosice]), ranges="100-199")
    host = HostFactory(name="kosice1", site=kosice, switch_port=SwitchPortFactory(switch=SwitchFactory(site=kosice)))
    services.segment_create(owner="before", hosts=[host], gateway=False)  # no router anywhere: nothing to reach
    SwitchPortFactory(switch=fabric.switches["prague"], name="rt", role=PortRole.ROUTER_TRUNK)
    with pytest.raises(NoCoreForSites) as exc:
        services.segment_create(owner="after", hosts=[host], gateway=False)
    assert str(exc.value) == (
        "no core transport with a VLAN pool joins sites kosice and a site with a router trunk (prague)"
    )
    services.segment_create(owner="ok", hosts=[fabric.hosts["brno1"]], gateway=False)  # cesnet reaches prague
