"""Validation rules of the inventory, each with a message that names the object and the problem."""

import pytest
from django.core.exceptions import ValidationError

from network.choices import CoreKind, HostDriver, PortRole
from network.models import CoreTransport, Host, Segment, Site, Switch, SwitchPort, VlanPool
from network.tests.factories import (
    CoreTransportFactory,
    HostFactory,
    SiteFactory,
    SwitchFactory,
    SwitchPortFactory,
    VlanPoolFactory,
)

pytestmark = pytest.mark.django_db


def messages(obj) -> dict[str, list[str]]:
    with pytest.raises(ValidationError) as info:
        obj.full_clean()
    return info.value.message_dict


def test_factories_build_a_valid_fabric():
    host = HostFactory()
    pool = VlanPoolFactory()
    for obj in (host.site, host.switch_port.switch, host.switch_port, host, pool.core, pool):
        obj.full_clean()
    assert host.switch_port.switch.site == host.site
    assert host.agent_queue == f"host.{host.name}"


@pytest.mark.parametrize("field,value", [("vid_min", 1), ("vid_max", 4095), ("vid_min", 0)])
def test_core_vlan_ids_must_be_2_to_4094(field, value):
    core = CoreTransportFactory.build(name="backbone", **{field: value})
    errors = messages(core)
    assert errors[field] == [f"core backbone: VLAN id {value} is outside 2-4094"]


def test_core_range_must_not_run_backwards():
    core = CoreTransportFactory.build(name="backbone", vid_min=3000, vid_max=2000)
    assert messages(core)["vid_max"] == ["core backbone: highest VLAN id 2000 is below lowest 3000"]


def test_qinq_core_needs_its_service_tag():
    core = CoreTransportFactory.build(name="backbone", service_tag=None)
    assert messages(core)["service_tag"] == ["core backbone: a QinQ core needs its S-VLAN (service tag)"]


def test_qinq_service_tag_is_a_vlan_id():
    core = CoreTransportFactory.build(name="backbone", service_tag=5000)
    assert messages(core)["service_tag"] == ["core backbone: a QinQ S-VLAN must be in 2-4094"]


def test_other_core_kinds_need_no_service_tag():
    CoreTransportFactory.build(name="lambda", kind=CoreKind.XPONDER, service_tag=None).full_clean()


def test_core_cannot_shrink_below_its_pools():
    core = CoreTransportFactory(name="backbone", vid_min=100, vid_max=3999)
    VlanPoolFactory(name="clusters", core=core, ranges="100-199,3000-3010")
    core.vid_max = 2999
    assert messages(core)["vid_min"] == ["core backbone: pool clusters uses ids 3000-3010 outside 100-2999"]


def test_pool_must_stay_inside_what_the_core_carries():
    core = CoreTransportFactory(name="backbone", vid_min=100, vid_max=999)
    pool = VlanPoolFactory.build(name="clusters", core=core, ranges="900-1100")
    assert messages(pool)["ranges"] == ["pool clusters: ids 1000-1100 are outside what core backbone carries (100-999)"]


def test_pools_on_one_core_must_not_overlap():
    core = CoreTransportFactory(name="backbone")
    VlanPoolFactory(name="physics", core=core, ranges="100-199")
    pool = VlanPoolFactory.build(name="chemistry", core=core, ranges="150-250")
    assert messages(pool)["ranges"] == ["pool chemistry: ids 150-199 overlap pool physics on core backbone"]


def test_an_id_a_shrunk_pool_still_holds_is_still_its_own():
    """A pool shrunk while one of its ids was given out keeps holding it until it is released: another pool
    on its core (or meeting it at a site) may not hand it out, nor a port at its sites carry it as a static
    VLAN, nor a switch there keep it for itself — the two owners would share one VLAN."""
    from network import services
    from network.models import SwitchPort, VlanAllocation

    site = SiteFactory(name="brno")
    core = CoreTransportFactory(name="backbone", sites=[site], vid_min=2, vid_max=4094)
    physics = VlanPoolFactory(name="physics", core=core, ranges="100-199")
    services.vlan_pool_sync(pool=physics)
    VlanAllocation.objects.filter(pool=physics, vid=150).update(state="allocated", owner="cluster:1")
    physics.ranges = "100-149"
    physics.full_clean()
    physics.save()
    services.vlan_pool_sync(pool=physics)
    assert VlanAllocation.objects.filter(pool=physics, vid=150, state="allocated").exists()
    pool = VlanPoolFactory.build(name="chemistry", core=core, ranges="150-199")
    assert messages(pool)["ranges"] == ["pool chemistry: ids 150 overlap pool physics on core backbone"]
    elsewhere = CoreTransportFactory(name="other", sites=[site], vid_min=2, vid_max=4094)
    pool = VlanPoolFactory.build(name="chemistry", core=elsewhere, ranges="150-199")
    assert "pool chemistry: ids 150 overlap pool physics of core backbone" in messages(pool)["ranges"][0]
    port = SwitchPort(switch=SwitchFactory(name="sw", site=site), name="h9", role="host_trunk", static_vlans="150")
    assert "static VLAN 150 is handed out by pool physics" in messages(port)["static_vlans"][0]
    # from the core's side too: it may not stop carrying the id, nor join a site where a port carries it
    core.vid_max = 149
    assert "core backbone: pool physics uses ids 150 outside 2-149" in messages(core)["vid_min"][0]
    core.refresh_from_db()
    ostrava = SiteFactory(name="ostrava")
    SwitchPort.objects.create(
        switch=SwitchFactory(name="sw-o", site=ostrava), name="h1", role="host_trunk", static_vlans="150"
    )
    assert any("150 are static VLANs of port sw-o:h1" in m for m in physics.static_clashes([ostrava]))
    VlanAllocation.objects.filter(pool=physics, vid=150).update(state="free", owner="")  # released: free to go
    VlanPoolFactory.build(name="chemistry", core=core, ranges="150-199").full_clean()
    assert physics.static_clashes([ostrava]) == []


