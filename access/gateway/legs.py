"""The SSH bastion's legs into the closed clusters: the reference ``--on-change`` hook, run as root on the gateway.

The bastion connects to a cluster's nodes from an address of its own in the cluster's network, on the
cluster's VLAN of the gateway's trunk. The pull writes ``ssh/clusters.json`` (each cluster's VLAN, the
bastion's address there as the scheduler gave it, and the nodes); this makes the legs match it::

    manage.py gateway pull ... --on-change "python3 -I /opt/virtcloud/access/gateway/legs.py --trunk eth1"

For each cluster with a VLAN and a ``bastion_address``: a VLAN sub-interface ``<prefix><vid>`` of ``--trunk``,
up, holding exactly that address (its global-scope addresses; an IPv6 leg keeps its link-local ones). A
sub-interface with the prefix that the file no longer asks for — the cluster ended, lost its address, or
the link was made by hand with another VLAN or parent — is deleted. Nothing else is touched. Idempotent:
run again, it changes nothing; it prints each change. Exit 1 (and a message) when the system refuses one: the
pull then runs it again next time.

By default one network stack holds every leg: two clusters whose networks overlap get their legs, but the
kernel routes the overlap through one of them (a warning names them); the portal withholds from such a
bastion every node in another cluster's leg network, and any node address two clusters use
(``access.selectors.bastion_withheld_nodes``), so no user is carried to another cluster's node. With
``--namespaces`` each leg gets a namespace of its own, ``<prefix><vid>``, where ``bastion.py`` starts that
cluster's sshd (the gateway's ``ssh_port_base``): clusters may then use the same addresses. Run it in the
gateway's own mount namespace (as ``--on-change`` does; ``nsenter --net=...`` to reach a trunk in another
network namespace, not ``ip netns exec``, whose private mounts would take the namespaces it makes with it).

No leg forwards what it receives: on a gateway that routes (``net.ipv4.ip_forward=1``, common beside OpenVPN) a
root user in one cluster could otherwise route through the bastion's address into another cluster, or out. Each
leg gets ``net.ipv4.conf.<leg>.forwarding=0`` (IPv4 asks the interface a packet came in on) and
``net.ipv6.conf.<leg>.forwarding=0``; IPv6 forwards by its stack-wide switch alone, so an IPv4 leg takes no IPv6
(``disable_ipv6=1``), and while ``net.ipv6.conf.all.forwarding`` is on in the shared stack a leg holding an IPv6
address is refused (removed, exit 1: turn it off, or use ``--namespaces``). With ``--namespaces`` the leg's
namespace forwards nothing (``all`` and ``default`` too). The values are written with ``sysctl -w`` (in the leg's
namespace) before a new leg goes up and whenever one differs; a refused write fails the hook like a refused
``ip`` command. The kernel turns forwarding on for every interface when ``ip_forward`` goes from 0 to 1: run the
hook after such a change (the pull runs it after each boot).
Nothing a cluster sends reaches the gateway's own services either, unasked: an nftables table of its own,
``inet virtcloud_<prefix>``, drops what comes in on a leg unless it answers a connection the gateway made (the
bastion's to the nodes) or is a ping or IPv6 neighbour discovery, and drops whatever would be routed in or out
through a leg (beside forwarding=0). Without it every service listening on all addresses — the gateway's own
sshd, an agent, a monitoring port — would be open to every closed cluster's root users. The table is replaced
in one nftables transaction when its rules differ (a digest in its comment says which it holds), before any leg
is made: a leg never comes up unprotected, and when ``nft`` fails nothing changes (exit 1). ``--no-firewall``
leaves it out (and an earlier run's table in place). With ``--namespaces`` nothing listens in a leg's
namespace (the bastion's sockets are the gateway's), and each namespace forwards nothing: no table.
Standalone: no Django.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from access.gateway.state import SshState, StateError, legs_from_doc  # noqa: E402

PREFIX_RE = re.compile(r"^[a-z]{1,8}$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,15}$")
Runner = Callable[[Sequence[str]], str]


class LegsError(Exception):
    """The file or the system is not what the hook can work with (the message says why); ``done``: the changes
    made all the same (the legs the system did not refuse)."""

    def __init__(self, message: str, done: Sequence[str] = ()):
        super().__init__(message)
        self.done = list(done)


@dataclass(frozen=True)
class Link:
    """A VLAN sub-interface as iproute2 reports it."""

    name: str
    vid: int | None  # None: not a VLAN device
    parent: str
    addresses: frozenset[str]  # global scope, "address/prefixlen"
    up: bool = False


def wanted(doc: dict) -> dict[int, str]:
    """{VLAN id: the bastion's address there} from ``ssh/clusters.json``, validated."""
    try:
        return {vid: address for vid, address in legs_from_doc(doc).values()}
    except StateError as exc:
        raise LegsError(str(exc)) from None


def overlaps(legs: dict[int, str]) -> list[tuple[int, int]]:
    """Pairs of VLANs whose legs' networks overlap (one stack routes the overlap through one of them)."""
    nets = sorted((n.version, n, vid) for vid, n in ((v, ipaddress.ip_interface(a).network) for v, a in legs.items()))
    return [
        (a_vid, b_vid)
        for i, (version, a, a_vid) in enumerate(nets)
        for b_version, b, b_vid in nets[i + 1 :]
        if version == b_version and a.overlaps(b)
    ]


def current(run: Runner, prefix: str, netns: str = "") -> dict[str, Link]:
    """The links whose name starts with ``prefix`` (in namespace ``netns``), with their VLAN, parent, global
    addresses and whether up."""
    where = ["-n", netns] if netns else []
    links = json.loads(run(["ip", *where, "-j", "-d", "link", "show"]) or "[]")
    addrs = json.loads(run(["ip", *where, "-j", "addr", "show"]) or "[]")
    global_addrs: dict[str, set[str]] = {}
    for entry in addrs:
        for a in entry.get("addr_info", []):
            if a.get("scope") == "global" and a.get("family") in ("inet", "inet6"):
                iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
                global_addrs.setdefault(entry["ifname"], set()).add(str(iface))
    out = {}
    for entry in links:
        name = entry.get("ifname", "")
        if not name.startswith(prefix):
            continue
        info = entry.get("linkinfo", {})
        vid = info.get("info_data", {}).get("id") if info.get("info_kind") == "vlan" else None
        up = "UP" in entry.get("flags", [])
        out[name] = Link(name, vid, entry.get("link", ""), frozenset(global_addrs.get(name, ())), up)
    return out


IPV6_FORWARDING = "net.ipv6.conf.all.forwarding"


def kernel_settings(name: str, address: str, *, namespaced: bool = False, ipv6: bool = True) -> dict[str, str]:
    """The sysctl values leg ``name`` (holding ``address``) needs so that the kernel forwards nothing it receives
    there (the module docstring says why); ``namespaced``: its namespace forwards nothing at all. ``ipv6``: the
    kernel has IPv6."""
    scopes = ["all", "default", name] if namespaced else [name]
    families = ["ipv4", "ipv6"] if ipv6 else ["ipv4"]
    wanted = {f"net.{family}.conf.{scope}.forwarding": "0" for family in families for scope in scopes}
    if ipv6:  # IPv6 has no per-interface forwarding switch: an IPv4 leg takes no IPv6 at all
        wanted[f"net.ipv6.conf.{name}.disable_ipv6"] = "1" if ipaddress.ip_interface(address).version == 4 else "0"
    return wanted


def read_settings(run: Runner, keys: Sequence[str], netns: str = "") -> dict[str, str]:
    """The current values of the sysctl ``keys`` (in namespace ``netns``); a key the kernel lacks is left out."""
    where = ["ip", "netns", "exec", netns] if netns else []
    out = run([*where, "sysctl", "-e", *keys])
    return {key.strip(): value.strip() for key, eq, value in (line.partition("=") for line in out.splitlines()) if eq}


def _settings(where: list[str], wanted: dict[str, str], have: dict[str, str] | None) -> list[list[str]]:
    """The ``sysctl -w`` (run with ``where``: its namespace) that sets the ``wanted`` values ``have`` differs in
    (all of them when None: a leg just made); none when all are as wanted."""
    change = [f"{key}={value}" for key, value in wanted.items() if have is None or have.get(key) != value]
    return [[*where, "sysctl", "-w", *change]] if change else []


def address_and_up(
    ip: list[str], name: str, link: Link | None, address: str, settings: list[list[str]]
) -> list[list[str]]:
    """The commands (``ip`` = the command and its namespace) that leave leg ``name`` holding exactly
    ``address`` (of its global ones) and up; ``link`` is the leg as it is now (None: just made). ``settings``
    (its sysctl values) come after the deletions (``disable_ipv6`` would take an IPv6 address before its ``addr
    del``, which would then fail) and before it gets its address and goes up: a new leg never forwards."""
    have = link.addresses if link else frozenset()
    commands = [[*ip, "addr", "del", old, "dev", name] for old in sorted(have) if old != address]
    commands += settings
    if address not in have:
        commands.append([*ip, "addr", "add", address, "dev", name])
    if link is None or not link.up:
        commands.append([*ip, "link", "set", name, "up"])
    return commands


def vlan_link(name: str, vid: int, trunk: str, link: Link | None) -> tuple[list[list[str]], Link | None]:
    """The ``ip`` commands that make ``name`` a sub-interface of ``trunk`` for VLAN ``vid`` (none when ``link``, the
    link of that name now, is one; a link of that name made by hand, or for another trunk, is deleted first), and
    the link as it is before its addresses are set (None: made anew)."""
    commands = []
    if link is not None and (link.vid != vid or link.parent != trunk):
        commands.append(["ip", "link", "del", name])
        link = None
    if link is None:
        commands.append(["ip", "link", "add", "link", trunk, "name", name, "type", "vlan", "id", str(vid)])
    return commands, link


def plan(
    legs: dict[int, str],
    links: dict[str, Link],
    *,
    trunk: str,
    prefix: str,
    kernel: dict[str, str],
    ipv6: bool = True,
) -> list[list[str]]:
    """The ``ip`` and ``sysctl`` commands that make ``links`` what ``legs`` asks for (none when they already are);
    ``kernel``: the legs' sysctl values now (:func:`read_settings`)."""
    commands: list[list[str]] = []
    keep = set()
    for vid, address in sorted(legs.items()):
        name = f"{prefix}{vid}"
        made, link = vlan_link(name, vid, trunk, links.get(name))
        commands += made
        keep.add(name)
        settings = _settings([], kernel_settings(name, address, ipv6=ipv6), kernel if link else None)
        commands += address_and_up(["ip"], name, link, address, settings)
    for name in sorted(set(links) - keep):
        commands.append(["ip", "link", "del", name])
    return commands


def namespaces(run: Runner, prefix: str) -> dict[str, Link | None]:
    """The namespaces named ``<prefix><vid>``, each with the leg of the same name inside it (None: none)."""
    found = json.loads(run(["ip", "-j", "netns", "list"]) or "[]")
    names = [e["name"] for e in found if re.fullmatch(rf"{prefix}\d{{1,4}}", e.get("name", ""))]
    return {name: current(run, prefix, name).get(name) for name in names}


def plan_namespaced(
    legs: dict[int, str],
    spaces: dict[str, Link | None],
    stray: dict[str, Link],
    *,
    trunk: str,
    prefix: str,
    kernel: dict[str, dict[str, str]],
    ipv6: bool = True,
) -> list[list[str]]:
    """``--namespaces``: the commands that give each leg a namespace of its own, ``<prefix><vid>``, with the leg
    (same name) inside — clusters may then share addresses, each bastion in its cluster's namespace
    (``bastion.py``). ``stray``: legs with the prefix left in this namespace (by a run without the flag);
    ``kernel``: each namespace's sysctl values now (:func:`read_settings`)."""
    commands = [["ip", "link", "del", name] for name in sorted(stray)]
    for vid, address in sorted(legs.items()):
        name = f"{prefix}{vid}"
        ns = ["ip", "-n", name]
        link = spaces.get(name)
        if name in spaces and (link is None or link.vid != vid):
            commands += _netns_del(name, link)  # a namespace without its leg, or made by hand
            link = None
        if link is None:
            commands += [
                ["ip", "netns", "add", name],
                ["ip", "link", "add", "link", trunk, "name", name, "type", "vlan", "id", str(vid)],
                ["ip", "link", "set", name, "netns", name],
                [*ns, "link", "set", "lo", "up"],
            ]
        wanted = kernel_settings(name, address, namespaced=True, ipv6=ipv6)  # (a moved link takes the defaults)
        settings = _settings(["ip", "netns", "exec", name], wanted, kernel.get(name, {}) if link else None)
        commands += address_and_up(ns, name, link, address, settings)
    wanted_names = {f"{prefix}{vid}" for vid in legs}
    for name in sorted(set(spaces) - wanted_names):
        commands += _netns_del(name, spaces[name])
    return commands


def _netns_del(name: str, link: Link | None) -> list[list[str]]:
    """Remove a leg's namespace — its leg first: ``ip netns del`` only drops the name, and while a process runs
    in the namespace (a bastion session of the cluster that ended) the namespace lives on, its leg with it: on
    the trunk's VLAN, which may be another cluster's by now, holding the id so that the next cluster's leg
    cannot be made."""
    return ([["ip", "-n", name, "link", "del", link.name]] if link is not None else []) + [["ip", "netns", "del", name]]


def firewall_table(prefix: str) -> str:
    return f"virtcloud_{prefix}"


def firewall_script(prefix: str) -> str:
    """The nftables commands that replace the legs' table with the rules the module docstring describes, in one
    transaction (the first line makes the table when there is none, so that deleting it never fails)."""
    legs = f'"{prefix}*"'
    rules = (
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f"    iifname {legs} ct state established,related accept\n"
        f"    iifname {legs} icmp type echo-request accept\n"
        f"    iifname {legs} icmpv6 type {{ echo-request, nd-neighbor-solicit, nd-neighbor-advert }} accept\n"
        f"    iifname {legs} drop\n"
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f"    iifname {legs} drop\n"
        f"    oifname {legs} drop\n"
        "  }\n"
    )
    digest = hashlib.sha256(rules.encode()).hexdigest()[:16]
    table = f"inet {firewall_table(prefix)}"
    return f'table {table}\ndelete table {table}\ntable {table} {{\n  comment "virtcloud-legs {digest}"\n{rules}}}\n'


def firewall_plan(run: Runner, prefix: str) -> list[list[str]]:
    """``[["nft", script]]`` when the legs' table is missing or holds other rules, else []. A LegsError when
    ``nft`` cannot be run (not installed: install nftables, or --no-firewall)."""
    try:
        run(["nft", "--version"])
    except LegsError as exc:
        raise LegsError(f"{exc} (install nftables, or run with --no-firewall)") from None
    script = firewall_script(prefix)
    marker = re.search(r'comment "virtcloud-legs [0-9a-f]+"', script)[0]
    try:
        have = run(["nft", "list", "table", "inet", firewall_table(prefix)])
    except LegsError:  # no such table
        have = ""
    return [] if marker in have else [["nft", script]]


def run_command(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)  # noqa: S603
    except OSError as exc:  # no such program (sysctl is procps'): a message, not a traceback
        raise LegsError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise LegsError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def sync(
    state_dir: Path,
    *,
    trunk: str,
    prefix: str = "vcl",
    namespaced: bool = False,
    firewall: bool = True,
    run: Runner = run_command,
) -> list[str]:
    """Make the legs (and, ``firewall``, their nftables table) match ``<state_dir>/ssh/clusters.json``; the
    changes made, as lines for the log."""
    if not PREFIX_RE.match(prefix) or not IFNAME_RE.match(trunk) or trunk.startswith(prefix):
        raise LegsError(f"bad --prefix {prefix!r} or --trunk {trunk!r}")
    try:
        doc = json.loads(SshState.at(state_dir).clusters.read_bytes())
    except (OSError, ValueError) as exc:
        raise LegsError(f"cannot read {state_dir}/ssh/clusters.json: {exc}") from None
    legs = wanted(doc)
    run(["ip", "link", "show", "dev", trunk])  # no such trunk: an error before anything changes
    done = []
    if firewall and not namespaced:  # before any leg: none comes up unprotected (nft refused: nothing changes)
        for argv in firewall_plan(run, prefix):
            run(argv)
            done.append(f"nft: table inet {firewall_table(prefix)} (only answers and pings come in on a leg)")
    links = current(run, prefix)
    names = {f"{prefix}{vid}": address for vid, address in legs.items()}
    kept = [] if namespaced else sorted(names.keys() & links.keys())  # (the new ones get every value)
    kernel = read_settings(
        run, [IPV6_FORWARDING, *(key for name in kept for key in kernel_settings(name, names[name]))]
    )
    ipv6 = IPV6_FORWARDING in kernel  # (not there: a kernel without IPv6)
    failed = []
    if not namespaced and kernel.get(IPV6_FORWARDING, "0") != "0":
        for vid, address in sorted(legs.items()):
            if ipaddress.ip_interface(address).version == 6:
                del legs[vid]  # (a leg already there is removed as stale)
                failed.append(
                    f"no leg for VLAN {vid} ({address}): {IPV6_FORWARDING} is on and IPv6 cannot turn forwarding off "
                    "per interface, so it would route between clusters; turn it off, or use --namespaces"
                )
    if namespaced:
        spaces = namespaces(run, prefix)
        kernel_of = {
            name: read_settings(run, list(kernel_settings(name, names[name], namespaced=True, ipv6=ipv6)), name)
            for name, link in spaces.items()
            if link is not None and name in names
        }
        commands = plan_namespaced(legs, spaces, links, trunk=trunk, prefix=prefix, kernel=kernel_of, ipv6=ipv6)
    else:
        commands = plan(legs, links, trunk=trunk, prefix=prefix, kernel=kernel, ipv6=ipv6)
    for argv in commands:
        try:
            run(argv)
        except LegsError as exc:  # one leg the system refuses: the others are still made (and stale ones removed)
            failed.append(str(exc))
            continue
        done.append(" ".join(argv[1:] if argv[0] == "ip" else argv))
    for a, b in [] if namespaced else overlaps(legs):
        done.append(f"warning: the networks of VLANs {a} and {b} overlap: one stack routes the overlap through one")
    if failed:
        raise LegsError("; ".join(failed), done)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="legs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--trunk", required=True, help="the interface carrying the clusters' VLANs")
    parser.add_argument("--prefix", default="vcl", help="name prefix of the legs (vcl<vid>); nothing else is touched")
    parser.add_argument("--state", default=os.environ.get("VIRTCLOUD_STATE_DIR"), help="the gateway's state directory")
    parser.add_argument(
        "--namespaces",
        action="store_true",
        help="each leg in a namespace of its own, <prefix><vid> (a bastion per cluster: bastion.py, ssh_port_base)",
    )
    parser.add_argument(
        "--no-firewall",
        action="store_true",
        help="no nftables table dropping what clusters send to the gateway itself (or route through a leg)",
    )
    args = parser.parse_args(argv)
    if not args.state:
        parser.error("--state or VIRTCLOUD_STATE_DIR is needed")
    try:
        changes = sync(
            Path(args.state),
            trunk=args.trunk,
            prefix=args.prefix,
            namespaced=args.namespaces,
            firewall=not args.no_firewall,
        )
    except LegsError as exc:
        for line in exc.done:
            print(f"virtcloud-legs: {line}")
        print(f"virtcloud-legs: {exc}", file=sys.stderr)
        return 1
    for line in changes:
        print(f"virtcloud-legs: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
