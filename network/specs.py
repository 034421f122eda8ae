"""Driver specs from the inventory: the plain values a driver needs to reach one device (no ORM beyond
this point). The switch password is decrypted here, in the process that opens the session, and nowhere
else."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from django.conf import settings

from network import vlanranges
from network.drivers import HostSpec, SwitchSpec
from network.models import Host, Switch


def switch_spec(
    switch: Switch,
    *,
    owned_ports: Iterable[str] | None = None,
    port_static_vlans: Mapping[str, frozenset[int]] | None = None,
) -> SwitchSpec:
    """The spec of ``switch`` with every port the portal owns on it and each port's static VLANs (``owned_ports``
    and ``port_static_vlans`` when the caller has just read them, e.g. with the switch's desired state — its
    ``port_statics``; otherwise they are read here)."""
    if owned_ports is None:
        rows = list(switch.ports.values_list("name", "static_vlans"))
        owned_ports = [name for name, _static in rows]
        port_static_vlans = {name: frozenset(vlanranges.parse_static(static)) for name, static in rows if static}
    port_static_vlans = dict(port_static_vlans or {})
    return SwitchSpec(
        name=switch.name,
        platform=switch.platform,
        address=switch.address,
        username=switch.username,
        password=str(switch.password or ""),
        driver_args=dict(switch.driver_args or {}),
        owned_ports=tuple(sorted(owned_ports)),
        timeout=settings.DEVICE_TIMEOUT,
        static_vlans=frozenset(vid for vids in port_static_vlans.values() for vid in vids),
        port_static_vlans=port_static_vlans,
    )


def host_spec(host: Host) -> HostSpec:
    return HostSpec(
        name=host.name,
        driver=host.driver,
        trunk_interface=host.trunk_interface,
        driver_args=dict(host.driver_args or {}),
        timeout=settings.DEVICE_TIMEOUT,
    )
