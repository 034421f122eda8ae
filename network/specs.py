"""Driver specs from the inventory: the plain values a driver needs to reach one device (no ORM beyond
this point). The switch password is decrypted here, in the process that opens the session, and nowhere
else."""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings

from network.drivers import HostSpec, SwitchSpec
from network.models import Host, Switch


def switch_spec(switch: Switch, *, owned_ports: Iterable[str] | None = None) -> SwitchSpec:
    """The spec of ``switch`` with every port the portal owns on it (``owned_ports`` when the caller has
    just read them, e.g. as the keys of the switch's desired state; otherwise read here)."""
    if owned_ports is None:
        owned_ports = switch.ports.values_list("name", flat=True)
    return SwitchSpec(
        name=switch.name,
        platform=switch.platform,
        address=switch.address,
        username=switch.username,
        password=str(switch.password or ""),
        driver_args=dict(switch.driver_args or {}),
        owned_ports=tuple(sorted(owned_ports)),
        timeout=settings.DEVICE_TIMEOUT,
    )


def host_spec(host: Host) -> HostSpec:
    return HostSpec(
        name=host.name,
        driver=host.driver,
        trunk_interface=host.trunk_interface,
        driver_args=dict(host.driver_args or {}),
        timeout=settings.DEVICE_TIMEOUT,
    )