def test_a_host_and_a_pool_live_clusters_use_keep_where_they_are():
    """A host that a live segment spans keeps its site and switch port (moved, its cluster's VLAN would reach
    it through a switch its core may not join, and stay on the port it left); a pool with ids given out keeps
    its core (another may not join their sites). Both move once the cluster has ended."""
    from network import services
    from network.models import SwitchPort

    host = HostFactory()
    services.vlan_pool_sync(pool=VlanPoolFactory(core=CoreTransportFactory(name="backbone", sites=[host.site])))
    segment = services.segment_create(owner="cluster:1", hosts=[host], gateway=False)
    other_port = SwitchPort.objects.create(switch=host.switch_port.switch, name="h9", role="host_trunk")
    host.switch_port = other_port
    assert f"host {host.name} is in the VLANs {segment.vid} of live clusters" in messages(host)["switch_port"][0]
    host.refresh_from_db()
    host.site = SiteFactory(name="elsewhere")
    assert "of live clusters" in messages(host)["site"][0]
    pool = segment.allocation.pool
    pool.core = CoreTransportFactory(name="another", sites=[host.switch_port.switch.site])
    assert messages(pool)["core"] == [
        f"pool {pool.name}: its ids {segment.vid} are given to clusters or in quarantine: it keeps its core until "
        "they are free"
    ]
    Segment.objects.filter(pk=segment.pk).update(state=Segment.State.CLOSED)  # (torn down)
    services.vlan_release(allocation=segment.allocation)
    host.refresh_from_db()
    host.switch_port = other_port
    host.full_clean()
    assert "in quarantine" in messages(pool)["core"][0]  # (its hold-down: maybe still on the old core's devices)
    from datetime import timedelta

    from django.utils import timezone

    over = timezone.now() - timedelta(seconds=1)  # its quarantine over (the row stays quarantined: free to go)
    segment.allocation.__class__.objects.filter(pk=segment.allocation_id).update(
        quarantine_until=over, released_at=over - timedelta(days=1)
    )
    pool.full_clean()


def test_pools_on_different_cores_may_overlap():
    VlanPoolFactory(name="a", ranges="100-199")
    VlanPoolFactory.build(name="b", core=CoreTransportFactory(), ranges="100-199").full_clean()


def test_a_pool_leaves_out_the_ids_a_switch_on_its_core_keeps_for_itself():
    """IOS keeps 1002-1005 and NX-OS 3968-4094: a pool whose core reaches such a switch must reserve them
    (a cluster given one would fail on that switch)."""
    site = SiteFactory(name="brno")
    core = CoreTransportFactory(name="backbone", sites=[site], vid_min=2, vid_max=4094)
    SwitchFactory(name="cat1", site=site, platform="ios")
    pool = VlanPoolFactory.build(name="clusters", core=core, ranges="1000-1010")
    assert messages(pool)["ranges"] == [
        "pool clusters: ids 1002-1005 are reserved on ios (cat1): add them to the pool's reserved ids"
    ]
    VlanPoolFactory.build(name="clusters", core=core, ranges="1000-1010", reserved="1002-1005").full_clean()
    VlanPoolFactory.build(name="clusters", core=CoreTransportFactory(), ranges="1000-1010").full_clean()  # no IOS


def test_reserved_ids_must_be_in_the_pool():
    pool = VlanPoolFactory.build(name="clusters", ranges="100-199", reserved="150,300-301")
    assert messages(pool)["reserved"] == ["pool clusters: reserved ids 300-301 are not in its ranges"]


