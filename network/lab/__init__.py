"""The lab: the inventory built as a running fabric in network namespaces (Open vSwitch userspace datapath).

Entry points: ``Lab.up(topology)`` / ``lab.down()``, ``attach_vm`` / ``detach_vm`` (what a VM manager does),
``ping``, ``arping``, ``capture`` (tcpdump) and ``iperf`` for checks, ``topology.from_db()`` /
``topology.load(file)`` / ``topology.generate(...)`` for what to build. See ``fabric`` for names and layout.
"""

from network.lab.checks import Capture, arping, broadcast, capture, iperf, ping, ping_many
from network.lab.fabric import Lab, LabError, Vm, all_labs, clean_stale, requirements
from network.lab.topology import Topology, TopologyError


def attach_vm(lab: Lab, host: str, vid: int, name: str, ip_cidr: str, mac: str | None = None) -> Vm:
    """A VM namespace whose eth0 is an access port of VLAN ``vid`` on ``host``'s bridge."""
    return lab.attach_vm(host, vid, name, ip_cidr, mac)


def detach_vm(lab: Lab, name: str) -> None:
    lab.detach_vm(name)


__all__ = [
    "Capture",
    "Lab",
    "LabError",
    "Topology",
    "TopologyError",
    "Vm",
    "all_labs",
    "arping",
    "attach_vm",
    "broadcast",
    "capture",
    "clean_stale",
    "detach_vm",
    "iperf",
    "ping",
    "ping_many",
    "requirements",
]
