"""Packet checks on a lab: ping, arping, tcpdump captures and iperf3, each run inside the namespace that
owns the interface. ``where``/``src`` may be a VM name, a VM namespace or an interface of the OVS namespace.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from network.lab.fabric import Lab, LabError

_MAC = re.compile(r"from ([0-9a-f]{2}(?::[0-9a-f]{2}){5})", re.IGNORECASE)


def _netns(lab: Lab, src: str) -> str:
    return lab.locate(src)[0]


def ping(lab: Lab, src: str, dst_ip: str, *, count: int = 1, timeout: float = 1.0) -> bool:
    """Does ``dst_ip`` answer an ICMP echo from ``src``?"""
    argv = ["ip", "netns", "exec", _netns(lab, src), "ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}"]
    return subprocess.run([*argv, dst_ip], capture_output=True, check=False).returncode == 0


def ping_many(lab: Lab, pairs: Iterable[tuple[str, str]], *, timeout: float = 1.0, count: int = 1):
    """Run many pings at once (failures cost ``timeout`` once, not once per pair): {(src, dst_ip): bool}."""
    procs = {}
    for src, dst in pairs:
        argv = ["ip", "netns", "exec", _netns(lab, src), "ping", "-n", "-q", "-c", str(count), "-W", f"{timeout:g}"]
        procs[(src, dst)] = subprocess.Popen([*argv, dst], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {key: proc.wait() == 0 for key, proc in procs.items()}


def arping(lab: Lab, src: str, dst_ip: str, *, count: int = 2, timeout: float = 1.0) -> set[str]:
    """MAC addresses that answered an ARP request for ``dst_ip`` sent from ``src`` (a VM)."""
    netns, iface = lab.locate(src)
    argv = ["ip", "netns", "exec", netns, "arping", "-i", iface, "-c", str(count), "-W", "0.1", "-w", f"{timeout:g}"]
    argv.append(dst_ip)
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return {m.lower() for m in _MAC.findall(out)}


def broadcast(lab: Lab, src: str, *, count: int = 2) -> None:
    """Send broadcast traffic from ``src``: a broadcast ping and a gratuitous ARP."""
    vm = lab.vm(src)
    ns = vm.netns
    subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-b", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "0.3"]
        + ["255.255.255.255"],
        capture_output=True,
        check=False,
    )
    subprocess.run(
        ["ip", "netns", "exec", ns, "arping", "-i", "eth0", "-U", "-c", str(count), "-w", "0.5", vm.address],
        capture_output=True,
        check=False,
    )


@dataclass
class Capture:
    """Lines tcpdump printed (``-e -nn``: link-level headers, so VLAN tags and their ethertypes show)."""

    where: str
    filter: str
    lines: list[str] = field(default_factory=list)

    def count(self, needle: str = "") -> int:
        return sum(1 for line in self.lines if needle in line)


@contextmanager
def capture(lab: Lab, where: str, filter: str = "", *, settle: float = 0.05) -> Iterator[Capture]:
    """Capture on ``where`` while the block runs; the Capture's ``lines`` are filled when the block ends.

    Remember that a BPF filter like ``icmp`` does not match tagged frames: use ``vlan and icmp`` (802.1Q) or
    ``vlan and vlan and icmp`` (QinQ) on trunks.
    """
    netns, iface = lab.locate(where)
    argv = ["ip", "netns", "exec", netns, "tcpdump", "-i", iface, "-e", "-nn", "-l", "--immediate-mode"]
    argv += filter.split() if filter else []
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # tcpdump says "listening on" once the socket is open; anything before that would be missed
    line = ""
    for _ in range(5):
        line = proc.stderr.readline()
        if "listening on" in line or not line:
            break
    if "listening on" not in line:
        proc.kill()
        raise LabError(f"tcpdump on {where} ({netns}/{iface}) did not start: {line.strip()}")
    result = Capture(where, filter)
    try:
        yield result
    finally:
        time.sleep(settle)  # frames still in flight through the userspace datapath
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        result.lines = [line for line in out.splitlines() if line.strip()]


def iperf(lab: Lab, server: str, client: str, server_ip: str, *, seconds: float = 2.0) -> float:
    """TCP throughput from ``client`` to ``server`` (both VM names or namespaces) in bit/s."""
    import json

    srv = subprocess.Popen(
        ["ip", "netns", "exec", _netns(lab, server), "iperf3", "-s", "-1", "-B", server_ip],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):  # until the server listens (a client refused early would fail the run)
            ss = ["ip", "netns", "exec", _netns(lab, server), "ss", "-Hltn", "sport = :5201"]
            if subprocess.run(ss, capture_output=True, text=True, check=False).stdout.strip():
                break
            time.sleep(0.02)
        cli = subprocess.run(
            ["ip", "netns", "exec", _netns(lab, client), "iperf3", "-J", "-c", server_ip, "-t", f"{seconds:g}"],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            return float(json.loads(cli.stdout)["end"]["sum_received"]["bits_per_second"])
        except (ValueError, KeyError):
            raise LabError(f"iperf3 {client} → {server_ip} failed: {cli.stdout[-400:]} {cli.stderr[-200:]}") from None
    finally:
        srv.kill()
        srv.wait()


def self_test(lab: Lab) -> list[tuple[str, bool]]:
    """A quick isolation check on a running lab that leaves the portal's VLANs alone: two unused VLANs of the
    first core on two hosts (at two sites when there are), configured through the drivers on top of what is
    there, two VMs per VLAN with the same addresses, ping/ARP/broadcast checks, then everything put back."""
    from network.drivers import host_session, switch_session

    topo = lab.topology
    if len(topo.hosts) < 2 or not topo.cores:
        raise LabError(f"lab {lab.name}: the self-test needs two hosts and a core")
    first = topo.hosts[0]
    second = next((h for h in topo.hosts[1:] if h.site != first.site), topo.hosts[1])
    hosts = [first.name, second.name]
    current = {}
    for sw in topo.switches:
        with switch_session(lab.switch_spec(sw.name)) as session:
            current[sw.name] = session.port_vlans()
    host_now = {}
    for h in topo.hosts:
        with host_session(lab.host_spec(h.name)) as session:
            host_now[h.name] = session.vlans()
    used = {v for ports in current.values() for vids in ports.values() for v in vids}
    used |= {v for vids in host_now.values() for v in vids}
    core = topo.cores[0]
    free = [v for v in range(core.vid_min, core.vid_max + 1) if v not in used][:2]
    if len(free) < 2:
        raise LabError(f"lab {lab.name}: no two free VLANs in core {core.name}")
    add_sw, add_host = lab.desired({free[0]: hosts, free[1]: hosts})

    def apply(extra: bool) -> None:
        for name, ports in current.items():
            wanted = {p: vids | (add_sw[name][p] if extra else frozenset()) for p, vids in ports.items()}
            if wanted != ports or not extra:
                with switch_session(lab.switch_spec(name)) as session:
                    session.converge(wanted)
        for name in hosts:
            with host_session(lab.host_spec(name)) as session:
                session.converge(host_now[name] | (add_host[name] if extra else frozenset()))

    results: list[tuple[str, bool]] = []
    tag = lab.state["next_vm"]
    vms = {f"st{tag}a1": (hosts[0], free[0], "198.18.255.1/24"), f"st{tag}a2": (hosts[1], free[0], "198.18.255.2/24")}
    vms |= {f"st{tag}b1": (hosts[0], free[1], "198.18.255.1/24"), f"st{tag}b2": (hosts[1], free[1], "198.18.255.3/24")}
    a1, a2, b1, b2 = vms
    try:
        apply(True)
        for name, (host, vid, ip) in vms.items():
            lab.attach_vm(host, vid, name, ip)
        results.append((f"same VLAN {free[0]} across {hosts[0]} and {hosts[1]}: ping", ping(lab, a1, "198.18.255.2")))
        results.append(
            (
                "shared address 198.18.255.1 answers inside its own VLAN only",
                arping(lab, a2, "198.18.255.1") == {lab.vm(a1).mac},
            )
        )
        results.append((f"VLAN {free[0]} cannot reach VLAN {free[1]}'s address", not ping(lab, a1, "198.18.255.3")))
        with capture(lab, b2) as leak, capture(lab, a2) as seen:
            broadcast(lab, a1, count=1)
        mac = lab.vm(a1).mac
        results.append(("broadcast reaches the own VLAN", any(mac in line for line in seen.lines)))
        results.append(("no broadcast leaks into the other VLAN", not any(mac in line for line in leak.lines)))
    finally:
        for name in vms:
            if name in lab.state["vms"]:
                lab.detach_vm(name)
        apply(False)
    return results