@pytest.mark.parametrize(
    "ranges,expected",
    [
        ("100-abc", "pool clusters: pool clusters ranges: '100-abc' is not a VLAN id or a range like 100-199"),
        ("200-100", "pool clusters: pool clusters ranges: range '200-100' runs backwards"),
        ("1-10", "pool clusters: pool clusters ranges: VLAN id 1 is outside 2-4094"),
        ("4000-4095", "pool clusters: pool clusters ranges: VLAN id 4095 is outside 2-4094"),
    ],
)
def test_pool_ranges_are_parsed_strictly(ranges, expected):
    pool = VlanPoolFactory.build(name="clusters", ranges=ranges)
    assert messages(pool)["ranges"] == [expected]


def test_pool_vlan_ids_leave_out_reserved():
    pool = VlanPoolFactory.build(ranges="100-104", reserved="101,103")
    assert pool.vlan_ids == [100, 102, 104]


def test_host_port_must_be_a_host_trunk():
    site = SiteFactory(name="brno")
    port = SwitchPortFactory(switch=SwitchFactory(name="brno-sw", site=site), name="gw", role=PortRole.GATEWAY_TRUNK)
    host = Host(name="brno-h1", site=site, switch_port=port)
    assert messages(host)["switch_port"] == [
        "host brno-h1: port brno-sw:gw is a trunk to an access gateway, not a host trunk"
    ]


def test_host_port_must_be_at_the_hosts_site():
    port = SwitchPortFactory(switch=SwitchFactory(name="pilsen-sw", site=SiteFactory(name="pilsen")), name="h1")
    host = Host(name="brno-h1", site=SiteFactory(name="brno"), switch_port=port)
    assert messages(host)["switch_port"] == [
        "host brno-h1: port pilsen-sw:h1 is on switch pilsen-sw at site pilsen, but the host is at site brno"
    ]


def test_a_linux_bridge_host_needs_its_agent_or_a_lab_namespace():
    """The Linux-bridge host driver configures the network stack it runs in: without an agent queue (an agent
    on the host) the central or site worker would build the bridges on its own machine and report success."""
    port = SwitchPortFactory(switch=SwitchFactory(name="brno-sw", site=SiteFactory(name="brno")), name="h1")
    host = Host(name="brno-h1", site=port.switch.site, switch_port=port, driver=HostDriver.LINUXBRIDGE)
    assert messages(host)["agent_queue"] == [
        "host brno-h1: a Linux-bridge host is configured by an agent running on it: give the queue that agent "
        "consumes (or driver_args.netns for a lab host in a network namespace of the worker's machine)"
    ]
    host.agent_queue = "host.brno-h1"
    host.full_clean()
    host.agent_queue, host.driver_args = "", {"netns": "vclab-h1"}
    host.full_clean()
    Host(name="brno-h2", site=port.switch.site, switch_port=port, driver=HostDriver.OVS).full_clean(
        exclude=["switch_port"]
    )  # OVS: OVSDB over ssh or a local socket, reached from the worker


def test_static_vlans_of_a_port_are_never_ids_a_pool_at_its_site_hands_out():
    """A cluster given a port's static VLAN would share the host's own network: refused on both sides — the
    port naming a pool's id, and a pool (or its core joining a site) handing out a port's static VLAN."""
    site = SiteFactory(name="brno")
    core = CoreTransportFactory(name="cesnet", sites=[site])
    VlanPoolFactory(name="wan", core=core, ranges="100-199", reserved="150")
    port = SwitchPortFactory(switch=SwitchFactory(name="brno-sw", site=site), name="h1")
    port.static_vlans = "300,140-141"
    assert messages(port)["static_vlans"] == [
        "port brno-sw:h1: static VLAN 140-141 is handed out by pool wan (core cesnet) at site brno: reserve it in "
        "the pool, or pick another id"
    ]
    port.static_vlans = "300,150"  # the pool's reserved id is never handed out
    port.full_clean()
    port.save()
    assert port.static_vids == {150, 300}
    port.static_vlans = "300,x"
    assert messages(port)["static_vlans"] == [
        "port brno-sw:h1: static VLANs: 'x' is not a VLAN id or a range like 100-199"
    ]
    # VLAN 1, a trunk's default native VLAN, may be kept (no pool hands it out); 0 is no VLAN
    port.static_vlans = "1,300"
    port.full_clean()
    port.save()
    assert port.static_vids == {1, 300}
    port.static_vlans = "0"
    assert messages(port)["static_vlans"] == ["port brno-sw:h1: static VLANs: VLAN id 0 is outside 1-4094"]
    port.static_vlans = "300,150"
    port.save()

    other = VlanPoolFactory.build(name="more", core=core, ranges="290-310")
    assert messages(other)["ranges"] == [
        "pool more: ids 300 are static VLANs of port brno-sw:h1: add them to the pool's reserved ids"
    ]
    VlanPoolFactory.build(name="more", core=core, ranges="290-310", reserved="300").full_clean()
    elsewhere = CoreTransportFactory(name="metro", sites=[SiteFactory(name="praha")])
    pool = VlanPoolFactory(name="metro-pool", core=elsewhere, ranges="250-350")
    assert pool.static_clashes([site]) == [
        "pool metro-pool: ids 300 are static VLANs of port brno-sw:h1: add them to the pool's reserved ids"
    ]


