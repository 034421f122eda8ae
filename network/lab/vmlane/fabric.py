"""A small namespace fabric for the Linux-bridge lane: switches, hosts and VMs as network namespaces.

Used by ``network/tests/test_drivers_linuxbridge.py`` and ``bench/lab_linuxbridge.py``; it runs where the
kernel has 802.1Q (inside the QEMU guest of ``scripts/vm-lane.sh`` on these machines). It builds only the
wiring (namespaces, bridges, veth pairs, addresses); VLAN membership is left to the drivers under test.

It drives iproute2 in batches (``ip -n NS -batch -``): under emulation every ``ip`` exec costs > 100 ms.
Every namespace carries the fabric's prefix; ``destroy()`` deletes them all, and ``remove_stale()`` deletes
those of earlier runs whose process is gone. No link ever leaves the fabric's own namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterable, Iterator

PREFIX_ROOT = "vclb"  # every namespace this helper makes starts with it
NETNS_RUN_DIR = "/run/netns"


class FabricError(RuntimeError):
    """An iproute2 command of the fabric failed (the message has the command and its output)."""


def run(
    argv: list[str], input: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise FabricError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}\n{input or ''}")
    return done


def make_prefix(tag: str = "") -> str:
    """A per-process prefix (``vclb<pid><tag>-``) so that parallel runs never collide."""
    return f"{PREFIX_ROOT}{os.getpid()}{tag}-"


def remove_stale() -> list[str]:
    """Delete namespaces left by crashed runs (prefix names a process that no longer exists)."""
    removed = []
    if not os.path.isdir(NETNS_RUN_DIR):
        return removed
    for name in os.listdir(NETNS_RUN_DIR):
        m = re.match(rf"{PREFIX_ROOT}(\d+)", name)
        if m and not os.path.exists(f"/proc/{m[1]}"):
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed


def kernel_8021q_missing(prefix: str) -> str | None:
    """``None`` when this kernel does 802.1Q (VLAN devices, VLAN-aware bridges), else the reason it does not."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    ns = f"{prefix}probe"
    try:
        run(["ip", "netns", "add", ns])
    except FabricError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        done = run(
            ["ip", "-n", ns, "-batch", "-"],
            input="link add d0 type dummy\nlink add link d0 name d0.100 type vlan id 100\n"
            "link add b0 type bridge vlan_filtering 1\n",
            check=False,
        )
        if done.returncode != 0:
            return f"kernel lacks 802.1Q ({done.stderr.strip().splitlines()[0] if done.stderr.strip() else 'failed'})"
        return None
    finally:
        run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def trunk_pair(near: str, far: str, nodes: dict[int, str], near_batch: str = "") -> Iterator[str]:
    """Namespaces ``near`` (a gateway, a router) and ``far`` (a "switch") joined by a veth pair named ``t0`` at both
    ends, up; at the far end a VLAN sub-interface ``t0.<vid>`` holding each of ``nodes``' address (``{vid:
    "addr/len"}``), up; ``near_batch``: more ``ip -batch`` lines for ``near``. Yields ``near``; both namespaces are
    deleted afterwards."""
    for ns in (near, far):
        run(["ip", "netns", "add", ns])
    try:
        run(["ip", "link", "add", "t0", "netns", near, "type", "veth", "peer", "name", "t0", "netns", far])
        vlans = "".join(
            f"link add link t0 name t0.{vid} type vlan id {vid}\naddr add {address} dev t0.{vid}\n"
            f"link set t0.{vid} up\n"
            for vid, address in nodes.items()
        )
        run(["ip", "-n", far, "-batch", "-"], input=f"link set t0 up\nlink set lo up\n{vlans}")
        run(["ip", "-n", near, "-batch", "-"], input=f"link set t0 up\nlink set lo up\n{near_batch}")
        yield near
    finally:
        for ns in (near, far):
            run(["ip", "netns", "del", ns], check=False)


