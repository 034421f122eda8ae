"""``lab up`` points the inventory at a lab and ``lab down`` points it back (``network.lab.inventory``):
both ways are in the audit log. No lab is built: a stand-in has the lab's addresses and saves its state."""

from __future__ import annotations

import pytest

from network.lab.inventory import point_inventory_at, restore_inventory
from network.tests.factories import HostFactory
from portal.audit import audit_actor
from portal.models import AuditEntry

pytestmark = pytest.mark.django_db


class StandInLab:
    """What ``point_inventory_at`` and ``restore_inventory`` use of a ``network.lab.Lab``."""

    def __init__(self, switches, hosts):
        self.state = {"switches": {name: {} for name in switches}, "hosts": {name: {} for name in hosts}}
        self.saved = 0

    def switch_db(self, switch: str) -> str:
        return f"unix:/run/lab/{switch}.sock"

    def switch_driver_args(self, switch: str) -> dict:
        return {"bridge": f"br-{switch}"}

    def host_driver_args(self, host: str) -> dict:
        return {"db": "unix:/run/lab/db.sock", "bridge": f"br-{host}"}

    def save(self) -> None:
        self.saved += 1


def changes_of(obj) -> list[dict]:
    entries = AuditEntry.objects.filter(content_type__model=obj._meta.model_name, object_id=str(obj.pk))
    return [entry.changes for entry in entries.filter(action="update", actor="lab").order_by("id")]


def test_lab_down_restores_the_inventory_and_the_audit_log_shows_it():
    host = HostFactory(name="brno-h1", driver_args={"db": "unix:/run/openvswitch/db.sock"})
    switch = host.switch_port.switch
    address, switch_args = switch.address, switch.driver_args
    lab = StandInLab([switch.name], [host.name])
    with audit_actor("lab"):
        point_inventory_at(lab)
        switch.refresh_from_db()
        assert switch.address == f"unix:/run/lab/{switch.name}.sock"
        restore_inventory(lab)
    switch.refresh_from_db()
    host.refresh_from_db()
    assert (switch.address, switch.driver_args) == (address, switch_args)
    assert host.driver_args == {"db": "unix:/run/openvswitch/db.sock"}
    lab_address = f"unix:/run/lab/{switch.name}.sock"
    assert changes_of(switch) == [
        {"address": [address, lab_address], "driver_args": [switch_args, {"bridge": f"br-{switch.name}"}]},
        {"address": [lab_address, address], "driver_args": [{"bridge": f"br-{switch.name}"}, switch_args]},
    ]
    assert [change["driver_args"][1] for change in changes_of(host)] == [
        {"db": "unix:/run/lab/db.sock", "bridge": "br-brno-h1"},
        {"db": "unix:/run/openvswitch/db.sock"},
    ]
    assert "inventory_backup" not in lab.state and lab.saved == 2