def test_a_switch_moving_to_another_site_takes_its_ports_static_vlans_past_the_pools_there():
    """The port's own check, for a switch that moves (the admin's switch form): a pool at the new site must not
    hand out a static VLAN of one of its ports."""
    brno, praha = SiteFactory(name="brno"), SiteFactory(name="praha")
    CoreTransportFactory(name="cesnet", sites=[brno])
    metro = CoreTransportFactory(name="metro", sites=[praha])
    VlanPoolFactory(name="metro-pool", core=metro, ranges="250-350")
    switch = SwitchFactory(name="brno-sw", site=brno)
    SwitchPortFactory(switch=switch, name="gw", role=PortRole.GATEWAY_TRUNK, static_vlans="300")
    switch.site = praha
    assert messages(switch)["site"] == [
        "switch brno-sw: port gw: static VLAN 300 is handed out by pool metro-pool (core metro) at site praha: "
        "reserve it in the pool, or pick another id, before the switch moves there"
    ]
    VlanPool.objects.filter(name="metro-pool").update(reserved="300")
    switch.full_clean()


def test_a_static_vlan_the_platform_reserves_is_refused_on_the_port_and_on_a_platform_change():
    """IOS keeps 1002-1005, NX-OS 3968-4094: a port carrying one as a static VLAN had every converge of its switch
    refused ("reserved on ios")."""
    switch = SwitchFactory(name="sw-ios", platform="ios")
    port = SwitchPortFactory.build(switch=switch, name="gw", role=PortRole.GATEWAY_TRUNK, static_vlans="10,1002")
    assert messages(port)["static_vlans"] == [
        "port sw-ios:gw: static VLAN 1002 is reserved on ios: a port cannot carry it"
    ]
    nexus = SwitchFactory(name="sw-nx", platform="eos")
    SwitchPortFactory(switch=nexus, name="gw", role=PortRole.GATEWAY_TRUNK, static_vlans="4000")
    nexus.platform = "nxos"
    assert messages(nexus)["platform"] == ["switch sw-nx: port gw: static VLAN 4000 reserved on nxos"]


@pytest.mark.parametrize("name_format", ["grid", "vc", "x{vid!s:.1}"])
def test_a_vlan_name_format_that_names_two_vlans_alike_is_refused(name_format):
    """Without {vid} every VLAN got one name: Junos renumbered that one VLAN over and over, IOS and NX-OS got
    duplicate names."""
    switch = SwitchFactory.build(name="sw", platform="junos", driver_args={"vlan_name_format": name_format})
    assert "alike" in " ".join(messages(switch)["driver_args"]) or "only {vid}" in " ".join(
        messages(switch)["driver_args"]
    )


def test_a_switch_spec_knows_each_ports_own_static_vlans():
    """What the Linux-bridge session counts as carried untagged on a port: that port's static VLANs, read with the
    desired state (``switch_desired``'s ``port_statics``) or by the spec itself."""
    from network import selectors, specs

    switch = SwitchFactory(name="sw", platform="linuxbridge")
    SwitchPortFactory(switch=switch, name="uplink", role=PortRole.GATEWAY_TRUNK, static_vlans="10")
    SwitchPortFactory(switch=switch, name="p-h1", role=PortRole.HOST_TRUNK)
    spec = specs.switch_spec(switch)
    assert spec.port_static_vlans == {"uplink": frozenset({10})} and spec.static_vlans == frozenset({10})
    assert spec.port_static("p-h1") == frozenset() and spec.port_static("uplink") == frozenset({10})
    per_port: dict = {}
    selectors.switch_desired([switch.pk], port_statics=per_port)
    assert per_port == {switch.pk: {"uplink": frozenset({10})}}


def test_one_host_per_port():
    existing = HostFactory(name="brno-h1")
    other = Host(name="brno-h2", site=existing.site, switch_port=existing.switch_port)
    assert messages(other)["switch_port"] == ["host brno-h2: Host with this Switch port already exists."]


