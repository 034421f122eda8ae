"""The SSH bastion's legs into closed clusters (``access/gateway/legs.py``, the reference --on-change hook).

The plan is checked here everywhere; the real thing — VLAN sub-interfaces of a trunk, their addresses, a
node reached through each, stale legs removed — needs a kernel with 802.1Q: it runs inside the QEMU guest of
``scripts/vm-lane.sh`` (``make test`` runs it) and is skipped, with the reason, on kernels without it. No
Django: the guest runs this file without the project's conftest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from access.gateway import legs
from access.gateway.legs import IPV6_FORWARDING, LegsError, Link
from access.tests._procs import vmlane_fabric

LEGS = Path(legs.__file__)


def doc(**clusters) -> dict:
    return {"format": 1, "generated_at": "now", "clusters": clusters}


def test_wanted_takes_the_clusters_with_a_vlan_and_an_address():
    assert legs.wanted(
        doc(
            a={"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []},
            b={"vlan": 200, "bastion_address": "", "nodes": []},  # no address: VPN only
            c={"vlan": None, "bastion_address": "10.2.0.254/24"},  # (an old portal)
            d={"vlan": 300, "bastion_address": "fd00:0:0:1::fe/64"},
        )
    ) == {100: "10.0.0.254/24", 300: "fd00:0:0:1::fe/64"}
    for bad in (
        doc(a={"vlan": 5000, "bastion_address": "10.0.0.1/24"}),
        doc(a={"vlan": True, "bastion_address": "10.0.0.1/24"}),
        doc(a={"vlan": 100, "bastion_address": "10.0.0.1/33"}),
        doc(a={"vlan": 100, "bastion_address": "10.0.0.1/24"}, b={"vlan": 100, "bastion_address": "10.1.0.1/24"}),
        {"format": 2, "clusters": {}},
    ):
        with pytest.raises(LegsError):
            legs.wanted(bad)


def test_plan_creates_readdresses_and_removes_only_its_own_links():
    links = {
        "vcl100": Link("vcl100", 100, "eth1", frozenset({"10.0.0.254/24"}), up=True),  # as wanted
        "vcl200": Link("vcl200", 200, "eth1", frozenset({"10.1.0.9/24", "10.1.0.8/24"}), up=False),
        "vcl300": Link("vcl300", 300, "eth1", frozenset(), up=True),  # its cluster ended
        "vcl400": Link("vcl400", 999, "eth1", frozenset(), up=True),  # made by hand with another VLAN
    }
    wanted = {100: "10.0.0.254/24", 200: "10.1.0.8/24", 400: "10.4.0.1/24", 500: "10.5.0.1/24"}
    kernel = {**_no_forwarding("vcl100"), **_no_forwarding("vcl200"), "net.ipv4.conf.vcl200.forwarding": "1"}

    def no_forwarding(name):
        keys = ["net.ipv4.conf.{}.forwarding=0", "net.ipv6.conf.{}.forwarding=0", "net.ipv6.conf.{}.disable_ipv6=1"]
        return ["sysctl", "-w", *(key.format(name) for key in keys)]

    assert legs.plan(wanted, links, trunk="eth1", prefix="vcl", kernel=kernel) == [
        ["ip", "addr", "del", "10.1.0.9/24", "dev", "vcl200"],
        ["sysctl", "-w", "net.ipv4.conf.vcl200.forwarding=0"],  # turned on by hand
        ["ip", "link", "set", "vcl200", "up"],
        ["ip", "link", "del", "vcl400"],
        ["ip", "link", "add", "link", "eth1", "name", "vcl400", "type", "vlan", "id", "400"],
        no_forwarding("vcl400"),  # a new leg: before it has an address and is up
        ["ip", "addr", "add", "10.4.0.1/24", "dev", "vcl400"],
        ["ip", "link", "set", "vcl400", "up"],
        ["ip", "link", "add", "link", "eth1", "name", "vcl500", "type", "vlan", "id", "500"],
        no_forwarding("vcl500"),
        ["ip", "addr", "add", "10.5.0.1/24", "dev", "vcl500"],
        ["ip", "link", "set", "vcl500", "up"],
        ["ip", "link", "del", "vcl300"],
    ]
    done = {name: link for name, link in links.items() if name in ("vcl100",)}
    assert legs.plan({100: "10.0.0.254/24"}, done, trunk="eth1", prefix="vcl", kernel=kernel) == []  # idempotent
    assert legs.overlaps({1: "10.0.0.1/24", 2: "10.0.0.2/16", 3: "10.9.0.1/24", 4: "fd00::1/64"}) == [(2, 1)]


def _no_forwarding(name: str, *, scopes: tuple[str, ...] = (), ipv4_leg: bool = True) -> dict[str, str]:
    """The sysctl values of leg ``name`` (and of ``scopes``: "all", "default") as the hook leaves them."""
    values = {f"net.{family}.conf.{scope}.forwarding": "0" for family in ("ipv4", "ipv6") for scope in (*scopes, name)}
    return {**values, f"net.ipv6.conf.{name}.disable_ipv6": "1" if ipv4_leg else "0"}


def test_a_leg_the_system_refuses_does_not_stop_the_others(tmp_path):
    """One cluster's leg fails (the kernel refuses its address): the other clusters still get theirs and the
    stale leg is still removed; the hook then fails, naming what it could not do, so the pull runs it again."""
    (tmp_path / "ssh").mkdir()
    clusters = {
        "a": {"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []},
        "b": {"vlan": 200, "bastion_address": "10.1.0.254/24", "nodes": []},
    }
    (tmp_path / "ssh" / "clusters.json").write_text(json.dumps({"format": 1, "clusters": clusters}))
    stale = [
        {
            "ifname": "vcl300",
            "flags": ["UP"],
            "link": "eth1",
            "linkinfo": {"info_kind": "vlan", "info_data": {"id": 300}},
        }
    ]
    ran: list[list[str]] = []

    def run(argv):
        argv = list(argv)
        if argv[:3] == ["ip", "-j", "-d"]:
            return json.dumps(stale)
        if argv[:2] == ["ip", "-j"]:
            return "[]"
        if argv == ["ip", "addr", "add", "10.0.0.254/24", "dev", "vcl100"]:
            raise legs.LegsError("ip addr add 10.0.0.254/24 dev vcl100: RTNETLINK answers: File exists")
        ran.append(argv)
        return ""

    with pytest.raises(legs.LegsError, match="vcl100: RTNETLINK") as failed:
        legs.sync(tmp_path, trunk="eth1", run=run)
    assert ["ip", "addr", "add", "10.1.0.254/24", "dev", "vcl200"] in ran
    assert ["ip", "link", "set", "vcl200", "up"] in ran and ["ip", "link", "del", "vcl300"] in ran
    assert "link del vcl300" in failed.value.done


class FakeStack:
    """The gateway's network stack as the hook sees it through its runner: VLAN links of trunk eth1, their global
    addresses and the kernel's sysctl values. A link it makes takes the stack's defaults, as the kernel does: on
    a gateway that routes (ip_forward=1), forwarding on. ``ipv6=None``: a kernel without IPv6."""

    def __init__(self, *, ipv6: str | None = "0"):
        self.links: dict[str, dict] = {}
        self.sysctl = {"net.ipv4.ip_forward": "1", "net.ipv4.conf.default.forwarding": "1"}
        if ipv6 is not None:
            self.sysctl |= {IPV6_FORWARDING: ipv6, "net.ipv6.conf.default.forwarding": ipv6}
            self.sysctl["net.ipv6.conf.default.disable_ipv6"] = "0"
        self.refuse: set[str] = set()  # keys whose write the kernel refuses
        self.writes: list[list[str]] = []
        self.nft: dict[str, str] | None = {}  # table → what `nft list table` prints; None: nftables not installed

    def add(self, name: str, vid: int, *addresses: str, up: bool = True) -> None:
        self.links[name] = {"vid": vid, "addresses": set(addresses), "up": up}
        for key in ("ipv4.conf.{}.forwarding", "ipv6.conf.{}.forwarding", "ipv6.conf.{}.disable_ipv6"):
            default = f"net.{key.format('default')}"
            if default in self.sysctl:
                self.sysctl[f"net.{key.format(name)}"] = self.sysctl[default]

    def __call__(self, argv) -> str:
        match list(argv):
            case ["ip", "link", "show", "dev", "eth1"]:
                return ""
            case ["ip", "-j", "-d", "link", "show"]:
                return json.dumps(
                    [
                        {
                            "ifname": name,
                            "link": "eth1",
                            "flags": ["UP"] if link["up"] else [],
                            "linkinfo": {"info_kind": "vlan", "info_data": {"id": link["vid"]}},
                        }
                        for name, link in self.links.items()
                    ]
                )
            case ["ip", "-j", "addr", "show"]:
                entries = []
                for name, link in self.links.items():
                    infos = []
                    for address in sorted(link["addresses"]):
                        local, prefixlen = address.split("/")
                        family = "inet6" if ":" in local else "inet"
                        infos.append({"family": family, "local": local, "prefixlen": int(prefixlen), "scope": "global"})
                    entries.append({"ifname": name, "addr_info": infos})
                return json.dumps(entries)
            case ["sysctl", "-e", *keys]:
                return "".join(f"{key} = {self.sysctl[key]}\n" for key in keys if key in self.sysctl)
            case ["sysctl", "-w", *assignments]:
                self.writes.append(assignments)
                refused = []
                for assignment in assignments:
                    key, _, value = assignment.partition("=")
                    if key in self.refuse or key not in self.sysctl:
                        refused.append(f"sysctl: permission denied on key '{key}'")
                    else:
                        self.sysctl[key] = value
                if refused:
                    raise LegsError(f"{' '.join(argv)}: {'; '.join(refused)}")
            case ["ip", "link", "add", "link", "eth1", "name", name, "type", "vlan", "id", vid]:
                self.add(name, int(vid), up=False)
            case ["ip", "addr", "add", address, "dev", name]:
                self.links[name]["addresses"].add(address)
            case ["ip", "addr", "del", address, "dev", name]:
                self.links[name]["addresses"].remove(address)
            case ["ip", "link", "set", name, "up"]:
                self.links[name]["up"] = True
            case ["ip", "link", "del", name]:
                del self.links[name]
                self.sysctl = {key: value for key, value in self.sysctl.items() if f".{name}." not in key}
            case ["nft", *_] if self.nft is None:
                raise LegsError("nft --version: [Errno 2] No such file or directory: 'nft'")
            case ["nft", "--version"]:
                return "nftables v1.0.6 (Lester Gooch #5)\n"
            case ["nft", "list", "table", "inet", table]:
                if table not in self.nft:
                    raise LegsError(f"nft list table inet {table}: Error: No such file or directory")
                return self.nft[table]
            case ["nft", script]:
                table = re.search(r"^table inet (\S+) \{$", script, re.M)[1]
                self.nft[table] = script.split(f"table inet {table} {{", 1)[1]  # (a listing holds the body)
            case other:
                raise AssertionError(f"unexpected command {other}")
        return ""

    def forwarding(self, name: str) -> tuple[str, ...]:
        """IPv4 forwarding, IPv6 forwarding and disable_ipv6 of leg ``name``."""
        keys = ("net.ipv4.conf.{}.forwarding", "net.ipv6.conf.{}.forwarding", "net.ipv6.conf.{}.disable_ipv6")
        return tuple(self.sysctl.get(key.format(name)) for key in keys)


def _clusters(state: Path, **clusters: str) -> None:
    """``ssh/clusters.json`` with a cluster per VLAN: name="vid address"."""
    (state / "ssh").mkdir(exist_ok=True)
    entries = {
        name: {"vlan": int(leg.split()[0]), "bastion_address": leg.split()[1], "nodes": []}
        for name, leg in clusters.items()
    }
    (state / "ssh" / "clusters.json").write_text(json.dumps({"format": 1, "clusters": entries}))


def test_no_leg_forwards_what_it_receives_on_a_gateway_that_routes(tmp_path):
    """ip_forward=1 on the gateway: a new leg gets forwarding off before it has an address or is up; a leg whose
    forwarding someone turned on by hand gets it off again (said in a change line); a leg already as wanted is
    not written to, and a run with nothing to change prints nothing."""
    gw = FakeStack()
    gw.add("vcl200", 200, "198.18.2.254/24")  # made by an earlier run, forwarding off
    gw.sysctl |= _no_forwarding("vcl200")
    _clusters(tmp_path, a="100 198.18.1.254/24", b="200 198.18.2.254/24")

    done = legs.sync(tmp_path, trunk="eth1", run=gw)
    off = (
        "sysctl -w net.ipv4.conf.vcl100.forwarding=0 net.ipv6.conf.vcl100.forwarding=0 "
        "net.ipv6.conf.vcl100.disable_ipv6=1"
    )
    assert done == [
        "nft: table inet virtcloud_vcl (only answers and pings come in on a leg)",
        "link add link eth1 name vcl100 type vlan id 100",
        off,
        "addr add 198.18.1.254/24 dev vcl100",
        "link set vcl100 up",
    ]
    assert gw.forwarding("vcl100") == ("0", "0", "1") and gw.forwarding("vcl200") == ("0", "0", "1")
    assert gw.sysctl["net.ipv4.ip_forward"] == "1"  # the gateway's own switch is the operator's

    gw.sysctl["net.ipv4.conf.vcl200.forwarding"] = "1"  # by hand (or ip_forward went from 0 to 1)
    gw.writes.clear()
    assert legs.sync(tmp_path, trunk="eth1", run=gw) == ["sysctl -w net.ipv4.conf.vcl200.forwarding=0"]
    assert gw.forwarding("vcl200") == ("0", "0", "1")

    gw.writes.clear()
    assert legs.sync(tmp_path, trunk="eth1", run=gw) == [] and gw.writes == []


def test_the_legs_table_comes_first_is_rewritten_when_it_differs_and_nft_missing_changes_nothing(tmp_path):
    """The nftables table is in place before any leg comes up; a table someone changed by hand (its digest gone)
    is replaced, one left as the hook made it is not touched; without nft the hook fails before making a leg,
    and --no-firewall (firewall=False) leaves nftables alone."""
    gw = FakeStack()
    _clusters(tmp_path, a="100 198.18.1.254/24")
    ran = []
    legs.sync(tmp_path, trunk="eth1", run=lambda argv: ran.append(list(argv)) or gw(argv))
    first_nft = next(i for i, argv in enumerate(ran) if argv[0] == "nft" and len(argv) == 2 and argv[1] != "--version")
    first_link = next(i for i, argv in enumerate(ran) if argv[:3] == ["ip", "link", "add"])
    assert first_nft < first_link
    script = ran[first_nft][1]
    assert 'iifname "vcl*" ct state established,related accept' in script
    assert 'iifname "vcl*" drop' in script and 'oifname "vcl*" drop' in script
    assert script.startswith("table inet virtcloud_vcl\ndelete table inet virtcloud_vcl\n")  # one transaction

    assert legs.sync(tmp_path, trunk="eth1", run=gw) == []
    gw.nft["virtcloud_vcl"] = "\n  chain input {\n  }\n}\n"  # flushed by hand
    assert legs.sync(tmp_path, trunk="eth1", run=gw) == [
        "nft: table inet virtcloud_vcl (only answers and pings come in on a leg)"
    ]

    bare = FakeStack()
    bare.nft = None
    with pytest.raises(LegsError, match="install nftables, or run with --no-firewall"):
        legs.sync(tmp_path, trunk="eth1", run=bare)
    assert bare.links == {}
    assert "link add link eth1 name vcl100 type vlan id 100" in legs.sync(
        tmp_path, trunk="eth1", run=bare, firewall=False
    )


def test_a_refused_forwarding_write_fails_the_hook(tmp_path):
    """The kernel refuses a value (a read-only /proc/sys): the hook fails, naming it, like a refused ``ip``
    command — the other leg is still made, and the pull runs the hook again."""
    gw = FakeStack()
    gw.refuse.add("net.ipv4.conf.vcl100.forwarding")
    _clusters(tmp_path, a="100 198.18.1.254/24", b="200 198.18.2.254/24")
    with pytest.raises(LegsError, match=r"permission denied on key 'net\.ipv4\.conf\.vcl100\.forwarding'") as failed:
        legs.sync(tmp_path, trunk="eth1", run=gw)
    assert "link set vcl200 up" in failed.value.done and gw.forwarding("vcl200") == ("0", "0", "1")


def test_an_ipv6_leg_needs_ipv6_forwarding_off_in_the_shared_stack(tmp_path):
    """IPv6 forwards by net.ipv6.conf.all.forwarding alone (a leg's own forwarding=0 does not stop it): while it
    is on, the shared stack gets no leg holding an IPv6 address — one already there is removed — and the hook
    fails saying so; IPv4 legs still come up, without IPv6. Once it is off, the IPv6 leg is made."""
    gw = FakeStack(ipv6="1")
    gw.add("vcl300", 300, "fd00:3::fe/64")  # made while IPv6 forwarding was off
    gw.sysctl |= _no_forwarding("vcl300", ipv4_leg=False)
    _clusters(tmp_path, a="100 198.18.1.254/24", c="300 fd00:3::fe/64")
    with pytest.raises(
        LegsError, match=r"no leg for VLAN 300 \(fd00:3::fe/64\): net\.ipv6\.conf\.all\.forwarding is on"
    ):
        legs.sync(tmp_path, trunk="eth1", run=gw)
    assert set(gw.links) == {"vcl100"} and gw.forwarding("vcl100") == ("0", "0", "1")

    gw.sysctl[IPV6_FORWARDING] = "0"
    assert "link add link eth1 name vcl300 type vlan id 300" in legs.sync(tmp_path, trunk="eth1", run=gw)
    assert gw.forwarding("vcl300") == ("0", "0", "0")  # IPv6 stays on where the cluster uses it


def test_a_kernel_without_ipv6_gets_the_ipv4_values_only(tmp_path):
    gw = FakeStack(ipv6=None)
    _clusters(tmp_path, a="100 198.18.1.254/24")
    assert "sysctl -w net.ipv4.conf.vcl100.forwarding=0" in legs.sync(tmp_path, trunk="eth1", run=gw)
    assert gw.forwarding("vcl100") == ("0", None, None)
    assert legs.sync(tmp_path, trunk="eth1", run=gw) == []


# --- the real thing (a kernel with 802.1Q: the QEMU guest) -----------------------------------------------------


fabric = vmlane_fabric()
PREFIX = fabric.make_prefix("lg")
_missing = fabric.kernel_8021q_missing(PREFIX)


def _ip(ns: str, *argv: str, check: bool = True) -> str:
    return fabric.run(["ip", "-n", ns, *argv], check=check).stdout


@pytest.fixture
def trunk():
    """The gateway's namespace with trunk t0, wired to a "switch" namespace where two clusters' nodes answer on
    VLANs 100 (10.0.0.1) and 200 (10.1.0.1) of the other end."""
    if _missing:
        if os.environ.get("VIRTCLOUD_VMLANE"):
            pytest.fail(f"the QEMU guest must have 802.1Q: {_missing}")
        pytest.skip(f"{_missing}; these tests run in the QEMU guest of scripts/vm-lane.sh (make test runs it)")
    fabric.remove_stale()
    nodes = {100: "10.0.0.1/24", 200: "10.1.0.1/24"}
    with fabric.trunk_pair(f"{PREFIX}gw", f"{PREFIX}sw", nodes, near_batch="link add other type dummy\n") as gw:
        yield gw


def _sync(ns: str, state: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-I", str(LEGS), "--trunk", "t0", "--state", str(state), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _write(state: Path, **clusters) -> None:
    (state / "ssh").mkdir(parents=True, exist_ok=True)
    (state / "ssh" / "clusters.json").write_text(json.dumps(doc(**clusters)))


def _addresses(ns: str, dev: str) -> set[str]:
    entries = json.loads(_ip(ns, "-j", "addr", "show", "dev", dev) or "[]")
    return {f"{a['local']}/{a['prefixlen']}" for e in entries for a in e["addr_info"] if a.get("scope") == "global"}


def _reaches(ns: str, address: str) -> bool:
    done = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "2", address], capture_output=True)
    return done.returncode == 0


def _proc(ns: str, path: str) -> str:
    """``/proc/sys/<path>`` as namespace ``ns`` sees it."""
    return fabric.run(["ip", "netns", "exec", ns, "cat", f"/proc/sys/{path}"]).stdout.strip()


@pytest.mark.vmlane
def test_legs_reach_each_clusters_nodes_and_follow_the_state(trunk, tmp_path):
    gw = trunk
    _write(
        tmp_path,
        alpha={"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []},
        beta={"vlan": 200, "bastion_address": "10.1.0.254/24", "nodes": []},
        gamma={"vlan": 300, "bastion_address": "", "nodes": []},  # VPN only: no leg
    )
    done = _sync(gw, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "link add link t0 name vcl100 type vlan id 100" in done.stdout
    assert _addresses(gw, "vcl100") == {"10.0.0.254/24"} and _addresses(gw, "vcl200") == {"10.1.0.254/24"}
    assert _reaches(gw, "10.0.0.1") and _reaches(gw, "10.1.0.1")  # each cluster's node, through its VLAN
    assert "vcl300" not in _ip(gw, "link", "show")

    again = _sync(gw, tmp_path)
    assert (again.returncode, again.stdout) == (0, "")  # nothing to change

    # beta ended; alpha's scheduler moved the bastion's address; someone made vcl300 by hand.
    _ip(gw, "link", "add", "link", "t0", "name", "vcl300", "type", "vlan", "id", "300")
    _write(tmp_path, alpha={"vlan": 100, "bastion_address": "10.0.0.253/24", "nodes": []})
    done = _sync(gw, tmp_path)
    assert done.returncode == 0, done.stderr
    links = _ip(gw, "link", "show")
    assert "vcl200" not in links and "vcl300" not in links and "other" in links  # only its own links go
    assert _addresses(gw, "vcl100") == {"10.0.0.253/24"}
    assert _reaches(gw, "10.0.0.1") and not _reaches(gw, "10.1.0.1")

    # A trunk that is not there (a typo in the hook's command line): exit 1 naming it, nothing changed; the
    # pull runs the hook again at its next run.
    bad = subprocess.run(
        ["ip", "netns", "exec", gw, sys.executable, "-I", str(LEGS), "--trunk", "t9", "--state", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1 and "virtcloud-legs: ip link show dev t9" in bad.stderr, bad.stderr
    assert _addresses(gw, "vcl100") == {"10.0.0.253/24"}


@pytest.mark.vmlane
def test_a_gateway_that_routes_carries_nothing_from_one_cluster_to_another(trunk, tmp_path):
    """ip_forward=1 on the gateway (as beside OpenVPN): a node of cluster A routing through the bastion's address
    in A reaches nothing of cluster B — by the legs' forwarding=0 alone (--no-firewall), and by the nftables table
    alone (forwarding turned on by hand). With both gone it would (so the lab can route and the check can fail);
    the hook's next run puts both back."""
    gw = trunk
    sw = gw[: -len("gw")] + "sw"
    nodes = {vid: f"{PREFIX}f{vid}" for vid in (100, 200)}  # each cluster's node: 198.18.1.1, 198.18.2.1
    try:
        for vid, node in nodes.items():
            fabric.run(["ip", "netns", "add", node])
            fabric.run(["ip", "-n", sw, "link", "set", f"t0.{vid}", "netns", node])
            net = f"198.18.{vid // 100}"
            fabric.run(
                ["ip", "-n", node, "-batch", "-"],
                input=f"addr flush dev t0.{vid}\naddr add {net}.1/24 dev t0.{vid}\nlink set t0.{vid} up\n"
                f"link set lo up\nroute add default via {net}.254\n",
            )
        fabric.run(["ip", "netns", "exec", gw, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _write(
            tmp_path,
            a={"vlan": 100, "bastion_address": "198.18.1.254/24", "nodes": []},
            b={"vlan": 200, "bastion_address": "198.18.2.254/24", "nodes": []},
        )
        done = _sync(gw, tmp_path, "--no-firewall")
        assert done.returncode == 0, done.stderr
        assert "nft" not in done.stdout
        assert _proc(gw, "net/ipv4/ip_forward") == "1"  # the gateway's own switch stays the operator's
        for leg in ("vcl100", "vcl200"):
            assert _proc(gw, f"net/ipv4/conf/{leg}/forwarding") == "0"
            assert _proc(gw, f"net/ipv6/conf/{leg}/disable_ipv6") == "1"  # an IPv4 leg: no IPv6 to forward
        node_a = nodes[100]
        assert _reaches(node_a, "198.18.1.254")  # its bastion leg answers
        assert not _reaches(node_a, "198.18.2.1")  # B's node, through the bastion: no

        def forward_by_hand():
            for leg in ("vcl100", "vcl200"):
                fabric.run(["ip", "netns", "exec", gw, "sysctl", "-qw", f"net.ipv4.conf.{leg}.forwarding=1"])

        forward_by_hand()
        assert _reaches(node_a, "198.18.2.1")  # the control: the lab routes
        done = _sync(gw, tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "virtcloud-legs: nft: table inet virtcloud_vcl (only answers and pings come in on a leg)",
            "virtcloud-legs: sysctl -w net.ipv4.conf.vcl100.forwarding=0",
            "virtcloud-legs: sysctl -w net.ipv4.conf.vcl200.forwarding=0",
        ]
        assert not _reaches(node_a, "198.18.2.1")

        forward_by_hand()
        assert not _reaches(node_a, "198.18.2.1")  # the table drops what would be routed through a leg
        fabric.run(["ip", "netns", "exec", gw, "nft", "delete", "table", "inet", "virtcloud_vcl"])
        assert _reaches(node_a, "198.18.2.1")
        done = _sync(gw, tmp_path)
        assert done.returncode == 0 and len(done.stdout.splitlines()) == 3, done
        assert not _reaches(node_a, "198.18.2.1")
    finally:
        for node in nodes.values():
            fabric.run(["ip", "netns", "del", node], check=False)


@pytest.mark.vmlane
def test_a_clusters_nodes_reach_none_of_the_gateways_own_services_but_the_bastion_reaches_them(trunk, tmp_path):
    """A service listening on every address of the gateway (its sshd, an agent) is out of reach of the clusters'
    nodes on the legs' addresses, while the gateway's own connections to the nodes (the bastion's) are answered,
    and a node can ping its leg. With --no-firewall (the control) the node gets through."""
    gw = trunk
    sw = gw[: -len("gw")] + "sw"
    serve = (
        "import socket,sys\ns=socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
        "while True:\n    c,_=s.accept(); c.sendall(b'hello\\n'); c.close()\n"
    )
    services = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", serve, "7070"]) for ns in (gw, sw)]

    def connects(ns: str, address: str) -> bool:
        probe = f"import socket\nsocket.create_connection(('{address}', 7070), 2).recv(6)"
        return (
            subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", probe], capture_output=True).returncode
            == 0
        )

    try:
        _write(tmp_path, a={"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []})
        done = _sync(gw, tmp_path, "--no-firewall")
        assert done.returncode == 0, done.stderr
        assert fabric_wait(lambda: connects(sw, "10.0.0.254"))  # the control: the node reaches the service

        done = _sync(gw, tmp_path)
        assert done.returncode == 0 and "nft: table inet virtcloud_vcl" in done.stdout, done
        assert not connects(sw, "10.0.0.254")  # the gateway's own service: dropped on the leg
        assert connects(gw, "10.0.0.1")  # the bastion's way to the node: its answers come back in
        assert _reaches(sw, "10.0.0.254")  # a ping to the leg is answered
    finally:
        for proc in services:
            proc.kill()
            proc.wait()


def fabric_wait(predicate, tries: int = 50) -> bool:
    """``predicate()`` true within ``tries`` tenths of a second (a server just started)."""
    for _ in range(tries):
        if predicate():
            return True
        subprocess.run(["sleep", "0.1"], check=False)
    return False


def test_plan_namespaced_gives_each_leg_a_namespace_of_its_own():
    spaces = {
        "vcl100": Link("vcl100", 100, "", frozenset({"10.0.0.254/24"}), up=True),  # as wanted
        "vcl200": None,  # a namespace whose leg is gone
        "vcl300": Link("vcl300", 300, "", frozenset(), up=True),  # its cluster ended
    }
    stray = {"vcl400": Link("vcl400", 400, "eth1", frozenset(), up=True)}  # from a run without --namespaces
    wanted = {100: "10.0.0.254/24", 200: "10.0.0.254/24"}  # the same address: fine, one namespace each
    # vcl100's namespace took the gateway's ip_forward=1 when it was made (a new namespace inherits IPv4's)
    kernel = {"vcl100": {**_no_forwarding("vcl100", scopes=("all", "default")), "net.ipv4.conf.all.forwarding": "1"}}
    in_ns = ["ip", "netns", "exec", "vcl200", "sysctl", "-w"]
    assert legs.plan_namespaced(wanted, spaces, stray, trunk="eth1", prefix="vcl", kernel=kernel) == [
        ["ip", "link", "del", "vcl400"],
        ["ip", "netns", "exec", "vcl100", "sysctl", "-w", "net.ipv4.conf.all.forwarding=0"],
        ["ip", "netns", "del", "vcl200"],
        ["ip", "netns", "add", "vcl200"],
        ["ip", "link", "add", "link", "eth1", "name", "vcl200", "type", "vlan", "id", "200"],
        ["ip", "link", "set", "vcl200", "netns", "vcl200"],
        ["ip", "-n", "vcl200", "link", "set", "lo", "up"],
        [*in_ns, *(f"{key}={value}" for key, value in _no_forwarding("vcl200", scopes=("all", "default")).items())],
        ["ip", "-n", "vcl200", "addr", "add", "10.0.0.254/24", "dev", "vcl200"],
        ["ip", "-n", "vcl200", "link", "set", "vcl200", "up"],
        ["ip", "-n", "vcl300", "link", "del", "vcl300"],  # (the leg first: a live session keeps the namespace)
        ["ip", "netns", "del", "vcl300"],
    ]
    kernel["vcl100"]["net.ipv4.conf.all.forwarding"] = "0"
    only_100 = {"vcl100": spaces["vcl100"]}
    assert legs.plan_namespaced({100: "10.0.0.254/24"}, only_100, {}, trunk="eth1", prefix="vcl", kernel=kernel) == []


@pytest.mark.vmlane
def test_legs_in_namespaces_tell_apart_clusters_with_the_same_addresses(trunk, tmp_path):
    """--namespaces: two clusters with the same network and node address, each leg in its own namespace,
    reach each its own node (told apart by MAC); a cluster that ended takes its namespace with it."""
    gw = trunk
    sw = gw[: -len("gw")] + "sw"
    # In the "switch", each VLAN's node in a namespace of its own, both 10.0.0.2/24.
    macs = {}
    for vid in (100, 200):
        node = f"{PREFIX}n{vid}"
        fabric.run(["ip", "netns", "add", node])
        fabric.run(["ip", "-n", sw, "link", "set", f"t0.{vid}", "netns", node])
        fabric.run(
            ["ip", "-n", node, "-batch", "-"],
            input=f"addr flush dev t0.{vid}\naddr add 10.0.0.2/24 dev t0.{vid}\nlink set t0.{vid} up\nlink set lo up\n",
        )
        macs[vid] = json.loads(_ip(node, "-j", "link", "show", "dev", f"t0.{vid}"))[0]["address"]
    # (nsenter, not `ip netns exec`: that one runs the hook in a mount namespace of its own, where the
    # namespaces the hook makes would not outlive it — the hook runs in the gateway's own, as --on-change does)
    prefix = "vct"
    try:
        _write(
            tmp_path,
            a={"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []},
            b={"vlan": 200, "bastion_address": "10.0.0.254/24", "nodes": []},
        )
        args = ["--trunk", "t0", "--state", str(tmp_path), "--prefix", prefix, "--namespaces"]
        hook = ["nsenter", f"--net=/run/netns/{gw}", sys.executable, "-I", str(LEGS), *args]
        done = subprocess.run(hook, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "overlap" not in done.stdout  # each in its own stack
        for vid in (100, 200):
            assert _reaches(f"{prefix}{vid}", "10.0.0.2")
            neigh = json.loads(_ip(f"{prefix}{vid}", "-j", "neigh", "show", "10.0.0.2"))
            assert neigh[0]["lladdr"] == macs[vid]  # its own cluster's node
        again = subprocess.run(hook, capture_output=True, text=True, timeout=60)
        assert (again.returncode, again.stdout) == (0, "")

        # ip_forward going from 0 to 1 in a leg's namespace turns forwarding on for all of it: the next run turns
        # it off again (all, default and the leg)
        ns = f"{prefix}100"
        fabric.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        done = subprocess.run(hook, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == (
            f"virtcloud-legs: netns exec {ns} sysctl -w net.ipv4.conf.all.forwarding=0 "
            f"net.ipv4.conf.default.forwarding=0 net.ipv4.conf.{ns}.forwarding=0\n"
        )
        assert _proc(ns, "net/ipv4/ip_forward") == "0" == _proc(ns, f"net/ipv4/conf/{ns}/forwarding")
        assert _proc(ns, "net/ipv6/conf/all/forwarding") == "0"

        # cluster b ends while a bastion session still runs in its namespace: the name goes, and the leg with
        # it (the namespace itself lives on with the session; its leg on VLAN 200 must not)
        session = subprocess.Popen(["ip", "netns", "exec", f"{prefix}200", "sleep", "60"])
        try:
            _write(tmp_path, a={"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []})
            done = subprocess.run(hook, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            names = fabric.run(["ip", "netns", "list"]).stdout
            assert f"{prefix}100" in names and f"{prefix}200" not in names
            inside = ["nsenter", f"--net=/proc/{session.pid}/ns/net", "ip", "-o", "link", "show"]
            assert f"{prefix}200" not in fabric.run(inside).stdout  # the session's namespace has no leg left
        finally:
            session.kill()
            session.wait(10)
    finally:
        for name in (f"{prefix}100", f"{prefix}200", f"{PREFIX}n100", f"{PREFIX}n200"):
            fabric.run(["ip", "netns", "del", name], check=False)


def test_the_bastion_keeps_its_listeners_while_the_cluster_map_cannot_be_read(tmp_path):
    """bastion.py listens on base + VLAN for each cluster with a leg; a malformed (or missing) clusters.json does
    not mean the clusters left: it says so once and keeps listening; a readable one without the cluster closes."""
    import io
    import socket

    from access.gateway import bastion

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    (tmp_path / "ssh").mkdir()
    clusters = tmp_path / "ssh" / "clusters.json"
    leg = {"vlan": 100, "bastion_address": "10.0.0.254/24", "nodes": []}
    clusters.write_text(json.dumps({"format": 1, "clusters": {"c7": leg}}))
    log = io.StringIO()
    b = bastion.Bastion(tmp_path, listen="127.0.0.1", base=port - 100, netns="vcl{vid}", sshd="/usr/sbin/sshd", log=log)
    try:
        b.sync()
        assert set(b.listeners) == {port} and f"port {port}: cluster c7 (VLAN 100)" in log.getvalue()
        clusters.write_text("{half a file")
        b.sync()
        b.sync()
        assert set(b.listeners) == {port}
        assert log.getvalue().count("the listeners stay as they are") == 1
        # c7's sshd admits only c7's principals: the principals command its configuration gives sshd (the one
        # sshd really takes — a `-o` on its command line loses to the file's) is told the cluster
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")], check=True)
        (tmp_path / "sshd_config").write_text(
            f"HostKey {tmp_path}/hk\nAuthorizedPrincipalsCommand /bin/false %u\n"
            "AuthorizedPrincipalsCommandUser nobody\n"
        )
        os.makedirs(bastion.PRIVSEP_DIR, mode=0o755, exist_ok=True)  # as bastion.py makes it (a fresh guest has none)
        shown = subprocess.run(
            ["/usr/sbin/sshd", "-T", "-f", str(b.cluster_config("c7"))], capture_output=True, text=True, check=False
        )
        assert shown.returncode == 0, shown.stderr
        effective = shown.stdout
        assert f"authorizedprincipalscommand {tmp_path}/ssh/principals-command %u %s c7\n" in effective
        clusters.write_text(json.dumps({"format": 1, "clusters": {}}))
        b.sync()
        assert b.listeners == {} and f"port {port}: closed (its cluster left the state)" in log.getvalue()
    finally:
        for sock in b.listeners.values():
            sock.close()
