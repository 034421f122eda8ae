"""What the lab builds: sites, core transports, site switches with their owned ports, hosts.

A topology comes from the inventory in the database (``from_db``), from a dict / JSON or YAML file
(``from_dict`` / ``load``; the same shape as ``as_dict``), or from ``generate`` for tests and benchmarks::

    {"sites": ["a", "b"],
     "cores": [{"name": "core", "kind": "qinq", "sites": ["a", "b"], "vid_min": 100, "vid_max": 199,
                "service_tag": 1000}],
     "switches": [{"name": "sw-a", "site": "a", "ports": [
         {"name": "p-h1", "role": "host_trunk"}, {"name": "up", "role": "core_uplink", "core": "core"},
         {"name": "gw", "role": "gateway_trunk"}]}, ...],
     "hosts": [{"name": "h-a1", "site": "a", "switch": "sw-a", "port": "p-h1", "driver": "ovs"}, ...]}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


class TopologyError(ValueError):
    """The topology cannot be built (names an object and what is wrong with it)."""


@dataclass
class Core:
    name: str
    kind: str  # qinq, dot1q, vpls, xponder, vxlan (the last three are emulated as a plain 802.1Q core)
    sites: list[str]
    vid_min: int
    vid_max: int
    service_tag: int | None = None


@dataclass
class Port:
    name: str
    role: str  # host_trunk, core_uplink, gateway_trunk, router_trunk
    core: str | None = None


@dataclass
class Switch:
    name: str
    site: str
    ports: list[Port] = field(default_factory=list)
    platform: str = "ovs"


@dataclass
class Host:
    name: str
    site: str
    switch: str
    port: str
    driver: str = "ovs"
    trunk_interface: str = "eth0"


@dataclass
class Topology:
    sites: list[str]
    cores: list[Core]
    switches: list[Switch]
    hosts: list[Host]

    def as_dict(self) -> dict:
        return asdict(self)

    def switch(self, name: str) -> Switch:
        for sw in self.switches:
            if sw.name == name:
                return sw
        raise TopologyError(f"no switch {name}")

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise TopologyError(f"no host {name}")

    def core(self, name: str) -> Core:
        for core in self.cores:
            if core.name == name:
                return core
        raise TopologyError(f"no core {name}")

    def validate(self) -> Topology:
        sites = set(self.sites)
        for core in self.cores:
            if set(core.sites) - sites:
                raise TopologyError(f"core {core.name}: unknown sites {sorted(set(core.sites) - sites)}")
            if not 1 <= core.vid_min <= core.vid_max <= 4094:
                raise TopologyError(f"core {core.name}: bad VLAN range {core.vid_min}-{core.vid_max}")
            if core.kind == "qinq" and not (core.service_tag and 1 <= core.service_tag <= 4094):
                raise TopologyError(f"core {core.name}: a QinQ core needs a service tag in 1-4094")
        cores = {c.name: c for c in self.cores}
        for sw in self.switches:
            if sw.site not in sites:
                raise TopologyError(f"switch {sw.name}: unknown site {sw.site}")
            for port in sw.ports:
                if port.role == "core_uplink" and port.core not in cores:
                    raise TopologyError(f"port {sw.name}:{port.name}: unknown core {port.core}")
                if port.role == "core_uplink" and sw.site not in cores[port.core].sites:
                    raise TopologyError(f"port {sw.name}:{port.name}: core {port.core} does not join {sw.site}")
        used = set()
        for host in self.hosts:
            sw = self.switch(host.switch)
            if host.port not in {p.name for p in sw.ports if p.role == "host_trunk"}:
                raise TopologyError(f"host {host.name}: {host.switch} has no host trunk {host.port}")
            if (host.switch, host.port) in used:
                raise TopologyError(f"host {host.name}: port {host.switch}:{host.port} already has a host")
            used.add((host.switch, host.port))
        return self


def _pick(cls, data: dict) -> dict:
    """The keys ``cls`` knows (a portal topology file carries more: addresses, pools, queues …)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _core(data: dict) -> Core:
    data = dict(data)
    if "vlans" in data and "vid_min" not in data:  # the portal's topology files write "100-1999"
        lo, _, hi = str(data["vlans"]).partition("-")
        data["vid_min"], data["vid_max"] = int(lo), int(hi or lo)
    return Core(**_pick(Core, data))


