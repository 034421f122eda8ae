"""Linux-bridge lane: time to add one VLAN to a ``linuxbridge`` switch and to a ``linuxbridge`` host.

    .venv/bin/python bench/lab_linuxbridge.py [--json] [-n 10]

Where the running kernel has 802.1Q (and we are root) it measures right here. On these machines it does
not, so the script boots the QEMU guest of ``scripts/vm-lane.sh bench`` and measures there: those figures
come from a software-emulated CPU (TCG) and are many times slower than on hardware — compare them with each
other, not with the OVS lane. ``--json`` prints one JSON object as the last line (``bench/lab.py`` reads it).

"Add one VLAN to a switch" is what a provisioning task does: open a session, load the rendered candidate,
diff, commit, verify with get_vlans, close. "Add one VLAN to a host": open, create ``<trunk>.<vid>`` +
``br-v<vid>``, close.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from network.drivers.base import HostSpec, SwitchSpec, host_session, switch_session  # noqa: E402


def _load_fabric():
    spec = importlib.util.spec_from_file_location("vmlane_fabric", REPO / "network" / "lab" / "vmlane" / "fabric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stats(samples: list[float]) -> dict:
    ms = [s * 1000 for s in samples]
    return {"median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1), "max_ms": round(max(ms), 1)}


def measure(n: int) -> dict:
    """Build a switch with two owned trunk ports and a host behind it; add ``n`` VLANs one at a time."""
    vmlane = _load_fabric()
    vmlane.remove_stale()
    # Load the drivers (NAPALM, pyroute2) before timing: the first session would otherwise carry the imports.
    importlib.import_module("network.drivers.linuxbridge")
    importlib.import_module("network.drivers.linuxbridge_host")
    fabric = vmlane.Fabric(vmlane.make_prefix("bench"))
    try:
        fabric.switch("sw1")
        fabric.namespace("h1", "up")
        fabric.wire(("sw1", "p-h1", "h1", "eth0", "br0"), ("sw1", "core", "up", "eth0", "br0"))
        switch = SwitchSpec(name="sw1", platform="linuxbridge", address=fabric.ns("sw1"), owned_ports=("p-h1", "core"))
        host = HostSpec(name="h1", driver="linuxbridge", trunk_interface="eth0", driver_args={"netns": fabric.ns("h1")})
        vids: set[int] = set()
        switch_total, switch_converge, host_add, host_remove = [], [], [], []
        for vid in range(100, 100 + n):
            vids.add(vid)
            started = time.perf_counter()
            with switch_session(switch) as session:
                converge_started = time.perf_counter()
                result = session.converge({"p-h1": frozenset(vids), "core": frozenset(vids)})
                switch_converge.append(time.perf_counter() - converge_started)
            switch_total.append(time.perf_counter() - started)
            assert result.diff == f"+port core vlan {vid}\n+port p-h1 vlan {vid}\n", result.diff
            started = time.perf_counter()
            with host_session(host) as session:
                assert session.converge(frozenset(vids)).changed
            host_add.append(time.perf_counter() - started)
        for vid in sorted(vids, reverse=True):
            vids.discard(vid)
            started = time.perf_counter()
            with host_session(host) as session:
                assert session.converge(frozenset(vids)).after == {"h1": frozenset(vids)}
            host_remove.append(time.perf_counter() - started)
    finally:
        fabric.destroy()
    return {
        "lane": "linuxbridge",
        "kernel": platform.release(),
        "emulated": os.environ.get("VIRTCLOUD_VMLANE") == "1",
        "n": n,
        "switch_add_vlan": _stats(switch_total),
        "switch_converge_only": _stats(switch_converge),
        "host_add_vlan": _stats(host_add),
        "host_remove_vlan": _stats(host_remove),
    }


def report(figures: dict) -> str:
    where = "QEMU guest, TCG software emulation" if figures["emulated"] else "this machine"
    lines = [f"linuxbridge lane: kernel {figures['kernel']} ({where}), {figures['n']} VLANs added one at a time"]
    labels = {
        "switch_add_vlan": "switch: add one VLAN to 2 trunk ports (open+load+diff+commit+verify+close)",
        "switch_converge_only": "switch: the converge alone (session already open)",
        "host_add_vlan": "host:   add one VLAN (<trunk>.<vid> + br-v<vid>, open+converge+close)",
        "host_remove_vlan": "host:   remove one VLAN (no VM port left)",
    }
    for key, label in labels.items():
        s = figures[key]
        lines.append(f"  {label}: median {s['median_ms']} ms (min {s['min_ms']}, max {s['max_ms']})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    parser.add_argument("-n", type=int, default=10, help="VLANs to add (default 10)")
    parser.add_argument("--here", action="store_true", help="measure in this kernel (the VM lane guest uses it)")
    parser.add_argument("--json-file", help="also write the figures to this file")
    args = parser.parse_args()

    if args.here:
        figures = measure(args.n)
    else:
        missing = _load_fabric().kernel_8021q_missing(_load_fabric().make_prefix("probe"))
        if missing is None:
            figures = measure(args.n)
        else:
            print(f"bench: {missing}; measuring in the QEMU guest (scripts/vm-lane.sh bench)", file=sys.stderr)
            with tempfile.TemporaryDirectory(prefix="vclb-bench-") as out:
                env = {**os.environ, "VM_LANE_OUT": out}
                done = subprocess.run([str(REPO / "scripts" / "vm-lane.sh"), "bench"], env=env, text=True,
                                      stdout=sys.stderr)  # fmt: skip
                result = Path(out) / "bench.json"
                if done.returncode != 0 or not result.exists():
                    print(f"bench: the guest run failed (exit {done.returncode})", file=sys.stderr)
                    return done.returncode or 1
                figures = json.loads(result.read_text())
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(figures))
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