class Fabric:
    """Namespaces wired with veth pairs. Names passed in are short ("sw1"); namespaces get the prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.namespaces: list[str] = []

    def ns(self, name: str) -> str:
        return f"{self.prefix}{name}"

    # --- building

    def batch(self, name: str | None, lines: Iterable[str], tool: str = "ip") -> None:
        """Run iproute2 ``tool`` (ip or bridge) lines inside namespace ``name`` (None: the root namespace)."""
        script = "".join(line + "\n" for line in lines)
        if script:
            run([tool, *(["-n", self.ns(name)] if name else []), "-batch", "-"], input=script)

    def namespace(self, *names: str) -> None:
        self.batch(None, [f"netns add {self.ns(n)}" for n in names])
        self.namespaces += [self.ns(n) for n in names]

    def switch(self, *names: str, bridge: str = "br0", protocol: str = "802.1Q") -> None:
        """Site switches: namespace + VLAN-aware bridge with no default PVID (``protocol`` 802.1ad: provider)."""
        self.namespace(*names)
        for name in names:
            self.batch(
                name,
                [
                    f"link add {bridge} type bridge vlan_filtering 1 vlan_default_pvid 0 vlan_protocol {protocol}",
                    f"link set {bridge} up",
                ],
            )

    def wire(self, *links: tuple, extra: dict[str, list[str]] | None = None) -> None:
        """veth pairs ``(a, a_if, b, b_if[, a_master[, b_master]])`` between namespaces, each end optionally
        enslaved, all up; then the ``extra`` lines per namespace. Two passes of one batch per namespace:
        every pair exists before any end is configured."""
        create: dict[str, list[str]] = {}
        configure: dict[str, list[str]] = {}
        for a, a_if, b, b_if, *masters in links:
            a_master, b_master = (list(masters) + [None, None])[:2]
            create.setdefault(a, []).append(f"link add {a_if} type veth peer name {b_if} netns {self.ns(b)}")
            configure.setdefault(a, []).append(f"link set {a_if}{f' master {a_master}' if a_master else ''} up")
            configure.setdefault(b, []).append(f"link set {b_if}{f' master {b_master}' if b_master else ''} up")
        for name, lines in (extra or {}).items():
            configure.setdefault(name, []).extend(lines)
        for name, lines in [*create.items(), *configure.items()]:
            self.batch(name, lines)

    def link(self, a: str, a_if: str, b: str, b_if: str, a_master: str | None = None, b_master: str | None = None):
        self.wire((a, a_if, b, b_if, a_master, b_master))

    def vm(self, name: str, host: str, bridge: str, address: str) -> str:
        """A "VM": a namespace whose eth0 is plugged into ``bridge`` on ``host`` (port ``v-<name>``)."""
        self.vms((name, host, bridge, address))
        return f"v-{name}"

    def vms(self, *vms: tuple[str, str, str, str]) -> None:
        """Several VMs ``(name, host, bridge, address)``, built in a few batches."""
        self.namespace(*(vm[0] for vm in vms))
        self.wire(
            *((host, f"v-{name}", name, "eth0", bridge) for name, host, bridge, _ in vms),
            extra={name: [f"addr add {address} dev eth0"] for name, _, _, address in vms},
        )

    def destroy(self) -> None:
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()

    # --- looking

    def exec(self, name: str, *argv: str, check: bool = False, timeout: float = 30) -> subprocess.CompletedProcess:
        return run(["ip", "netns", "exec", self.ns(name), *argv], check=check, timeout=timeout)

    def ping(self, name: str, address: str, wait: float = 2, count: int = 1) -> bool:
        done = self.exec(name, "ping", "-n", "-q", "-c", str(count), "-W", f"{wait:g}", address)
        return done.returncode == 0

    def mac(self, name: str, ifname: str = "eth0") -> str:
        return json.loads(run(["ip", "-n", self.ns(name), "-json", "link", "show", ifname]).stdout)[0]["address"]

    def fdb(self, name: str, bridge: str) -> list[dict]:
        """Forwarding entries the bridge learned (``bridge fdb``), with their VLAN where there is one."""
        out = run(["bridge", "-n", self.ns(name), "-json", "fdb", "show", "br", bridge]).stdout
        return json.loads(out or "[]")

    def bridge_vlans(self, name: str) -> dict[str, set[int]]:
        out = run(["bridge", "-n", self.ns(name), "-json", "vlan", "show"]).stdout
        return {
            item["ifname"]: {
                vid for v in item.get("vlans", []) for vid in range(v["vlan"], v.get("vlanEnd", v["vlan"]) + 1)
            }
            for item in json.loads(out or "[]")
        }

    def links(self, name: str) -> dict[str, dict]:
        out = run(["ip", "-n", self.ns(name), "-json", "-details", "link", "show"]).stdout
        return {link["ifname"]: link for link in json.loads(out)}