def _entries(data: dict, key: str) -> list[dict]:
    """``data[key]``, a list of mappings (a file with a string or a list where a mapping belongs says which)."""
    value = data.get(key) or []
    if not isinstance(value, list):
        raise TopologyError(f"bad topology: {key} must be a list, not {type(value).__name__}")
    for index, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise TopologyError(f"bad topology: {key}[{index}] must be a mapping, not {entry!r}")
    return value


def _sites(data: dict) -> list:
    if "sites" not in data:
        raise TopologyError("bad topology: no sites")
    if not isinstance(data["sites"], list):
        raise TopologyError(f"bad topology: sites must be a list, not {type(data['sites']).__name__}")
    return data["sites"]


def from_dict(data: dict) -> Topology:
    """A lab topology, or a portal topology file (``network/topologies/*.yaml``: extra keys are ignored)."""
    if not isinstance(data, dict):
        raise TopologyError(
            f"bad topology: the file must hold a mapping (sites, cores, switches, hosts), not {type(data).__name__}"
        )
    try:
        return Topology(
            sites=[site["name"] if isinstance(site, dict) else str(site) for site in _sites(data)],
            cores=[_core(c) for c in _entries(data, "cores")],
            switches=[
                Switch(
                    **_pick(
                        Switch,
                        {**s, "ports": [Port(**_pick(Port, p)) for p in _entries(s, "ports")]},
                    )
                )
                for s in _entries(data, "switches")
            ],
            hosts=[Host(**_pick(Host, h)) for h in _entries(data, "hosts")],
        ).validate()
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, TopologyError):
            raise
        raise TopologyError(f"bad topology: {exc!r}") from None


def load(path: str | Path) -> Topology:
    """A topology file, JSON or YAML (by extension); one that cannot be read or parsed is a ``TopologyError``."""
    import yaml

    try:
        text = Path(path).read_text()
        data = yaml.safe_load(text) if str(path).endswith((".yaml", ".yml")) else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise TopologyError(f"cannot read the topology {path}: {exc}") from None
    except RecursionError:
        raise TopologyError(f"cannot read the topology {path}: nested too deeply") from None
    return from_dict(data)


def generate(
    sites: int = 3, hosts_per_site: int = 2, core_kind: str = "qinq", vid_min: int = 100, vid_max: int = 199
) -> Topology:
    """``sites`` sites joined by one core, a switch per site with a trunk per host, an uplink and a gateway
    trunk at the first site, ``hosts_per_site`` OVS hosts per site."""
    names = [f"s{i + 1}" for i in range(sites)]
    core = Core("core", core_kind, names, vid_min, vid_max, 1000 if core_kind == "qinq" else None)
    switches, hosts = [], []
    for i, site in enumerate(names):
        ports = [Port(f"p-h{j + 1}", "host_trunk") for j in range(hosts_per_site)]
        ports.append(Port("up", "core_uplink", "core"))
        if i == 0:
            ports.append(Port("gw", "gateway_trunk"))
        switches.append(Switch(f"sw-{site}", site, ports))
        hosts += [Host(f"h-{site}-{j + 1}", site, f"sw-{site}", f"p-h{j + 1}") for j in range(hosts_per_site)]
    return Topology(names, [core], switches, hosts).validate()


def from_db() -> Topology:
    """The inventory in the database: enabled switches and hosts, every core transport."""
    from network.models import CoreTransport, Site
    from network.models import Host as HostModel
    from network.models import Switch as SwitchModel

    cores = [
        Core(c.name, c.kind, sorted(s.name for s in c.sites.all()), c.vid_min, c.vid_max, c.service_tag)
        for c in CoreTransport.objects.prefetch_related("sites")
    ]
    switches = [
        Switch(
            sw.name,
            sw.site.name,
            [Port(p.name, p.role, p.core.name if p.core_id else None) for p in sw.ports.all()],
            sw.platform,
        )
        for sw in SwitchModel.objects.filter(enabled=True).select_related("site").prefetch_related("ports__core")
    ]
    enabled = {sw.name for sw in switches}
    hosts = [
        Host(h.name, h.site.name, h.switch_port.switch.name, h.switch_port.name, h.driver, h.trunk_interface)
        for h in HostModel.objects.filter(enabled=True).select_related("site", "switch_port__switch")
        if h.switch_port.switch.name in enabled
    ]
    return Topology(sorted(Site.objects.values_list("name", flat=True)), cores, switches, hosts).validate()
