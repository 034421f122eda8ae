"""The lab fabric: site switches, hosts, the core and a gateway attachment point as Open vSwitch bridges
(userspace ``netdev`` datapath, so it runs on a kernel without 802.1Q or the OVS module), and "VMs" as
network namespaces.

One lab run owns:

- a run directory ``$VIRTCLOUD_LAB_DIR/<prefix>/`` (default ``/run/virtcloud-lab``) with ``state.json``, the
  OVSDB file, its socket and the daemons' logs and pid files;
- a namespace ``<prefix>ovs`` where one ovsdb-server and one ovs-vswitchd run and every bridge and every
  switch-side veth end lives (nothing of the lab is in the root namespace) — with ``planes="site"``, each
  site has a control plane of its own instead (see below);
- a namespace ``<prefix>gw`` holding one plain Linux bridge per gateway trunk (``gwbr<n>``), linked by veth
  to the switch's gateway_trunk port: an OpenVPN tap (``vlan-tagging``) or another leg is added there;
- one namespace ``<prefix>vm<n>`` per attached VM, its ``eth0`` a veth whose other end is an access port
  ``tag=<vid>`` on the host's bridge.

Every interface and namespace name starts with the run's prefix (``vl`` + 4 hex digits), so parallel runs
never collide and ``down`` (or the next ``up``, for a crashed run) removes exactly what a run made: daemons
by PID (checked against /proc/<pid>/cmdline), then every namespace with the prefix, then the run directory.

Bridges: one per Switch (``<p>s<i>``), one per Host (``<p>h<j>``, uplink port ``<p>h<j>u``). Switch ports
are ``<p>s<i>p<k>``; the drivers see the inventory's port names through ``driver_args["port_map"]``. Owned
ports start as trunks carrying no VLAN: only the drivers add VLANs. The core is configured once, the way an
operator would: ``dot1q`` (and ``vpls``/``xponder``/``vxlan``, emulated the same way) is a core bridge
``<p>c<n>`` whose ports trunk the core's whole VLAN range; ``qinq`` is a provider-edge bridge per attached
switch (``<p>c<n>e<m>``) with a ``dot1q-tunnel`` customer port (S-VLAN = service tag, 802.1ad) and an
802.1ad trunk to the provider bridge ``<p>c<n>``.

Control planes (``Lab.up(planes=...)``): ``shared`` (the default) runs every bridge in one ovs-vswitchd
over one OVSDB. ovs-vswitchd reconfigures all of its bridges after any change, so one switch's commit costs
CPU in proportion to the whole lab (measured: 0.6 ms in a 1-site lab, 13 ms in a 16-site one), which no
real fabric does. ``site`` gives every site a namespace ``<prefix>o<k>`` with an OVSDB (``db-o<k>.sock``)
and an ovs-vswitchd of its own, holding the site's switch, its hosts and (QinQ) its provider edge, as a real
site's devices have their own CPUs; the core bridges stay in ``<prefix>ovs``. ``device`` goes one step
further, as every real switch and hypervisor has its own control plane: a namespace, OVSDB and
ovs-vswitchd per switch (``<prefix>ds<i>``, ``db-ds<i>.sock``) and per host (``<prefix>dh<j>``), the QinQ
provider edges with the core in ``<prefix>ovs`` (the provider's network). A commit then reconfigures one
bridge (ovs-vswitchd's cost grows with the bridges it holds: measured 0.6 ms per commit for one bridge,
1.4 ms for a site's four, 3 ms for eight). Links between planes are veth pairs across the namespaces. The
drivers cannot tell the difference: only addresses change.

Drivers reach the lab through ``switch_spec`` / ``host_spec`` (or the same values written into the
inventory by ``manage.py lab up``): ``address = unix:<run dir>/db.sock`` (``db-o<k>.sock`` for site ``k``
with ``planes="site"``, ``db-ds<i>.sock`` for switch ``i`` with ``planes="device"``) and driver args
``bridge`` + ``port_map`` for a switch, ``db`` + ``bridge`` + ``uplink`` for a host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from network.drivers import HostSpec, SwitchSpec, host_session, switch_session
from network.drivers.ovsdb import NO_VLANS, Ovsdb, trunks_value
from network.lab.topology import Topology, TopologyError, from_dict

RUN_ROOT = Path(os.environ.get("VIRTCLOUD_LAB_DIR", "/run/virtcloud-lab"))
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
DAEMONS = ("ovsdb-server", "ovs-vswitchd")
PLANES = ("shared", "site", "device")
CORE_PLANE = "ovs"  # the only plane of a shared lab; the core's in a per-site one
# Trunks carry up to two tags (8 bytes) on top of a VM's 1500-byte frames; like an operator's "baby giant"
# core MTU, every lab link but a VM's own eth0 is larger, else full-size QinQ frames are dropped on the veth.
TRUNK_MTU = 1600
_NO_IPV6 = "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message names the step and the object."""


