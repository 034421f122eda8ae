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
        for _ in range(50):
            cli = subprocess.run(
                ["ip", "netns", "exec", _netns(lab, client), "iperf3", "-J", "-c", server_ip, "-t", f"{seconds:g}"],
                capture_output=True,
                text=True,
                check=False,
            )
            if cli.returncode == 0:
                return float(json.loads(cli.stdout)["end"]["sum_received"]["bits_per_second"])
            time.sleep(0.05)  # the server is not listening yet
        raise LabError(f"iperf3 {client} → {server_ip} failed: {cli.stdout[-300:]} {cli.stderr[-300:]}")
    finally:
        srv.kill()
        srv.wait()
