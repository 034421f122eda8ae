"""Driver specs from the inventory: the plain values a driver needs to reach one device (no ORM beyond
this point). The switch password is decrypted here, in the process that opens the session, and nowhere
else."""

from __future__ import annotations

from django.conf import settings

from network.drivers import HostSpec, SwitchSpec
from network.models import Host, Switch


def switch_spec(switch: Switch) -> SwitchSpec:
    """The spec of ``switch`` with every port the portal owns on it."""
    return SwitchSpec(
        name=switch.name,
        platform=switch.platform,
        address=switch.address,
        username=switch.username,
        password=str(switch.password or ""),
        driver_args=dict(switch.driver_args or {}),
        owned_ports=tuple(sorted(switch.ports.values_list("name", flat=True))),
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