def run(argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 30, env=None):
    """Run a command; raise LabError with its stderr when it fails."""
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv[:6])}…: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def ip_batch(lines: Iterable[str], netns: str | None = None) -> None:
    """Many ``ip`` commands in one process (≈3× faster than one process each)."""
    lines = list(lines)
    if lines:
        run(["ip", *(["-n", netns] if netns else []), "-batch", "-"], input="\n".join(lines) + "\n")


def requirements() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces)"
    for tool in ("ip", "ovs-vsctl", "ovsdb-server", "ovs-vswitchd", "ovsdb-tool"):
        if not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]):
            return f"{tool} is not installed (apt-get install openvswitch-switch iproute2)"
    if not SCHEMA.exists():
        return f"{SCHEMA} is missing (apt-get install openvswitch-switch)"
    return None


def _alive(pid: int | None, marker: str) -> bool:
    """Is ``pid`` a live process whose command line contains ``marker`` (guards against PID reuse)?"""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


@dataclass
class Vm:
    """A 'VM': a namespace with eth0 on a host bridge as an access port of one VLAN."""

    name: str
    host: str
    vid: int
    netns: str
    port: str  # the OVS-side veth end
    ip: str  # address/prefix
    mac: str

    @property
    def address(self) -> str:
        return self.ip.split("/")[0]


