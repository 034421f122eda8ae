"""Lab fixtures: one running netns lab per test session (3 sites × 2 hosts, QinQ core), plus small OVS test
bridges in the same OVSDB for the driver tests. Tests that use them are marked ``lab`` and skip, saying why,
where the lab cannot run (no root, no Open vSwitch)."""

from __future__ import annotations

import itertools

import pytest

from network.lab import Lab, requirements, topology

_counter = itertools.count()


def _require_lab():
    reason = requirements()
    if reason:
        pytest.skip(f"netns lab unavailable: {reason}")


@pytest.fixture(scope="session")
def lab():
    """The session's lab: sites s1..s3, switches sw-s1..sw-s3 (ports p-h1, p-h2, up, and gw on sw-s1),
    hosts h-s<i>-<j>, a QinQ core (S-VLAN 1000) carrying 100-199."""
    _require_lab()
    lab = Lab.up(topology.generate(sites=3, hosts_per_site=2, core_kind="qinq"))
    yield lab
    lab.down()


@pytest.fixture
def clean_lab(lab):
    """The session lab, with every VM detached and every VLAN removed again after the test."""
    yield lab
    for vm in lab.vms():
        lab.detach_vm(vm.name)
    lab.converge({})


@pytest.fixture
def ovs_bridge(lab):
    """A fresh OVS bridge in the lab's OVSDB standing in for a switch: ports Ethernet1, Ethernet2 (owned,
    empty trunks) and an unowned ``mgmt`` port (access VLAN 7, plus an external_id an operator set).
    Returns (spec kwargs, {inventory name: OVS name})."""
    n = next(_counter)
    bridge = f"{lab.prefix}t{n}"
    names = {"Ethernet1": f"{bridge}a", "Ethernet2": f"{bridge}b", "mgmt": f"{bridge}m"}
    commands = [["add-br", bridge], ["set", "Bridge", bridge, "datapath_type=netdev"]]
    for ovs in names.values():
        commands += [["add-port", bridge, ovs], ["set", "Interface", ovs, "type=internal"]]
    commands += [
        ["set", "Port", names["Ethernet1"], "vlan_mode=trunk", "trunks=4095"],
        ["set", "Port", names["Ethernet2"], "vlan_mode=trunk", "trunks=4095"],
        ["set", "Port", names["mgmt"], "tag=7", "external_ids:owner=noc"],
    ]
    lab.ovsdb().run(*commands)
    yield {"bridge": bridge, "port_map": names, "db": lab.db}
    lab.ovsdb().run(["--if-exists", "del-br", bridge])