def test_core_uplink_must_name_its_core():
    port = SwitchPortFactory.build(switch=SwitchFactory(name="sw"), name="up", role=PortRole.CORE_UPLINK)
    assert messages(port)["core"] == ["port sw:up: a core uplink must name its core transport"]


def test_core_uplink_needs_a_core_that_joins_its_site():
    brno, pilsen, vienna = SiteFactory(name="brno"), SiteFactory(name="pilsen"), SiteFactory(name="vienna")
    core = CoreTransportFactory(name="backbone", sites=[brno, pilsen])
    port = SwitchPortFactory.build(
        switch=SwitchFactory(name="vienna-sw", site=vienna), name="up", role=PortRole.CORE_UPLINK, core=core
    )
    assert messages(port)["core"] == ["port vienna-sw:up: core backbone does not join site vienna"]
    port.switch = SwitchFactory(name="brno-sw", site=brno)
    port.full_clean()


def test_only_a_core_uplink_names_a_core():
    port = SwitchPortFactory.build(switch=SwitchFactory(name="sw"), name="h1", core=CoreTransportFactory())
    assert messages(port)["core"] == ["port sw:h1: only a core uplink names a core transport"]


def test_port_names_are_unique_per_switch():
    port = SwitchPortFactory(switch=SwitchFactory(name="sw"), name="eth1")
    twin = SwitchPort(switch=port.switch, name="eth1", role=PortRole.HOST_TRUNK)
    errors = messages(twin)
    assert errors["__all__"] == ["port sw:eth1: Switch port with this Switch and Name already exists."]
    SwitchPort(switch=SwitchFactory(name="sw2"), name="eth1", role=PortRole.HOST_TRUNK).full_clean()


def test_switch_driver_args_must_not_carry_the_password():
    switch = SwitchFactory.build(name="sw", site=SiteFactory(), driver_args={"secret": "enable-pw"})
    assert messages(switch)["driver_args"] == ["switch sw: put the secret in the password field (stored encrypted)"]


def test_switch_driver_args_must_be_a_mapping():
    switch = SwitchFactory.build(name="sw", site=SiteFactory(), driver_args=["port", 22])
    assert messages(switch)["driver_args"] == ["switch sw: driver args must be a mapping"]


def test_names_are_lower_case_slugs_and_unique():
    SiteFactory(name="brno")
    errors = messages(Site(name="brno"))
    assert errors["name"] == ["site brno: Site with this Name already exists."]
    errors = messages(Site(name="Brno Centre"))
    assert errors["name"][0].startswith("site Brno Centre: ")


def test_unknown_choice_names_the_object():
    core = CoreTransportFactory.build(name="backbone", kind="warp")
    assert messages(core)["kind"] == ["core backbone: Value 'warp' is not a valid choice."]


def test_password_is_stored_encrypted_and_read_back():
    from django.db import connection

    switch = SwitchFactory(password="s3cret-switch-pw")
    with connection.cursor() as cursor:
        cursor.execute("SELECT password FROM network_switch WHERE id = %s", [switch.pk])
        stored = cursor.fetchone()[0]
    assert "s3cret" not in stored and stored.startswith("gAAAA")  # a Fernet token
    loaded = type(switch).objects.get(pk=switch.pk)
    assert loaded.password == "s3cret-switch-pw"
    assert "s3cret" not in repr(loaded.password)


def test_every_model_has_a_docstring_about_the_network():
    for model in (Site, CoreTransport, Switch, SwitchPort, Host, VlanPool):
        assert model.__doc__ and len(model.__doc__) > 60


def test_pools_of_cores_meeting_at_a_site_must_not_overlap(db):
    from django.core.exceptions import ValidationError

    from network.tests.factories import CoreTransportFactory, SiteFactory, VlanPoolFactory

    brno, pilsen, prague = SiteFactory(name="brno"), SiteFactory(name="pilsen"), SiteFactory(name="prague")
    north = CoreTransportFactory(name="north", sites=[brno, pilsen])
    south = CoreTransportFactory(name="south", sites=[pilsen, prague])
    island = CoreTransportFactory(name="island", sites=[SiteFactory(name="island")])
    VlanPoolFactory(name="a", core=north, ranges="100-199")
    with pytest.raises(ValidationError) as err:
        VlanPoolFactory.build(name="b", core=south, ranges="150-250").full_clean()
    assert "pool b: ids 150-199 overlap pool a of core north, which meets core south at a common site" in str(err.value)
    VlanPoolFactory.build(name="c", core=south, ranges="200-250").full_clean()
    VlanPoolFactory.build(name="d", core=island, ranges="100-199").full_clean()  # no common site: fine


# --- what a change of the inventory may not leave behind ---------------------------------------------------------