@dataclass
class Lab:
    """A running lab (the contents of its state file, plus helpers)."""

    run_dir: Path
    state: dict = field(default_factory=dict)

    # --- names ------------------------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.state["name"]

    @property
    def prefix(self) -> str:
        return self.state["prefix"]

    @property
    def ovs_ns(self) -> str:
        return f"{self.prefix}ovs"

    @property
    def gw_ns(self) -> str:
        return f"{self.prefix}gw"

    @property
    def db(self) -> str:
        """The OVSDB of the lab (shared planes) or of its core plane (``planes="site"``)."""
        return self.plane_db(CORE_PLANE)

    def plane_netns(self, plane: str) -> str:
        return f"{self.prefix}{plane}"

    def plane_db(self, plane: str) -> str:
        return f"unix:{self.run_dir / f'db{_suffix(plane)}.sock'}"

    def switch_db(self, switch: str) -> str:
        """The OVSDB address of ``switch`` (what ``Switch.address`` is set to)."""
        return self.plane_db(self._device("switches", switch).get("plane", CORE_PLANE))

    @property
    def topology(self) -> Topology:
        return from_dict(self.state["topology"])

    def ovsdb(self, device: str = "lab") -> Ovsdb:
        return Ovsdb(device=device, db=self.db)

    # --- what the drivers need ----------------------------------------------------------------------------------

    def switch_driver_args(self, switch: str) -> dict:
        dev = self._device("switches", switch)
        return {"bridge": dev["bridge"], "port_map": dict(dev["port_map"])}

    def host_driver_args(self, host: str) -> dict:
        dev = self._device("hosts", host)
        return {"db": self.plane_db(dev.get("plane", CORE_PLANE)), "bridge": dev["bridge"], "uplink": dev["uplink"]}

    def switch_spec(self, switch: str) -> SwitchSpec:
        sw = self.topology.switch(switch)
        return SwitchSpec(
            name=switch,
            platform="ovs",
            address=self.switch_db(switch),
            driver_args=self.switch_driver_args(switch),
            owned_ports=tuple(p.name for p in sw.ports),
            timeout=10.0,
        )

    def host_spec(self, host: str) -> HostSpec:
        h = self.topology.host(host)
        return HostSpec(
            name=host, driver="ovs", trunk_interface=h.trunk_interface, driver_args=self.host_driver_args(host)
        )

    def _device(self, kind: str, name: str) -> dict:
        try:
            return self.state[kind][name]
        except KeyError:
            raise LabError(f"lab {self.name}: no {kind[:-2] if kind == 'switches' else kind[:-1]} {name}") from None

    # --- desired state (the lab's own small version of the portal's computation) ---------------------------------

    def desired(
        self, segments: Mapping[int, Iterable[str]], gateway_vids: Iterable[int] = ()
    ) -> tuple[dict[str, dict[str, frozenset[int]]], dict[str, frozenset[int]]]:
        """For ``{vid: [host names]}``: the VLANs of every owned port of every switch and of every host."""
        topo = self.topology
        switch_d: dict[str, dict[str, set[int]]] = {sw.name: {p.name: set() for p in sw.ports} for sw in topo.switches}
        host_d: dict[str, set[int]] = {h.name: set() for h in topo.hosts}
        gateway_vids = set(gateway_vids)
        for vid, hosts in segments.items():
            members = {topo.host(h).switch for h in hosts}
            for name in hosts:
                h = topo.host(name)
                host_d[name].add(vid)
                switch_d[h.switch][h.port].add(vid)
            if vid in gateway_vids:
                for sw in topo.switches:
                    for port in sw.ports:
                        if port.role == "gateway_trunk":
                            switch_d[sw.name][port.name].add(vid)
                            members.add(sw.name)
            sites = {topo.switch(s).site for s in members}
            if len(sites) < 2:
                continue
            cores = [c for c in topo.cores if c.vid_min <= vid <= c.vid_max and sites <= set(c.sites)]
            if not cores:
                raise TopologyError(f"no core carries VLAN {vid} between sites {sorted(sites)}")
            for s in members:
                for port in topo.switch(s).ports:
                    if port.role == "core_uplink" and port.core == cores[0].name:
                        switch_d[s][port.name].add(vid)
        return (
            {sw: {p: frozenset(v) for p, v in ports.items()} for sw, ports in switch_d.items()},
            {h: frozenset(v) for h, v in host_d.items()},
        )

    def converge(self, segments: Mapping[int, Iterable[str]], gateway_vids: Iterable[int] = ()):
        """Make every switch and host carry ``segments`` through the real drivers (switches first, then hosts,
        devices in parallel). Returns the ConvergeResults."""
        switch_d, host_d = self.desired(segments, gateway_vids)

        def one_switch(name):
            with switch_session(self.switch_spec(name)) as session:
                return session.converge(switch_d[name])

        def one_host(name):
            with host_session(self.host_spec(name)) as session:
                return session.converge(host_d[name])

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one_switch, sorted(switch_d)))
            results += list(pool.map(one_host, sorted(host_d)))
        return results

    # --- VMs ----------------------------------------------------------------------------------------------------

    def attach_vm(self, host: str, vid: int, name: str, ip_cidr: str, mac: str | None = None) -> Vm:
        """What a VM manager does: a namespace for the VM, its eth0 plugged into the host's attachment point of
        VLAN ``vid`` (through the host driver, so the host must already carry ``vid``)."""
        if name in self.state["vms"]:
            raise LabError(f"lab {self.name}: VM {name} exists")
        self._device("hosts", host)
        n = self.state["next_vm"]
        self.state["next_vm"] = n + 1
        netns, port = f"{self.prefix}vm{n}", f"{self.prefix}v{n}"
        mac = mac or f"02:42:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}:{vid >> 8:02x}:{vid & 0xFF:02x}"
        vm = Vm(name, host, vid, netns, port, ip_cidr, mac)
        self.state["vms"][name] = vm.__dict__
        self.save()  # before creating anything: a crash leaves a record down() can follow
        ip_batch([f"netns add {netns}"])
        run(["ip", "netns", "exec", netns, "sh", "-c", _NO_IPV6])
        plane_ns = self.plane_netns(self.state["hosts"][host].get("plane", CORE_PLANE))
        ip_batch([f"link add {port} type veth peer name eth0 netns {netns}", f"link set {port} up"], plane_ns)
        # netdev datapath + veth: the kernel leaves TCP checksums to an offload nobody does (LAB.md §2)
        script = (
            f"ip link set lo up && ip link set eth0 address {mac} && ip addr add {ip_cidr} dev eth0"
            " && ip link set eth0 up && ethtool -K eth0 tx off >/dev/null"
        )
        run(["ip", "netns", "exec", netns, "sh", "-c", script])
        with host_session(self.host_spec(host)) as session:
            session.plug(port, vid)
        return vm

    def detach_vm(self, name: str) -> None:
        vm = self.vm(name)
        with host_session(self.host_spec(vm.host)) as session:
            session.unplug(vm.port)
        run(["ip", "netns", "del", vm.netns], check=False)
        del self.state["vms"][name]
        self.save()

    def vm(self, name: str) -> Vm:
        try:
            return Vm(**self.state["vms"][name])
        except KeyError:
            raise LabError(f"lab {self.name}: no VM {name}") from None

    def vms(self) -> list[Vm]:
        return [Vm(**v) for v in self.state["vms"].values()]

    # --- where to look ------------------------------------------------------------------------------------------

    def core_ports(self, core: str | None = None) -> list[dict]:
        """Links of the core to capture on: {"core", "kind", "netns", "iface", "layer"}; layer ``customer`` is
        a switch uplink (802.1Q), ``provider`` a QinQ provider link (802.1ad outer tag)."""
        return [{"netns": self.ovs_ns, **link} for link in self.state["core_links"] if core in (None, link["core"])]

    def gateway(self, switch: str | None = None) -> dict:
        """{"netns", "bridge", "switch", "port"} of a gateway attachment point (the first one by default)."""
        for gw in self.state["gateways"]:
            if switch in (None, gw["switch"]):
                return dict(gw, netns=self.gw_ns)
        raise LabError(f"lab {self.name}: no gateway trunk" + (f" on {switch}" if switch else ""))

    def locate(self, where: str) -> tuple[str, str]:
        """(netns, interface) of a VM name, a VM namespace, or an interface of a control plane's namespace."""
        if where in self.state["vms"]:
            return self.state["vms"][where]["netns"], "eth0"
        if re.fullmatch(rf"{re.escape(self.prefix)}vm[0-9]+", where):
            return where, "eth0"  # a VM namespace (also one made by hand with the prefix, e.g. a baseline)
        return self.plane_netns(self.state.get("ifaces", {}).get(where, CORE_PLANE)), where

    # --- life cycle ---------------------------------------------------------------------------------------------

    def save(self) -> None:
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        tmp.replace(self.run_dir / "state.json")

    def status(self) -> dict:
        daemons = {d: _alive(pid, str(self.run_dir)) for d, pid in self.state["pids"].items()}
        return {
            "name": self.name,
            "prefix": self.prefix,
            "run_dir": str(self.run_dir),
            "db": self.db,
            "planes": self.state.get("planes", [CORE_PLANE]),
            "status": self.state["status"],
            "daemons": daemons,
            "switches": sorted(self.state["switches"]),
            "hosts": sorted(self.state["hosts"]),
            "vms": sorted(self.state["vms"]),
            "owner_pid": self.state["owner_pid"],
            "persistent": self.state["persistent"],
        }

    def is_stale(self) -> bool:
        """A run whose builder died (non-persistent) or whose daemons are gone: nobody will use it again."""
        if not self.state.get("persistent") and not _alive(self.state.get("owner_pid"), ""):
            return True
        if self.state.get("status") != "up":
            return not _alive(self.state.get("owner_pid"), "")
        pids = self.state.get("pids") or {}
        return not pids or not all(_alive(pid, str(self.run_dir)) for pid in pids.values())

    def down(self) -> float:
        """Kill the daemons by PID, delete every namespace with the prefix, remove the run directory."""
        started = time.monotonic()
        _destroy(self.run_dir, self.prefix, self.state.get("pids", {}))
        return time.monotonic() - started

    @classmethod
    def open(cls, run_dir: Path) -> Lab:
        return cls(run_dir, json.loads((run_dir / "state.json").read_text()))

    @classmethod
    def find(cls, name: str, run_root: Path | None = None) -> Lab | None:
        for lab in all_labs(run_root):
            if lab.name == name:
                return lab
        return None

    @classmethod
    def up(
        cls,
        topology: Topology,
        *,
        name: str | None = None,
        persistent: bool = False,
        run_root: Path | None = None,
        planes: str = "shared",
    ) -> Lab:
        """Build the fabric for ``topology``, with one control plane for all (``planes="shared"``), one per
        site (``"site"``) or one per switch and per host (``"device"``). Cleans crashed runs first; an existing
        lab of the same name is taken down (a name is one lab)."""
        reason = requirements()
        if reason:
            raise LabError(reason)
        if planes not in PLANES:
            raise LabError(f"planes must be one of {', '.join(PLANES)}, not {planes!r}")
        run_root = Path(run_root or RUN_ROOT)
        run_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        clean_stale(run_root)
        if name:
            old = cls.find(name, run_root)
            if old:
                old.down()
        prefix = _new_prefix(run_root)
        run_dir = run_root / prefix
        run_dir.mkdir(mode=0o700)
        lab = cls(
            run_dir,
            {
                "name": name or prefix,
                "prefix": prefix,
                "status": "building",
                "owner_pid": os.getpid(),
                "persistent": persistent,
                "created": time.time(),
                "topology": topology.as_dict(),
                "pids": {},
                "layout": planes,
                "planes": _plane_names(topology, planes),
                "ifaces": {},  # OVS-side interface -> its plane, for those outside the core plane
                "switches": {},
                "hosts": {},
                "vms": {},
                "next_vm": 0,
                "core_links": [],
                "gateways": [],
            },
        )
        lab.save()
        try:
            _build(lab, topology)
        except BaseException:
            lab.down()
            raise
        lab.state["status"] = "up"
        lab.save()
        return lab


