"""The inventory in the database for a running lab (``network.tests.conftest.lab``): the same sites, core,
switches, ports and hosts as the lab's topology, pointed at the lab's OVSDB, plus a VLAN pool over the core.
Then the portal's own code (``network.specs`` → drivers) converges the lab's devices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from network.models import CoreTransport, Host, Site, Switch, SwitchPort, VlanPool

DEMO = Path(__file__).resolve().parents[1] / "topologies" / "demo.yaml"


def inventory_for(lab, *, pool_ranges: str | None = None) -> dict:
    """Rows for every object of ``lab.topology``; returns {"switches": {name: Switch}, "hosts": {...}, "pool"}."""
    topo = lab.topology
    sites = {name: Site.objects.create(name=name) for name in topo.sites}
    cores = {}
    for c in topo.cores:
        core = CoreTransport.objects.create(
            name=c.name, kind=c.kind, vid_min=c.vid_min, vid_max=c.vid_max, service_tag=c.service_tag
        )
        core.sites.set([sites[s] for s in c.sites])
        cores[c.name] = core
    switches, ports = {}, {}
    for sw in topo.switches:
        switches[sw.name] = Switch.objects.create(
            name=sw.name,
            site=sites[sw.site],
            platform="ovs",
            address=lab.switch_db(sw.name),
            driver_args=lab.switch_driver_args(sw.name),
        )
        for p in sw.ports:
            ports[(sw.name, p.name)] = SwitchPort.objects.create(
                switch=switches[sw.name], name=p.name, role=p.role, core=cores.get(p.core) if p.core else None
            )
    hosts = {
        h.name: Host.objects.create(
            name=h.name,
            site=sites[h.site],
            switch_port=ports[(h.switch, h.port)],
            trunk_interface=h.trunk_interface,
            driver="ovs",
            driver_args=lab.host_driver_args(h.name),
        )
        for h in topo.hosts
    }
    core = topo.cores[0]
    pool = VlanPool.objects.create(
        name="lab", core=cores[core.name], ranges=pool_ranges or f"{core.vid_min}-{core.vid_max}", quarantine_seconds=5
    )
    return {"switches": switches, "hosts": hosts, "pool": pool, "sites": sites}


@contextlib.contextmanager
def demo_lab(source: str) -> Iterator:
    """The demo topology (three sites, an access-gateway trunk at Brno) imported into the database, built as
    a netns lab that the inventory points at, and a user-provided image (so clusters are closed); the lab
    is taken down at the end, also when pointing the inventory at it failed. Skips without the lab."""
    import pytest
    import yaml

    from clusters.models import Image
    from network.lab import Lab, requirements, topology
    from network.lab.inventory import point_inventory_at
    from network.topology import topology_import

    reason = requirements()
    if reason:
        pytest.skip(f"netns lab unavailable: {reason}")
    topology_import(data=yaml.safe_load(DEMO.read_text()), source=source)
    Image.objects.create(name="my-own", approved=False)
    lab = Lab.up(topology.from_db())
    try:
        point_inventory_at(lab)
        yield lab
    finally:
        lab.down()