@pytest.mark.parametrize(
    "driver_args,named",
    [
        ({"transport": "ssh", "ssh_host": "-oProxyCommand=touch /tmp/x"}, "ssh host '-oProxyCommand=touch /tmp/x'"),
        ({"transport": "ssh", "ssh_host": "ovs1", "ssh_user": "-F/tmp/x"}, "ssh user '-F/tmp/x' starts with '-'"),
        ({"transport": "ssh", "ssh_host": "ovs1", "ssh_options": ["ProxyCommand=sh"]}, "option 'ProxyCommand'"),
    ],
)
def test_ssh_driver_args_must_not_run_commands_on_the_worker(driver_args, named):
    """An admin chooses the box ssh goes to, never a command the worker runs (network.drivers.sshargs)."""
    switch = SwitchFactory.build(name="sw", site=SiteFactory(), driver_args=driver_args)
    assert len(messages(switch)["driver_args"]) == 1 and named in messages(switch)["driver_args"][0]
    assert messages(switch)["driver_args"][0].startswith("switch sw: ")
    host = HostFactory.build(name="h1", driver_args=driver_args, switch_port=HostFactory().switch_port)
    assert messages(host)["driver_args"][0].startswith("host h1: ") and named in messages(host)["driver_args"][0]
    ok = {"transport": "ssh", "ssh_host": "ovs1", "ssh_options": ["Port=2222", "StrictHostKeyChecking=yes"]}
    SwitchFactory.build(name="sw", site=SiteFactory(), driver_args=ok).full_clean()


def test_a_linux_bridge_switch_over_ssh_has_a_harmless_address_and_user():
    """That driver's ssh destination is the switch's address and user name."""
    args = {"transport": "ssh", "bridge": "br0"}
    switch = SwitchFactory.build(name="lb", site=SiteFactory(), platform="linuxbridge", address="-oProxyCommand=x")
    switch.driver_args = args
    assert "ssh host '-oProxyCommand=x' starts with '-'" in messages(switch)["driver_args"][0]
    switch.address, switch.username = "lb.example.org", "net ops"
    assert "ssh user 'net ops' contains whitespace" in messages(switch)["driver_args"][0]
    switch.username = "netops"
    switch.full_clean()


def test_a_switch_that_keeps_ids_for_itself_is_not_added_where_a_pool_hands_them_out():
    """The reverse of the pool's check: an NX-OS switch at a site a core reaches, whose pool hands out
    3968-4094 (or an IOS one with 1002-1005), would fail every cluster given one of those ids."""
    site = SiteFactory(name="brno")
    core = CoreTransportFactory(name="backbone", sites=[site], vid_min=2, vid_max=4094)
    VlanPoolFactory(name="clusters", core=core, ranges="1000-1010,3960-3999")
    nexus = SwitchFactory.build(name="nx1", site=site, platform="nxos")
    assert messages(nexus)["platform"] == [
        "switch nx1: pool clusters hands out ids 3968-3999, which are reserved on nxos: add them to the pool's "
        "reserved ids first"
    ]
    catalyst = SwitchFactory(name="cat1", site=site, platform="ovs")
    catalyst.platform = "ios"  # a change of platform is checked the same way
    assert "pool clusters hands out ids 1002-1005" in messages(catalyst)["platform"][0]
    VlanPool.objects.filter(name="clusters").update(reserved="1002-1005,3968-3999")
    nexus.full_clean()
    catalyst.full_clean()
    SwitchFactory.build(name="nx2", site=SiteFactory(name="elsewhere"), platform="nxos").full_clean()  # no core


def test_a_switch_does_not_move_away_from_its_hosts_and_uplinks():
    brno, pilsen = SiteFactory(name="brno"), SiteFactory(name="pilsen")
    host = HostFactory(name="brno-h1", site=brno, switch_port__switch__name="brno-sw")
    switch = host.switch_port.switch
    switch.site = pilsen
    assert messages(switch)["site"] == [
        "switch brno-sw: on its ports: host brno-h1; move or delete them before the switch leaves its site"
    ]
    host.delete()
    core = CoreTransportFactory(name="backbone", sites=[brno, pilsen])
    SwitchPortFactory(switch=switch, name="up", role=PortRole.CORE_UPLINK, core=core)
    assert "on its ports: core uplink up (core backbone);" in messages(switch)["site"][0]
    SwitchPort.objects.filter(name="up").delete()
    switch.full_clean()  # nothing on its ports: it may move


