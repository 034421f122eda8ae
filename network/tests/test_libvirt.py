"""The libvirt ``<interface>`` a VM manager gets for a node, per host driver (no device is contacted)."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from network.drivers import HostSpec, host_attachment
from network.libvirt import interface_xml


def test_an_ovs_host_gives_a_tagged_openvswitch_port():
    found = host_attachment(HostSpec("h", "ovs", "eth0", {"bridge": "xenbr0"}), 120)
    assert (found.bridge, found.vlan, found.virtualport, found.uplink) == ("xenbr0", 120, "openvswitch", "eth0")
    iface = ET.fromstring(interface_xml(found, "52:54:00:AA:00:01"))
    assert iface.tag == "interface" and iface.get("type") == "bridge"
    assert iface.find("mac").get("address") == "52:54:00:aa:00:01"
    assert iface.find("source").get("bridge") == "xenbr0"
    assert iface.find("vlan/tag").get("id") == "120"
    assert iface.find("virtualport").get("type") == "openvswitch"
    assert iface.find("model").get("type") == "virtio"


def test_a_linux_bridge_host_gives_the_vlans_own_bridge_untagged():
    found = host_attachment(HostSpec("h", "linuxbridge", "eth1"), 7)
    assert (found.bridge, found.vlan, found.virtualport) == ("br-v7", None, None)
    iface = ET.fromstring(interface_xml(found, "52:54:00:00:00:02"))
    assert iface.find("source").get("bridge") == "br-v7"
    assert iface.find("vlan") is None and iface.find("virtualport") is None


def test_an_ovs_host_whose_bridge_only_it_knows_names_its_uplink():
    found = host_attachment(HostSpec("h", "ovs", "eth0", {"uplink": "bond0"}), 9)
    assert found.bridge is None and found.uplink == "bond0" and found.vlan == 9
    assert interface_xml(found, "52:54:00:00:00:03") is None


def test_a_core_with_a_smaller_mtu_gives_the_vm_that_mtu():
    """On a VXLAN core over a 1500-byte underlay a VM must send at most 1450-byte packets: the attachment
    carries the core's MTU and libvirt's ``<mtu>`` gives it to the guest's NIC; without one, no element."""
    from dataclasses import replace

    found = replace(host_attachment(HostSpec("h", "linuxbridge", "eth1"), 7), mtu=1450)
    assert ET.fromstring(interface_xml(found, "52:54:00:00:00:02")).find("mtu").get("size") == "1450"
    plain = host_attachment(HostSpec("h", "linuxbridge", "eth1"), 7)
    assert ET.fromstring(interface_xml(plain, "52:54:00:00:00:02")).find("mtu") is None