def all_labs(run_root: Path | None = None) -> list[Lab]:
    run_root = Path(run_root or RUN_ROOT)
    labs = []
    if run_root.is_dir():
        for state in sorted(run_root.glob("*/state.json")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                labs.append(Lab.open(state.parent))
    return labs


def clean_stale(run_root: Path | None = None) -> list[str]:
    """Tear down every crashed run (see ``Lab.is_stale``); returns their prefixes."""
    cleaned = []
    for lab in all_labs(run_root):
        if lab.is_stale():
            lab.down()
            cleaned.append(lab.prefix)
    return cleaned


def _new_prefix(run_root: Path) -> str:
    existing = set(_netns_list())
    for _ in range(100):
        prefix = "vl" + secrets.token_hex(2)
        if not (run_root / prefix).exists() and not any(_ours(ns, prefix) for ns in existing):
            return prefix
    raise LabError("no free lab prefix")


def _ours(netns: str, prefix: str) -> bool:
    """Exactly the namespace names a run with ``prefix`` creates (other tools' names may share a prefix)."""
    return re.fullmatch(rf"{re.escape(prefix)}(ovs|gw|vm[0-9]+|o[0-9]+|d[sh][0-9]+)", netns) is not None


def _netns_list() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _destroy(run_dir: Path, prefix: str, pids: Mapping[str, int]) -> None:
    # ovs-vswitchd takes seconds to exit cleanly (it deletes every port); the lab's datapath state dies with
    # its namespace anyway, so it is killed outright. Only processes whose command line names this run's
    # directory are signalled.
    found = set(pids.values())
    if run_dir.is_dir():  # a daemon started but not yet recorded in the state file left its pid file
        found |= {_read_pid(path) for path in run_dir.glob("*.pid")}
    for pid in found:
        if _alive(pid, str(run_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    namespaces = [ns for ns in _netns_list() if _ours(ns, prefix)]
    if namespaces:
        run(["ip", "-force", "-batch", "-"], input="".join(f"netns del {ns}\n" for ns in namespaces), check=False)
    if run_dir.is_dir():
        for child in sorted(run_dir.iterdir(), reverse=True):
            with contextlib.suppress(OSError):
                child.unlink()
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _device_planes(topology: Topology, layout: str) -> tuple[list[str], list[str]]:
    """The control plane of each switch and of each host, in the topology's order: the core's (``shared``),
    ``o<k>`` for site k (``site``), or ``ds<i>`` for switch i and ``dh<j>`` for host j (``device``)."""
    if layout == "device":
        return [f"ds{i}" for i in range(len(topology.switches))], [f"dh{j}" for j in range(len(topology.hosts))]
    site = {name: (f"o{k}" if layout == "site" else CORE_PLANE) for k, name in enumerate(topology.sites)}
    return [site[sw.site] for sw in topology.switches], [site[h.site] for h in topology.hosts]


def _plane_names(topology: Topology, layout: str) -> list[str]:
    """Every control plane of a lab: the core's first, then those of its devices."""
    switch_planes, host_planes = _device_planes(topology, layout)
    return list(dict.fromkeys([CORE_PLANE, *switch_planes, *host_planes]))


def _suffix(plane: str) -> str:
    """File-name suffix of a control plane's files (none for the core plane: a shared lab's names)."""
    return "" if plane == CORE_PLANE else f"-{plane}"


def _each(items: list[str], fn: Callable[[str], object]) -> None:
    """``fn`` for every item, up to 8 at a time (each mostly waits on a process it started); the first error
    is raised once all have finished."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        list(pool.map(fn, items))


def _start_daemons(lab: Lab, plane: str, daemon: str, env: dict) -> None:
    d, sfx = lab.run_dir, _suffix(plane)
    files = [f"--pidfile={d / f'{daemon}{sfx}.pid'}", f"--unixctl={d / f'{daemon}{sfx}.ctl'}"]
    files += [f"--log-file={d / f'{daemon}{sfx}.log'}", "--detach", "--no-chdir"]
    if daemon == "ovsdb-server":
        run(["ovsdb-tool", "create", str(d / f"conf{sfx}.db"), str(SCHEMA)])
        argv = [daemon, str(d / f"conf{sfx}.db"), f"--remote=punix:{d / f'db{sfx}.sock'}"]
    else:
        argv = [daemon, lab.plane_db(plane)]
    run(["ip", "netns", "exec", lab.plane_netns(plane), *argv, *files], env=env)
    lab.state["pids"][daemon if plane == CORE_PLANE else f"{daemon}@{plane}"] = _read_pid(d / f"{daemon}{sfx}.pid")


def _build(lab: Lab, topo: Topology) -> None:
    p, d = lab.prefix, lab.run_dir
    gw_ns = lab.gw_ns
    planes: list[str] = lab.state["planes"]
    layout = lab.state["layout"]
    switch_planes, host_planes = _device_planes(topo, layout)

    env = {**os.environ, "OVS_RUNDIR": str(d), "OVS_LOGDIR": str(d), "OVS_DBDIR": str(d)}
    has_gw = any(port.role == "gateway_trunk" for sw in topo.switches for port in sw.ports)

    # 1. namespaces (no IPv6: its chatter would show up in captures and leak checks)
    namespaces = [lab.plane_netns(plane) for plane in planes] + ([gw_ns] if has_gw else [])
    ip_batch([f"netns add {ns}" for ns in namespaces])
    _each(namespaces, lambda ns: run(["ip", "netns", "exec", ns, "sh", "-c", f"{_NO_IPV6} && ip link set lo up"]))

    # 2. an OVSDB per control plane, inside its namespace (the planes side by side; a daemon not yet in the
    #    state file when the build fails is found by its pid file)
    def start_db(plane: str) -> None:
        _start_daemons(lab, plane, "ovsdb-server", env)
        Ovsdb(device=f"lab {lab.name}", db=lab.plane_db(plane)).run(
            ["init"], ["set", "Open_vSwitch", ".", "other_config:vlan-limit=2"], wait=False
        )

    _each(planes, start_db)
    lab.save()

    # 3. plan every bridge, veth and port, each in its plane
    links: list[tuple[str, str, str, str]] = []  # veth pairs: (name, its plane's netns, peer, peer's netns)
    bridges: dict[str, list[str]] = {plane: [] for plane in planes}
    ports: dict[str, list[tuple[str, str, list[str]]]] = {plane: [] for plane in planes}  # (bridge, port, columns)
    gw_lines: list[str] = []
    empty = ["vlan_mode=trunk", f"trunks={NO_VLANS}"]

    def place(plane: str, bridge: str, port: str, columns: list[str]) -> None:
        ports[plane].append((bridge, port, columns))
        if plane != CORE_PLANE:
            lab.state["ifaces"][port] = plane

    host_of = {(h.switch, h.port): h for h in topo.hosts}
    host_plane = {}
    for j, h in enumerate(topo.hosts):
        br, up, plane = f"{p}h{j}", f"{p}h{j}u", host_planes[j]
        bridges[plane].append(br)
        place(plane, br, up, empty)
        host_plane[h.name] = plane
        lab.state["hosts"][h.name] = {"bridge": br, "uplink": up, "plane": plane}
    host_index = {h.name: j for j, h in enumerate(topo.hosts)}
    uplinks: dict[str, list[tuple[str, str, str]]] = {}  # core -> [(switch, ovs port, plane)]
    for i, sw in enumerate(topo.switches):
        br, plane = f"{p}s{i}", switch_planes[i]
        ns = lab.plane_netns(plane)
        bridges[plane].append(br)
        port_map = {}
        for k, port in enumerate(sw.ports):
            name = f"{p}s{i}p{k}"
            port_map[port.name] = name
            place(plane, br, name, empty)
            host = host_of.get((sw.name, port.name))
            if host is not None:
                links.append((name, ns, f"{p}h{host_index[host.name]}u", lab.plane_netns(host_plane[host.name])))
            elif port.role == "core_uplink":
                uplinks.setdefault(port.core, []).append((sw.name, name, plane))
            elif port.role == "gateway_trunk":
                n = len(lab.state["gateways"])
                gw_lines += [f"link add gwbr{n} type bridge", f"link set gwbr{n} up"]
                gw_lines += [f"link set gwt{n} master gwbr{n}", f"link set gwt{n} up"]
                lab.state["gateways"].append({"switch": sw.name, "port": port.name, "bridge": f"gwbr{n}"})
                links.append((name, ns, f"gwt{n}", gw_ns))
            else:
                links.append((name, ns, f"{name}x", ns))  # a trunk with nothing plugged in yet
        lab.state["switches"][sw.name] = {"bridge": br, "port_map": port_map, "plane": plane}
    core_ns = lab.plane_netns(CORE_PLANE)
    for c, core in enumerate(topo.cores):
        vids = list(range(core.vid_min, core.vid_max + 1))
        core_br = f"{p}c{c}"
        bridges[CORE_PLANE].append(core_br)
        for m, (sw_name, uplink, plane) in enumerate(uplinks.get(core.name, [])):
            ns = lab.plane_netns(plane)
            if core.kind == "qinq":
                # the provider edge sits at the site (in the site's plane), or, with a plane per device, with
                # the rest of the provider's network in the core plane; its provider link reaches the core
                pe, cust, prov, p_side = f"{p}c{c}e{m}", f"{p}c{c}e{m}c", f"{p}c{c}e{m}t", f"{p}c{c}e{m}p"
                pe_plane = CORE_PLANE if layout == "device" else plane
                pe_ns = lab.plane_netns(pe_plane)
                bridges[pe_plane].append(pe)
                links += [(uplink, ns, cust, pe_ns), (prov, pe_ns, p_side, core_ns)]
                qinq = "other_config:qinq-ethtype=802.1ad"
                tunnel = ["vlan_mode=dot1q-tunnel", f"tag={core.service_tag}", f"cvlans={trunks_value(vids)}", qinq]
                place(pe_plane, pe, cust, tunnel)
                place(pe_plane, pe, prov, ["vlan_mode=trunk", f"trunks={core.service_tag}", qinq])
                place(CORE_PLANE, core_br, p_side, ["vlan_mode=trunk", f"trunks={core.service_tag}", qinq])
                link = {"core": core.name, "kind": core.kind, "switch": sw_name}
                lab.state["core_links"] += [
                    {**link, "iface": uplink, "layer": "customer", "netns": ns},
                    {**link, "iface": prov, "layer": "provider", "netns": pe_ns},
                ]
            else:
                side = f"{p}c{c}x{m}"
                links.append((uplink, ns, side, core_ns))
                place(CORE_PLANE, core_br, side, ["vlan_mode=trunk", f"trunks={trunks_value(vids)}"])
                lab.state["core_links"].append(
                    {
                        "core": core.name,
                        "kind": core.kind,
                        "switch": sw_name,
                        "iface": uplink,
                        "layer": "customer",
                        "netns": ns,
                    }
                )
    lab.save()

    # 4. veths (one ip process per namespace), the gateway bridges, then the switch daemons
    made: dict[str, list[str]] = {}  # per namespace: veths made there (both ends, or the peer in another one)
    peers_up: dict[str, list[str]] = {}  # per namespace: peers made from elsewhere, up once they exist
    for a, a_ns, b, b_ns in links:
        elsewhere = f" netns {b_ns}" if b_ns != a_ns else ""
        veth = f"link add {a} mtu {TRUNK_MTU} type veth peer name {b} mtu {TRUNK_MTU}"
        made.setdefault(a_ns, []).append(veth + elsewhere)
        made[a_ns].append(f"link set {a} up")
        if b_ns == a_ns:
            made[a_ns].append(f"link set {b} up")
        elif b_ns != gw_ns:  # the gateway namespace's ends come up with its bridges
            peers_up.setdefault(b_ns, []).append(f"link set {b} up")
    for batches in (made, peers_up):
        for ns, batch in batches.items():
            ip_batch(batch, ns)
    ip_batch(gw_lines, gw_ns if has_gw else None)
    _each(planes, lambda plane: _start_daemons(lab, plane, "ovs-vswitchd", env))
    lab.save()

    # 5. every bridge and port of a plane in one OVSDB transaction (the planes side by side); each waits until
    #    its ovs-vswitchd has applied it
    def configure(plane: str) -> None:
        commands: list[list[str]] = []
        for br in bridges[plane]:
            commands.append(["add-br", br])
            commands.append(["set", "Bridge", br, "datapath_type=netdev"])
        for br, name, settings in ports[plane]:
            commands.append(["add-port", br, name])
            commands.append(["set", "Port", name, *settings])
        if commands:
            Ovsdb(device=f"lab {lab.name}", db=lab.plane_db(plane), timeout=60).run(*commands)

    _each(planes, configure)