def test_a_hosts_port_does_not_move_to_a_switch_at_another_site():
    """The switch moving away from its hosts is refused (above); the host's port moved to a switch at another site
    was not: the host stayed at its site with its trunk elsewhere (its clusters' VLANs from a core picked for the
    wrong site, configured on a switch that core may not reach)."""
    brno, pilsen = SiteFactory(name="brno"), SiteFactory(name="pilsen")
    host = HostFactory(name="brno-h1", site=brno, switch_port__switch__name="brno-sw", switch_port__switch__site=brno)
    port = host.switch_port
    port.switch = SwitchFactory(name="pilsen-sw", site=pilsen)
    assert messages(port)["switch"] == [
        f"port {port}: host brno-h1 at site brno hangs on it; switch pilsen-sw is at site pilsen (move the host first)"
    ]
    port.switch = SwitchFactory(name="brno-sw2", site=brno)  # another switch at the host's site: fine
    port.full_clean()


def test_a_port_that_carries_a_live_vlan_keeps_its_name():
    """Renamed, the device's old port would keep the VLAN for ever (as if deleted: the same check)."""
    from network import services

    host = HostFactory(name="brno-h1", switch_port__name="h1", switch_port__switch__name="brno-sw")
    VlanPoolFactory(name="clusters", core=CoreTransportFactory(name="backbone", sites=[host.site]), ranges="100-109")
    port = host.switch_port
    port.name = "h1-renamed"
    port.full_clean()  # nothing carried yet
    segment = services.segment_create(owner="cluster:1", hosts=[host], gateway=False)
    assert messages(port)["name"] == [
        f"port brno-sw:h1-renamed: brno-sw:h1 carries VLAN {segment.vid} of live clusters (or of ended ones still "
        "holding it): tear them down, or let their cleanup finish, before changing its name"
    ]
    port.name = "h1"
    port.description = "still the same port"
    port.full_clean()


def test_a_port_carrying_live_vlans_keeps_its_role_and_core_and_its_switch_its_site_and_device():
    """A port's role and core, and its switch's site, decide which VLANs it carries: changed while it carries a
    live cluster's, the next converge (or the reconciler's repair) would take them off — the cluster cut in two.
    Nor may the switch's ``bridge``/``port_map`` name another device then: the old one keeps the VLANs. All of
    it may change once nothing live is carried."""
    from network import services

    brno, pilsen = SiteFactory(name="brno"), SiteFactory(name="pilsen")
    core = CoreTransportFactory(name="backbone", sites=[brno, pilsen])
    other = CoreTransportFactory(name="other", sites=[brno, pilsen])
    VlanPoolFactory(name="clusters", core=core, ranges="100-109")
    a = HostFactory(name="brno-h1", site=brno, switch_port__switch__name="brno-sw", switch_port__switch__site=brno)
    b = HostFactory(name="pilsen-h1", site=pilsen, switch_port__switch__site=pilsen)
    switch = a.switch_port.switch
    uplink = SwitchPortFactory(switch=switch, name="up", role=PortRole.CORE_UPLINK, core=core)
    gateway = SwitchPortFactory(switch=switch, name="gw", role=PortRole.GATEWAY_TRUNK)
    segment = services.segment_create(owner="cluster:1", hosts=[a, b], gateway=True)

    uplink.core = other
    assert messages(uplink)["core"] == [
        f"port brno-sw:up: brno-sw:up carries VLAN {segment.vid} of live clusters (or of ended ones still holding "
        "it): tear them down, or let their cleanup finish, before changing its core"
    ]
    gateway.role = PortRole.ROUTER_TRUNK
    assert "before changing its role" in messages(gateway)["role"][0]
    switch.driver_args = {"bridge": "br-other"}
    assert "bridge name which device it is" in messages(switch)["driver_args"][0]
    switch.refresh_from_db()
    switch.site = SiteFactory(name="ostrava")
    assert f"port gw carries VLAN {segment.vid} of live clusters" in messages(switch)["site"][0]

    services.segment_delete(segment=segment)
    Segment.objects.filter(pk=segment.pk).update(state=Segment.State.CLOSED)
    segment.allocation.refresh_from_db()
    services.vlan_release(allocation=segment.allocation)
    uplink, gateway = (SwitchPort.objects.get(pk=port.pk) for port in (uplink, gateway))
    uplink.core, gateway.role = other, PortRole.ROUTER_TRUNK
    uplink.full_clean()
    gateway.full_clean()


def test_a_host_in_live_vlans_keeps_what_says_which_device_it_is():
    """Its trunk interface, driver, name (an agent's database role is granted by it) and the driver args that
    name its bridge, uplink, OVSDB or namespace: changed while live clusters use it, the old bridges and
    sub-interfaces stay (a Linux-bridge teardown took the old trunk's sub-interface for a VM port and never
    ended). Its credentials, say, may change."""
    from network import services

    host = HostFactory(name="brno-h1", trunk_interface="eth0", driver="ovs", driver_args={"uplink": "eth0"})
    services.vlan_pool_sync(pool=VlanPoolFactory(core=CoreTransportFactory(name="backbone", sites=[host.site])))
    segment = services.segment_create(owner="cluster:1", hosts=[host], gateway=False)
    for field, value in (("trunk_interface", "bond0"), ("name", "brno-h9"), ("driver", "linuxbridge")):
        setattr(host, field, value)
        message = messages(host)[field][0]
        assert f"VLANs {segment.vid} of live clusters, or of failed or closed ones" in message
        assert f"before changing its {field}" in message
        host.refresh_from_db()
    host.driver_args = {"uplink": "bond0"}
    assert "before changing its driver_args" in messages(host)["driver_args"][0]
    host.driver_args = {"uplink": "eth0", "ssh_user": "virtcloud"}
    host.full_clean()


