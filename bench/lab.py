"""Lab benchmark (never run as a test): ``sudo .venv/bin/python bench/lab.py [--quick]``.

Prints lab up/down time for 3 and 16 sites, the time to add one VLAN to a switch and to a host per driver,
and VM↔VM TCP throughput across the core versus a plain veth pair (iperf3), as a ratio.

Drivers other than ``ovs`` plug in through ``DRIVER_BENCHES``: the ``linuxbridge`` lane (QEMU guest, another
engineer) registers a function ``() -> {"switch": seconds, "host": seconds}`` from ``bench/lab_linuxbridge.py``
(module attribute ``measure``) when that file exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from network.drivers import host_session, switch_session  # noqa: E402
from network.lab import Lab, iperf, requirements, topology  # noqa: E402


def median_time(fn, repeat: int) -> float:
    samples = []
    for i in range(repeat):
        started = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_up_down(sites: int, repeat: int) -> tuple[float, float]:
    ups, downs = [], []
    for _ in range(repeat):
        started = time.perf_counter()
        lab = Lab.up(topology.generate(sites=sites, hosts_per_site=2, core_kind="qinq"))
        ups.append(time.perf_counter() - started)
        downs.append(lab.down())
    return statistics.median(ups), statistics.median(downs)


def bench_ovs(repeat: int) -> dict[str, float]:
    """One VLAN added to one switch port / one host through the real session (open → … → verify)."""
    lab = Lab.up(topology.generate(sites=2, hosts_per_site=1, core_kind="qinq"))
    try:
        with switch_session(lab.switch_spec("sw-s1")):
            pass  # first use imports NAPALM: not part of a VLAN change

        def switch_add(i):
            with switch_session(lab.switch_spec("sw-s1")) as session:
                session.converge({"p-h1": frozenset(range(100, 101 + i))})

        def host_add(i):
            with host_session(lab.host_spec("h-s1-1")) as session:
                session.converge(frozenset(range(100, 101 + i)))

        return {"switch": median_time(switch_add, repeat), "host": median_time(host_add, repeat)}
    finally:
        lab.down()


DRIVER_BENCHES = {"ovs": bench_ovs}
_lb = Path(__file__).with_name("lab_linuxbridge.py")
if _lb.exists():  # the linuxbridge lane's hook (runs its own QEMU guest)
    _spec = importlib.util.spec_from_file_location("lab_linuxbridge", _lb)
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    DRIVER_BENCHES["linuxbridge"] = lambda repeat: _module.measure()


def bench_throughput(seconds: float) -> tuple[float, float]:
    """(VM↔VM across a 2-site QinQ core, plain veth pair between two namespaces) in bit/s."""
    lab = Lab.up(topology.generate(sites=2, hosts_per_site=1, core_kind="qinq"))
    try:
        lab.converge({100: ["h-s1-1", "h-s2-1"]})
        lab.attach_vm("h-s1-1", 100, "a", "198.18.0.1/24")
        lab.attach_vm("h-s2-1", 100, "b", "198.18.0.2/24")
        across = iperf(lab, "b", "a", "198.18.0.2", seconds=seconds)
        # the baseline: two namespaces joined by one veth pair (named so that lab.down() removes them)
        left, right = f"{lab.prefix}vm9000", f"{lab.prefix}vm9001"
        for ns in (left, right):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(
            ["ip", "-n", left, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", right],
            check=True,
        )
        for ns, ip in ((left, "198.18.1.1/24"), (right, "198.18.1.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", ip, "dev", "eth0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "eth0", "up"], check=True)
        plain = iperf(lab, right, left, "198.18.1.2", seconds=seconds)
        return across, plain
    finally:
        lab.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, 1 s iperf")
    args = parser.parse_args()
    reason = requirements()
    if reason:
        sys.exit(f"cannot run the lab benchmark: {reason}")
    repeat = 3 if args.quick else 5
    print(f"lab benchmark ({os.cpu_count()} CPUs, OVS userspace datapath)")
    for sites in (3, 16):
        up, down = bench_up_down(sites, repeat)
        print(f"  lab {sites:2d} sites × 2 hosts: up {up * 1000:6.0f} ms   down {down * 1000:5.0f} ms")
    for name, bench in DRIVER_BENCHES.items():
        result = bench(repeat * 2)
        switch_ms, host_ms = result["switch"] * 1000, result["host"] * 1000
        print(f"  add one VLAN, {name:11s}: switch {switch_ms:5.1f} ms   host {host_ms:5.1f} ms")
    if "linuxbridge" not in DRIVER_BENCHES:
        print("  add one VLAN, linuxbridge: not measured here (QEMU lane: bench/lab_linuxbridge.py hook)")
    across, plain = bench_throughput(1.0 if args.quick else 3.0)
    print(
        f"  iperf3 VM↔VM across the QinQ core {across / 1e9:6.2f} Gbit/s, plain veth pair {plain / 1e9:6.2f} Gbit/s,"
        f" ratio {across / plain:.3f}"
    )


if __name__ == "__main__":
    main()
