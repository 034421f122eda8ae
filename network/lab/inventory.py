"""Point the inventory in the database at a running lab, and back.

``manage.py lab up`` (built from the database) writes, for every switch it built, ``Switch.address`` = the
lab's OVSDB socket and ``Switch.driver_args`` = ``{"bridge", "port_map"}``, and for every host
``Host.driver_args`` = ``{"db", "bridge", "uplink"}``, so the portal's own convergence code
(``network.specs`` → ``switch_session`` / ``host_session``) drives the lab's switches and hosts. The values
replaced are kept in the lab's state file and written back by ``lab down``.
"""

from __future__ import annotations

from django.db import transaction

from network.lab.fabric import Lab
from network.models import Host, Switch


@transaction.atomic
def point_inventory_at(lab: Lab) -> list[str]:
    """Write the lab's addresses into the inventory; returns warnings (e.g. a platform the lab cannot be)."""
    backup = {"switches": {}, "hosts": {}}
    warnings = []
    for switch in Switch.objects.select_for_update().filter(name__in=lab.state["switches"]):
        backup["switches"][switch.name] = {"address": switch.address, "driver_args": switch.driver_args}
        if switch.platform != "ovs":
            warnings.append(f"switch {switch.name} is platform {switch.platform}: the lab built it as Open vSwitch")
        switch.address = lab.switch_db(switch.name)
        switch.driver_args = lab.switch_driver_args(switch.name)
        switch.save(update_fields=["address", "driver_args"])
    for host in Host.objects.select_for_update().filter(name__in=lab.state["hosts"]):
        backup["hosts"][host.name] = {"driver_args": host.driver_args}
        if host.driver != "ovs":
            warnings.append(f"host {host.name} uses driver {host.driver}: the lab built it as an OVS host")
        host.driver_args = lab.host_driver_args(host.name)
        host.save(update_fields=["driver_args"])
    lab.state["inventory_backup"] = backup
    lab.save()
    return warnings


@transaction.atomic
def restore_inventory(lab: Lab) -> None:
    """Write back what ``point_inventory_at`` replaced. Saved one object at a time, as it was written, so
    that the audit log shows the way back as well as the way there (a queryset ``update()`` sends no signal)."""
    backup = lab.state.get("inventory_backup")
    if not backup:
        return
    for model, saved in ((Switch, backup["switches"]), (Host, backup["hosts"])):
        for device in model.objects.select_for_update().filter(name__in=saved):
            for name, value in saved[device.name].items():
                setattr(device, name, value)
            device.save(update_fields=list(saved[device.name]))
    lab.state.pop("inventory_backup")
    lab.save()