def test_a_host_a_failed_cluster_may_have_left_its_vlan_on_keeps_what_says_which_device_it_is():
    """A rollback that could not clean a device leaves the segment FAILED, holding its VLAN (its members gone):
    the host one of its changes may have applied on still keeps its trunk interface and driver until the next
    run cleans it (renamed to bond0, the old eth0.300 read as a VM port, the rollback kept failing for good; a new
    driver saw nothing and released the VLAN the old bridge carried). Released, it may change."""
    from network import convergence, services
    from network.models import DeviceChange, Segment, SegmentMember

    host = HostFactory(name="brno-h1", trunk_interface="eth0", driver="ovs", driver_args={"uplink": "eth0"})
    services.vlan_pool_sync(pool=VlanPoolFactory(core=CoreTransportFactory(name="backbone", sites=[host.site])))
    segment = services.segment_create(owner="cluster:1", hosts=[host], gateway=False)
    change = convergence.change_create(device=host, segment=segment, cause="provision cluster:1")
    DeviceChange.objects.filter(pk=change.pk).update(status="ok", started_at=change.created_at)
    SegmentMember.objects.filter(segment=segment).delete()
    Segment.objects.filter(pk=segment.pk).update(state=Segment.State.FAILED)
    host.trunk_interface = "bond0"
    assert f"VLANs {segment.vid} of live clusters, or of failed" in messages(host)["trunk_interface"][0]
    segment.allocation.refresh_from_db()
    services.vlan_release(allocation=segment.allocation)
    host.full_clean()


def test_driver_args_with_a_nul_are_a_clear_refusal_not_a_database_error():
    switch = SwitchFactory(platform="ovs")
    switch.driver_args = {"bridge": "br\x00"}
    assert "must not hold a NUL character" in messages(switch)["driver_args"][0]
    host = HostFactory()
    host.driver_args = {"options": ["a", {"k\x00": 1}]}
    assert "must not hold a NUL character" in messages(host)["driver_args"][0]


def nested(depth: int):
    value: list | int = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"port": float("nan")}, "must not hold NaN or an infinity"),
        ({"timeout": float("inf")}, "must not hold NaN or an infinity"),
        ({"bridge": "br\ud800"}, "must not hold a lone surrogate"),
        ({"a": nested(20)}, "must not nest more than 16 levels deep"),
    ],
)
def test_driver_args_jsonb_refuses_are_a_clear_refusal_not_a_database_error(args, message):
    """PostgreSQL's jsonb refuses NaN and infinities (Django's JSON form field and YAML's ``.inf`` give them) and
    lone surrogates: the switch's and the host's own message, never a 500 at save."""
    switch = SwitchFactory(platform="ovs")
    switch.driver_args = args
    assert f"switch {switch.name}: driver args {message}" in messages(switch)["driver_args"][0]
    host = HostFactory()
    host.driver_args = args
    assert message in messages(host)["driver_args"][0]


@pytest.mark.django_db
def test_a_vlan_name_format_that_would_write_more_than_a_name_is_refused_on_the_switch():
    from network.tests.factories import SwitchFactory

    switch = SwitchFactory(platform="ios")
    switch.driver_args = {"vlan_name_format": "vc-{vid}\nno spanning-tree"}
    with pytest.raises(ValidationError) as refused:
        switch.full_clean()
    assert "vlan_name_format" in str(refused.value.message_dict["driver_args"])
    switch.driver_args = {"vlan_name_format": "abcdefghijklmnopqrstuvwxyzabcd-{vid}"}  # 32 for VLAN 1, 35 for 4094
    with pytest.raises(ValidationError):
        switch.full_clean()
    switch.driver_args = {"vlan_name_format": "grid{vid:04d}"}
    switch.full_clean()
    # a width is applied before the name is checked: a huge one is refused before it takes the memory
    for huge in ("{vid:>99999999999999}", "{vid:>2000000000}", "x" * 65 + "{vid}"):
        switch.driver_args = {"vlan_name_format": huge}
        with pytest.raises(ValidationError, match="widths of at most 32"):
            switch.full_clean()
