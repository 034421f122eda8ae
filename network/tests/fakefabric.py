"""A small inventory on the fake drivers (``network.tests.fakes``), shared by the life-cycle tests.

Three sites (brno, pilsen, prague), one switch each with two host trunks and an uplink into one QinQ
core joining the three sites; a gateway trunk on the brno switch; two hosts per site; a pool 100-199.
Import the fixture: ``from network.tests.fakefabric import fabric_fixture  # noqa: F401``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from network.choices import PortRole
from network.models import Host, Switch, VlanPool
from network.tests import fakes
from network.tests.factories import (
    CoreTransportFactory,
    HostFactory,
    SiteFactory,
    SwitchFactory,
    SwitchPortFactory,
    VlanPoolFactory,
)

SITES = ("brno", "pilsen", "prague")


@dataclass
class Fabric:
    state_dir: str
    sites: dict = field(default_factory=dict)
    switches: dict[str, Switch] = field(default_factory=dict)
    hosts: dict[str, Host] = field(default_factory=dict)
    pool: VlanPool | None = None
    core: object = None

    @property
    def args(self) -> dict:
        """The driver arguments of every device of the fabric."""
        return {"state_dir": self.state_dir}

    def switch_state(self, name: str) -> dict:
        return fakes.load(self.args, "switch", name)

    def switch_ports(self, name: str) -> dict[str, frozenset[int]]:
        """What the fake switch carries now (every port it knows)."""
        return {p: frozenset(v) for p, v in self.switch_state(name)["ports"].items()}

    def host_vlans(self, name: str) -> frozenset[int]:
        return frozenset(fakes.load(self.args, "host", name)["vlans"])

    def set_switch_args(self, name: str, **args) -> None:
        switch = Switch.objects.get(name=name)
        switch.driver_args = {**self.args, **args}
        switch.save(update_fields=["driver_args"])

    def break_host_vlan(self, name: str, vid: int) -> None:
        """Cut a host's VLAN off its bridge behind the portal's back (a NIC reset took its VLAN interface)."""
        state = fakes.load(self.args, "host", name)
        state["broken"] = sorted({*state.get("broken", ()), vid})
        fakes.save(self.args, "host", name, state)

    def poke_switch(self, name: str, port: str, vids) -> None:
        """Change a port by hand, behind the portal's back."""
        state = self.switch_state(name)
        state["ports"][port] = sorted(vids)
        fakes.save(self.args, "switch", name, state)


def build_fabric(state_dir: str, *, pool_ranges: str = "100-199") -> Fabric:
    fakes.register()
    fab = Fabric(state_dir=str(state_dir))
    args = fab.args
    for name in SITES:
        fab.sites[name] = SiteFactory(name=name)
    fab.core = CoreTransportFactory(name="cesnet", sites=list(fab.sites.values()))
    for name, site in fab.sites.items():
        switch = SwitchFactory(name=f"sw-{name}", site=site, platform="fake", driver_args=args)
        fab.switches[name] = switch
        SwitchPortFactory(switch=switch, name="uplink", role=PortRole.CORE_UPLINK, core=fab.core)
        for i in (1, 2):
            port = SwitchPortFactory(switch=switch, name=f"h{i}", role=PortRole.HOST_TRUNK)
            host = HostFactory(
                name=f"{name}{i}", site=site, switch_port=port, driver="fake", driver_args=args, agent_queue=""
            )
            fab.hosts[host.name] = host
    SwitchPortFactory(switch=fab.switches["brno"], name="gw", role=PortRole.GATEWAY_TRUNK)
    fab.pool = VlanPoolFactory(name="wan", core=fab.core, ranges=pool_ranges, quarantine_seconds=60)
    return fab


@pytest.fixture(name="fabric")
def fabric_fixture(db, tmp_path):
    return build_fabric(tmp_path / "devices")
