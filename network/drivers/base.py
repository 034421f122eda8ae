"""Driver interface used by the rest of the portal.

A switch is made to carry a *desired state*: for every port the portal owns, the exact set of VLAN ids
tagged on it. The session renders that state in the platform's configuration language, loads it as a merge
candidate (NAPALM ``load_merge_candidate``), diffs it (``compare_config``), commits it, verifies it with
``get_vlans`` and rolls back if verification fails. Ports not in the desired mapping are never touched.

A hypervisor host is made to carry a set of VLANs (one attachment point per VLAN for the VM manager); a
VLAN's attachment point is removed only when no VM port is left on it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol


class DeviceError(Exception):
    """A device operation failed. ``permanent`` tells the caller whether retrying can help."""

    permanent = True

    def __init__(self, device: str, message: str, *, may_have_applied: bool = False):
        super().__init__(f"{device}: {message}")
        self.device = device
        self.message = message
        # raised after the device took (part of) the change and it could not be undone: the device may carry
        # what was asked, though the operation failed
        self.may_have_applied = may_have_applied


class TemporaryDeviceError(DeviceError):
    """Timeout, unreachable, configuration database locked: retry with backoff."""

    permanent = False


class PermanentDeviceError(DeviceError):
    """Rejected configuration, authentication failure, unknown port, failed verification: do not retry."""

    permanent = True


class VlansRefused(PermanentDeviceError):
    """A host refused some of its VLANs (``refused``: VLAN id → why, e.g. the host's own network) and converged
    the rest (``result``): only the changes of the refused VLANs' segments fail — one cluster's VLAN clashing
    with the host's own network never fails another cluster's work on that host."""

    def __init__(self, device: str, refused: dict[int, str], result: ConvergeResult):
        super().__init__(device, self.describe(refused))
        self.refused = dict(refused)
        self.result = result

    @staticmethod
    def describe(refused: Mapping[int, str]) -> str:
        """Why each VLAN of ``refused`` was, in VLAN order."""
        return "; ".join(refused[vid] for vid in sorted(refused))


@dataclass(frozen=True)
class SwitchSpec:
    """What a driver needs to reach and change one switch (built from ``network.Switch``)."""

    name: str
    platform: str  # ios, eos, junos, nxos, nxos_ssh, ovs, linuxbridge
    address: str
    username: str = ""
    password: str = field(default="", repr=False)
    driver_args: Mapping = field(default_factory=dict)
    owned_ports: tuple[str, ...] = ()  # the only ports a session may change
    timeout: float = 30.0
    static_vlans: frozenset[int] = frozenset()  # the operator's VLANs on owned ports: carried, never created
    # each owned port's own static VLANs (empty: unknown, ``static_vlans`` stands for every port)
    port_static_vlans: Mapping[str, frozenset[int]] = field(default_factory=dict)

    def port_static(self, port: str) -> frozenset[int]:
        """The static VLANs of owned port ``port``: its own when the spec has them, else the switch's."""
        if self.port_static_vlans:
            return self.port_static_vlans.get(port, frozenset())
        return self.static_vlans


@dataclass(frozen=True)
class HostSpec:
    """What a driver needs to configure one hypervisor (built from ``network.Host``)."""

    name: str
    driver: str  # ovs, linuxbridge
    trunk_interface: str
    driver_args: Mapping = field(default_factory=dict)
    timeout: float = 30.0


@dataclass(frozen=True)
class Attachment:
    """Where the VM manager (libvirt, XAPI) plugs a VM's interface for one VLAN on one host, known without
    asking the host: the bridge, the 802.1Q tag the VM's port gets (None: the bridge carries only this VLAN),
    and the libvirt ``virtualport`` type (``openvswitch`` for OVS bridges). ``bridge`` is None when only the
    host knows it (an OVS host whose bridge is found from its uplink): ``ovs-vsctl port-to-br <uplink>``."""

    bridge: str | None
    vlan: int | None
    virtualport: str | None = None
    uplink: str = ""
    mtu: int | None = None  # the VLAN's core's MTU when below the default (``CoreTransport.mtu``)


@dataclass
class ConvergeResult:
    """The outcome of making a device match its desired state."""

    device: str
    diff: str  # the device's own diff ("" when nothing changed)
    changed: bool  # a commit happened
    before: dict[str, frozenset[int]]  # port (or host) -> VLANs before
    after: dict[str, frozenset[int]]  # port (or host) -> VLANs after (verified)


class SwitchSession(Protocol):
    def port_vlans(self) -> dict[str, frozenset[int]]:
        """Current tagged VLANs of every owned port (from the device, via ``get_vlans``)."""

    def render(self, desired: Mapping[str, frozenset[int]]) -> str:
        """The platform configuration text that makes owned ports carry exactly ``desired``."""

    def plan(self, desired: Mapping[str, frozenset[int]]) -> str:
        """The diff a converge would apply; nothing is committed (dry run)."""

    def converge(self, desired: Mapping[str, frozenset[int]]) -> ConvergeResult:
        """Load → compare → commit (only if the diff is non-empty) → verify → rollback on failed verify."""


class HostSession(Protocol):
    def vlans(self) -> frozenset[int]:
        """VLANs the host currently carries (has an attachment point for)."""

    def converge(self, desired: frozenset[int]) -> ConvergeResult:
        """Add missing VLAN attachment points, remove unneeded ones that have no VM port left."""

    def attachment_point(self, vid: int) -> str:
        """Where the VM manager plugs a VM of VLAN ``vid`` (bridge name, or OVS bridge + tag)."""


_SWITCH_DRIVERS = {
    "ovs": "network.drivers.ovs",
    "linuxbridge": "network.drivers.linuxbridge",
    "ios": "network.drivers.vendor",
    "eos": "network.drivers.vendor",
    "junos": "network.drivers.vendor",
    "nxos": "network.drivers.vendor",
    "nxos_ssh": "network.drivers.vendor",
}
_HOST_DRIVERS = {
    "ovs": "network.drivers.ovs_host",
    "linuxbridge": "network.drivers.linuxbridge_host",
}


@contextlib.contextmanager
def switch_session(spec: SwitchSpec) -> Iterator[SwitchSession]:
    """Open a session to ``spec`` (module ``open_switch(spec)``), close it whatever happens."""
    module = _simulated(spec) or _load(_SWITCH_DRIVERS, spec.platform, spec.name)
    with module.open_switch(spec) as session:
        yield session


@contextlib.contextmanager
def host_session(spec: HostSpec) -> Iterator[HostSession]:
    module = _simulated(spec) or _load(_HOST_DRIVERS, spec.driver, spec.name)
    with module.open_host(spec) as session:
        yield session


def host_attachment(spec: HostSpec, vid: int) -> Attachment:
    """Where a VM of VLAN ``vid`` is plugged on the host of ``spec`` (module ``attachment(spec, vid)``; no
    device is contacted)."""
    module = _simulated(spec) or _load(_HOST_DRIVERS, spec.driver, spec.name)
    return module.attachment(spec, int(vid))


def preload() -> list[str]:
    """Import every driver module of the portal (the OVS, Linux-bridge and NAPALM vendor drivers; NAPALM's
    own platform drivers load when first used), as a worker does once at start. Returns their names."""
    names = sorted(set(_SWITCH_DRIVERS.values()) | set(_HOST_DRIVERS.values()))
    for name in names:
        importlib.import_module(name)
    return names


def _simulated(spec):
    """``driver_args: {simulated: true, state_dir: …}`` puts a device on the simulated fabric (a demo
    without root), whatever its platform."""
    if spec.driver_args.get("simulated"):
        return importlib.import_module("network.drivers.simulated")
    return None


def _load(table: dict[str, str], name: str, device: str):
    try:
        return importlib.import_module(table[name])
    except KeyError:
        raise PermanentDeviceError(device, f"no driver for platform {name!r}") from None
