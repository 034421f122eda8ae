"""The netns lab: life cycle (prefix, cleanup of crashed runs), and the paper's promise proven with packets —
three sites, two hosts each, three clusters using the same IP subnet and the same addresses: VMs of one
cluster reach each other across sites, VMs of different clusters never do (ping, ARP, broadcast leaks), and
the core carries the expected tags (802.1Q, and 802.1ad outer tags on a QinQ core). VLANs are set up only
through the drivers (``switch_session`` / ``host_session`` with the desired state)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from network.drivers import switch_session
from network.lab import Lab, LabError, all_labs, arping, broadcast, capture, clean_stale, ping_many, topology
from network.lab.fabric import _alive

pytestmark = pytest.mark.lab

CLUSTERS = {"a": 100, "b": 101, "c": 102}
HOSTS = [f"h-s{s}-{h}" for s in (1, 2, 3) for h in (1, 2)]


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.fixture
def run_root(tmp_path):
    """A private run root; whatever a failing test left running there is taken down afterwards."""
    root = tmp_path / "labs"
    yield root
    for leftover in all_labs(root):
        leftover.down()


# --- life cycle ---------------------------------------------------------------------------------------------------


def test_up_and_down_leave_nothing_behind(run_root):
    started = time.monotonic()
    lab = Lab.up(topology.generate(sites=2, hosts_per_site=1, core_kind="dot1q"), run_root=run_root)
    up_time = time.monotonic() - started
    pids = dict(lab.state["pids"])
    assert all(_alive(pid, str(lab.run_dir)) for pid in pids.values())
    ours = [ns for ns in netns_list() if ns.startswith(lab.prefix)]
    assert sorted(ours) == sorted([lab.ovs_ns, lab.gw_ns])
    links = subprocess.run(["ip", "-n", lab.ovs_ns, "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    # ovs-netdev: the userspace datapath's own tap, created by ovs-vswitchd inside the lab namespace
    assert all(n in ("lo", "ovs-netdev") or (n.startswith(lab.prefix) and len(n) <= 15) for n in names), names
    assert lab.status()["daemons"] == {"ovsdb-server": True, "ovs-vswitchd": True}
    lab.down()
    assert not [ns for ns in netns_list() if ns.startswith(lab.prefix)]
    assert not lab.run_dir.exists()
    assert not any(_alive(pid, str(lab.run_dir)) for pid in pids.values())
    assert up_time < 5, f"lab up took {up_time:.2f} s"


def test_owned_ports_start_with_no_vlans(run_root):
    """The lab never pre-configures cluster VLANs: every owned port is an empty trunk until a driver acts."""
    from network.drivers import host_session

    lab = Lab.up(topology.generate(sites=2, hosts_per_site=2), run_root=run_root)
    try:
        for switch in ("sw-s1", "sw-s2"):
            with switch_session(lab.switch_spec(switch)) as session:
                assert session.port_vlans() == {p: frozenset() for p in ("p-h1", "p-h2", "up")} | (
                    {"gw": frozenset()} if switch == "sw-s1" else {}
                )
        for host in ("h-s1-1", "h-s2-2"):
            with host_session(lab.host_spec(host)) as session:
                assert session.vlans() == frozenset()
    finally:
        lab.down()


def test_next_up_cleans_a_crashed_run(run_root):
    crashed = Lab.up(topology.generate(sites=2, hosts_per_site=1), run_root=run_root, persistent=True)
    for pid in crashed.state["pids"].values():  # the machine "crashed": daemons gone, state left behind
        os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if not any(_alive(pid, str(crashed.run_dir)) for pid in crashed.state["pids"].values()):
            break
        time.sleep(0.02)
    orphan_ns = [ns for ns in netns_list() if ns.startswith(crashed.prefix)]
    assert orphan_ns
    assert crashed.is_stale()
    fresh = Lab.up(topology.generate(sites=2, hosts_per_site=1), run_root=run_root)
    try:
        assert not crashed.run_dir.exists()
        assert not [ns for ns in netns_list() if ns in orphan_ns]
        assert fresh.prefix != crashed.prefix
    finally:
        fresh.down()


def test_a_lab_whose_builder_died_is_stale_unless_persistent(run_root):
    lab = Lab.up(topology.generate(sites=2, hosts_per_site=1), run_root=run_root)
    try:
        assert not lab.is_stale()
        dead = subprocess.Popen(["true"])
        dead.wait()
        lab.state["owner_pid"] = dead.pid
        lab.save()
        assert lab.is_stale()
        assert clean_stale(run_root) == [lab.prefix]
        assert not lab.run_dir.exists()
    finally:
        lab.down()


def test_same_name_replaces_the_previous_lab(run_root):
    first = Lab.up(topology.generate(sites=2, hosts_per_site=1), run_root=run_root, name="demo", persistent=True)
    second = Lab.up(topology.generate(sites=2, hosts_per_site=1), run_root=run_root, name="demo", persistent=True)
    try:
        assert not first.run_dir.exists()
        assert Lab.find("demo", run_root).prefix == second.prefix
    finally:
        second.down()


def test_portal_topology_file_builds(run_root):
    """The portal's own topology files (network/topologies/*.yaml) build as they are."""
    from pathlib import Path

    demo = Path(__file__).resolve().parent.parent / "topologies" / "demo.yaml"
    lab = Lab.up(topology.load(demo), run_root=run_root)
    try:
        assert sorted(lab.state["switches"]) == ["brno-sw", "pilsen-sw", "prague-sw"]
        with switch_session(lab.switch_spec("brno-sw")) as session:
            assert sorted(session.port_vlans()) == ["core", "gw", "h1", "h2"]
    finally:
        lab.down()


# --- isolation: the paper's promise -------------------------------------------------------------------------------


def shared_ip(j: int) -> str:
    return f"198.18.0.{j + 1}"  # the same address in every cluster


def own_ip(cluster: str, j: int) -> str:
    return f"198.18.0.{100 + 10 * 'abc'.index(cluster) + j}"  # unique, same /24


@pytest.fixture(scope="module")
def clusters(lab):
    """3 clusters × 6 VMs (one per host), all in 198.18.0.0/24 with the same addresses .1–.6 plus one
    address of their own; VLANs converged through the drivers."""
    lab.converge({vid: HOSTS for vid in CLUSTERS.values()})
    vms = {}
    for cluster, vid in CLUSTERS.items():
        for j, host in enumerate(HOSTS):
            name = f"{cluster}{j}"
            lab.attach_vm(host, vid, name, f"{shared_ip(j)}/24")
            ns = lab.vm(name).netns
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{own_ip(cluster, j)}/24", "dev", "eth0"], check=True)
            vms[name] = lab.vm(name)
    yield vms
    for name in vms:
        lab.detach_vm(name)
    lab.converge({})


def test_same_cluster_reaches_across_sites(lab, clusters):
    pairs = [
        (f"{c}{i}", own_ip(c, j)) for c in CLUSTERS for i in range(len(HOSTS)) for j in range(len(HOSTS)) if i != j
    ]
    results = ping_many(lab, pairs, timeout=2)
    assert [pair for pair, ok in results.items() if not ok] == []
    assert len(results) == 3 * 30


def test_different_clusters_never_reach_each_other(lab, clusters):
    pairs = [
        (f"{c}{i}", own_ip(d, j))
        for c in CLUSTERS
        for d in CLUSTERS
        if c != d
        for i in range(len(HOSTS))
        for j in range(len(HOSTS))
    ]
    results = ping_many(lab, pairs, timeout=1)
    assert len(results) == 3 * 2 * 36
    assert [pair for pair, ok in results.items() if ok] == []


def test_same_addresses_resolve_inside_the_cluster_only(lab, clusters):
    """Every cluster uses 198.18.0.1–6 at once; ARP for a shared address answers with the own cluster's VM."""
    for cluster in CLUSTERS:
        for i, j in ((0, 5), (2, 1), (4, 3)):  # pairs across sites
            src, dst = clusters[f"{cluster}{i}"], clusters[f"{cluster}{j}"]
            assert arping(lab, src.name, shared_ip(j)) == {dst.mac}


@pytest.mark.parametrize("sender", sorted(CLUSTERS))
def test_no_broadcast_or_arp_leaks_into_other_clusters(lab, clusters, sender):
    ours = {vm.mac for name, vm in clusters.items() if name.startswith(sender)}
    others = [name for name in clusters if not name.startswith(sender)]
    with contextlib.ExitStack() as stack:
        foreign = [stack.enter_context(capture(lab, name)) for name in others]
        # positive control: a VM of the sender's own cluster at another site does see the broadcasts
        own = stack.enter_context(capture(lab, f"{sender}5"))
        broadcast(lab, f"{sender}0")
        arping(lab, f"{sender}0", "198.18.0.250", count=1, timeout=0.3)  # nobody has it: a broadcast ARP
    assert any(src in line for src in ours for line in own.lines), "the capture itself must work"
    leaked = [(cap.where, line) for cap in foreign for line in cap.lines if any(mac in line for mac in ours)]
    assert leaked == []


def test_qinq_core_carries_802_1ad_outer_and_802_1q_inner_tags(lab, clusters):
    provider = [link for link in lab.core_ports() if link["layer"] == "provider"]
    customer = [link for link in lab.core_ports() if link["layer"] == "customer"]
    assert provider and customer
    with capture(lab, provider[0]["iface"], "vlan and vlan and icmp") as outer:
        with capture(lab, customer[0]["iface"], "vlan and icmp") as inner:
            results = ping_many(lab, [("a0", own_ip("a", 5)), ("b0", own_ip("b", 5))], timeout=2)
    assert all(results.values())
    for vid in (100, 101):
        assert any(
            "802.1Q-QinQ (0x88a8)" in line and "vlan 1000," in line and f"802.1Q (0x8100), vlan {vid}," in line
            for line in outer.lines
        ), outer.lines
        assert any("802.1Q (0x8100), length" in line and f"vlan {vid}," in line for line in inner.lines), inner.lines
    assert not any("0x88a8" in line for line in inner.lines)  # the switch uplink speaks plain 802.1Q


def test_gateway_point_receives_tagged_frames_of_gateway_vlans(lab, clusters):
    """A cluster with a gateway leg gets its VLAN on the gateway trunk; the gw namespace's bridge (where an
    OpenVPN tap would join) sees that cluster's frames tagged, and no other cluster's."""
    gw = lab.gateway()
    lab.converge({vid: HOSTS for vid in CLUSTERS.values()}, gateway_vids=[100])
    try:
        argv = ["ip", "netns", "exec", gw["netns"], "tcpdump", "-i", gw["bridge"], "-e", "-nn", "-l"]
        proc = subprocess.Popen(
            [*argv, "--immediate-mode", "arp"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        while "listening on" not in proc.stderr.readline():
            pass
        arping(lab, "a3", "198.18.0.251", count=1, timeout=0.3)
        arping(lab, "b3", "198.18.0.252", count=1, timeout=0.3)
        time.sleep(0.05)
        proc.terminate()
        lines = proc.communicate(timeout=5)[0].splitlines()
        assert any("vlan 100," in line and "198.18.0.251" in line for line in lines), lines
        assert not any("198.18.0.252" in line for line in lines)
    finally:
        lab.converge({vid: HOSTS for vid in CLUSTERS.values()})


# --- a plain 802.1Q core ------------------------------------------------------------------------------------------


def test_dot1q_core_carries_plain_802_1q_tags(run_root):
    lab = Lab.up(topology.generate(sites=2, hosts_per_site=1, core_kind="dot1q"), run_root=run_root)
    try:
        lab.converge({150: ["h-s1-1", "h-s2-1"], 151: ["h-s1-1", "h-s2-1"]})
        lab.attach_vm("h-s1-1", 150, "x1", "198.18.0.1/24")
        lab.attach_vm("h-s2-1", 150, "x2", "198.18.0.2/24")
        lab.attach_vm("h-s2-1", 151, "y2", "198.18.0.2/24")
        core = lab.core_ports()[0]["iface"]
        with capture(lab, core, "vlan") as cap:
            assert ping_many(lab, [("x1", "198.18.0.2")], timeout=2) == {("x1", "198.18.0.2"): True}
        assert arping(lab, "x1", "198.18.0.2") == {lab.vm("x2").mac}
        assert any("802.1Q (0x8100)" in line and "vlan 150," in line for line in cap.lines), cap.lines
        assert not any("0x88a8" in line for line in cap.lines)
    finally:
        lab.down()


# --- a control plane per site -------------------------------------------------------------------------------------


def test_site_planes_give_each_site_its_own_daemons_and_still_join_the_sites(run_root):
    """``planes="site"``: each site's switch, hosts and provider edge on an OVSDB and ovs-vswitchd of their own
    (a commit at one site leaves the others' daemons alone), the core on the lab's; VMs at two sites reach each
    other over the QinQ core, a cluster reusing their addresses stays apart, and ``down`` removes it all."""
    from network.drivers.ovsdb import Ovsdb

    lab = Lab.up(topology.generate(sites=3, hosts_per_site=1, core_kind="qinq"), run_root=run_root, planes="site")
    pids = dict(lab.state["pids"])
    switches = ("sw-s1", "sw-s2", "sw-s3")
    try:
        assert len(pids) == 2 * 4 and all(_alive(pid, str(lab.run_dir)) for pid in pids.values())
        assert all(lab.status()["daemons"].values())
        ours = sorted(ns for ns in netns_list() if ns.startswith(lab.prefix))
        assert ours == sorted([lab.ovs_ns, lab.gw_ns, *(lab.plane_netns(f"o{k}") for k in range(3))])
        dbs = [lab.switch_db(s) for s in switches]
        assert len(set(dbs)) == 3 and lab.db not in dbs
        assert lab.host_driver_args("h-s2-1")["db"] == lab.switch_db("sw-s2")

        def applied(db: str) -> int:
            return Ovsdb(device="t", db=db).list_rows("Open_vSwitch", ["cur_cfg"])[0]["cur_cfg"]

        before = {db: applied(db) for db in [*dbs, lab.db]}
        lab.converge({150: ["h-s1-1"]})  # one site only: nothing to commit elsewhere
        after = {db: applied(db) for db in before}
        assert after[dbs[0]] > before[dbs[0]]
        assert [after[db] - before[db] for db in [*dbs[1:], lab.db]] == [0, 0, 0]

        lab.converge({150: ["h-s1-1", "h-s3-1"], 151: ["h-s3-1"]})
        lab.attach_vm("h-s1-1", 150, "x1", "198.18.0.1/24")
        lab.attach_vm("h-s3-1", 150, "x3", "198.18.0.3/24")
        lab.attach_vm("h-s3-1", 151, "y3", "198.18.0.3/24")  # another cluster, the same address
        assert _sw1_link(lab, "provider")["netns"] == lab.plane_netns("o0")
        _reaches_over_qinq(lab, "x1", "x3", "198.18.0.3", 150)
    finally:
        lab.down()
    _assert_removed(lab, pids)


def _sw1_link(lab, layer: str) -> dict:
    return next(link for link in lab.core_ports() if link["layer"] == layer and link["switch"] == "sw-s1")


def _reaches_over_qinq(lab, src: str, dst: str, address: str, vid: int) -> None:
    """VM ``src`` pings VM ``dst`` at ``address`` and ARP finds ``dst``'s MAC, the frames crossing sw-s1's
    provider link with an 802.1ad outer tag over VLAN ``vid``."""
    with capture(lab, _sw1_link(lab, "provider")["iface"], "vlan and vlan and icmp") as outer:
        assert ping_many(lab, [(src, address)], timeout=2) == {(src, address): True}
    assert arping(lab, src, address) == {lab.vm(dst).mac}
    assert any("802.1Q-QinQ (0x88a8)" in line and f"vlan {vid}," in line for line in outer.lines), outer.lines


def _assert_removed(lab, pids: dict) -> None:
    """``down`` left no namespace, run directory or daemon of the lab."""
    assert not [ns for ns in netns_list() if ns.startswith(lab.prefix)]
    assert not lab.run_dir.exists()
    assert not any(_alive(pid, str(lab.run_dir)) for pid in pids.values())


def test_device_planes_give_every_switch_and_host_its_own_daemons(run_root):
    """``planes="device"``: every switch and every host on an OVSDB and ovs-vswitchd of its own, as real
    devices have their own control planes (a commit on one reconfigures nothing else), the provider edges
    with the core in the provider's plane; VMs at two sites reach each other over the QinQ core through a
    host, its switch, the provider edge and the core, each a daemon of its own; ``down`` removes it all."""
    from network.drivers.ovsdb import Ovsdb

    topo = topology.generate(sites=2, hosts_per_site=2, core_kind="qinq")
    lab = Lab.up(topo, run_root=run_root, planes="device")
    pids = dict(lab.state["pids"])
    try:
        assert len(pids) == 2 * (1 + 2 + 4) and all(_alive(pid, str(lab.run_dir)) for pid in pids.values())
        planes = [f"ds{i}" for i in range(2)] + [f"dh{j}" for j in range(4)]
        ours = sorted(ns for ns in netns_list() if ns.startswith(lab.prefix))
        assert ours == sorted([lab.ovs_ns, lab.gw_ns, *(lab.plane_netns(plane) for plane in planes)])
        dbs = {name: lab.switch_db(name) for name in ("sw-s1", "sw-s2")}
        dbs |= {h.name: lab.host_driver_args(h.name)["db"] for h in topo.hosts}
        assert len(set(dbs.values())) == 6 and lab.db not in dbs.values()

        def applied(db: str) -> int:
            return Ovsdb(device="t", db=db).list_rows("Open_vSwitch", ["cur_cfg"])[0]["cur_cfg"]

        before = {name: applied(db) for name, db in [*dbs.items(), ("core", lab.db)]}
        lab.converge({150: ["h-s1-1"]})  # one host and its switch: nothing to commit anywhere else
        after = {name: applied(dbs.get(name, lab.db)) for name in before}
        assert {name for name in before if after[name] > before[name]} == {"sw-s1", "h-s1-1"}

        lab.converge({150: ["h-s1-1", "h-s2-2"]})
        lab.attach_vm("h-s1-1", 150, "x1", "198.18.0.1/24")
        lab.attach_vm("h-s2-2", 150, "x2", "198.18.0.2/24")
        assert _sw1_link(lab, "provider")["netns"] == lab.ovs_ns
        assert _sw1_link(lab, "customer")["netns"] == lab.plane_netns("ds0")
        _reaches_over_qinq(lab, "x1", "x2", "198.18.0.2", 150)
    finally:
        lab.down()
    _assert_removed(lab, pids)


def test_planes_must_be_known(run_root):
    with pytest.raises(LabError, match="planes must be one of shared, site, device"):
        Lab.up(topology.generate(sites=2, hosts_per_site=1), run_root=run_root, planes="rack")
    assert not run_root.exists()  # refused before anything was made


# --- from the database --------------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("planes", ["shared", "site", "device"])
def test_lab_up_from_the_database_points_the_portal_specs_at_the_lab(planes):
    """``manage.py lab up`` builds the inventory and writes addresses/driver args so that the portal's own
    spec builder (network.specs) reaches the lab's switches and hosts (with ``--planes site``, each at its
    site's OVSDB); ``lab down`` restores the inventory."""
    from pathlib import Path

    from django.core.management import CommandError, call_command

    from network import specs
    from network.drivers import host_session
    from network.models import Host, Switch
    from network.topology import load_topology, topology_import

    demo = Path(__file__).resolve().parent.parent / "topologies" / "demo.yaml"
    data, lines = load_topology(demo.read_text(), source=str(demo))
    topology_import(data=data, source=str(demo), lines=lines)
    name = f"pytest-{os.getpid()}"
    call_command("lab", "up", "--name", name, "--planes", planes)
    try:
        lab = Lab.find(name)
        switch = Switch.objects.get(name="brno-sw")
        assert switch.address == lab.switch_db("brno-sw")
        addresses = set(Switch.objects.values_list("address", flat=True))
        assert addresses == ({lab.db} if planes == "shared" else {lab.switch_db(s.name) for s in Switch.objects.all()})
        assert len(addresses) == (1 if planes == "shared" else 3)
        host_dbs = {lab.host_driver_args(h)["db"] for h in Host.objects.values_list("name", flat=True)}
        assert len(host_dbs) == {"shared": 1, "site": 3, "device": Host.objects.count()}[planes]
        with switch_session(specs.switch_spec(switch)) as session:
            result = session.converge({"h1": frozenset({300}), "core": frozenset({300})})
        assert result.diff == "port core trunks add 300\nport h1 trunks add 300"
        with host_session(specs.host_spec(Host.objects.get(name="brno-h1"))) as session:
            assert session.converge(frozenset({300})).after == {"brno-h1": frozenset({300})}
        # a topology file that cannot be read or parsed: a clear error, the lab and the inventory as they were
        bad = Path(lab.run_dir) / "bad.yaml"
        bad.write_text("sites: [a\n")
        for path, message in ((bad.with_name("missing.yaml"), "No such file"), (bad, "cannot read the topology")):
            with pytest.raises(CommandError, match=message):
                call_command("lab", "up", "--name", name, "--topology", str(path))
            assert Switch.objects.get(name="brno-sw").address == lab.switch_db("brno-sw")
            assert Lab.find(name).prefix == lab.prefix
    finally:
        call_command("lab", "down", "--name", name)
    assert Switch.objects.get(name="brno-sw").address == "lab"
    assert Lab.find(name) is None


def test_lab_check_command_passes(run_root, monkeypatch):
    from django.core.management import call_command

    import network.lab.fabric as fabric

    monkeypatch.setattr(fabric, "RUN_ROOT", run_root)
    call_command("lab", "up", "--topology", str(topology_path(run_root)), "--name", "chk")
    try:
        from io import StringIO

        out = StringIO()
        call_command("lab", "check", "--name", "chk", stdout=out)
        assert out.getvalue().count("ok  ") == 5, out.getvalue()
    finally:
        call_command("lab", "down", "--name", "chk")


def topology_path(directory):
    import json

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "topology.json"
    path.write_text(json.dumps(topology.generate(sites=2, hosts_per_site=1).as_dict()))
    return path


def test_full_size_frames_cross_the_qinq_core(lab, clusters):
    """1500-byte IP packets carry two tags on the provider links: the lab's trunks must take them (a VM's
    TCP stalls otherwise while small pings pass)."""
    argv = ["ip", "netns", "exec", clusters["a0"].netns, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1472"]
    assert subprocess.run([*argv, own_ip("a", 5)], capture_output=True).returncode == 0


def test_a_public_cluster_reaches_the_providers_router_through_its_router_trunk(run_root, db):
    """A public cluster's VLAN goes, through the drivers, across the core to the switch port that faces the
    provider's router (role ``router_trunk``): a VM at the other site pings the router's address in the
    cluster's subnet. A closed cluster's VLAN never reaches that trunk, and after the teardown neither does the
    public one's. The "router" is a namespace behind an OVS bridge that untags the VLAN, made here."""
    from network import services, workflows
    from network.drivers.ovsdb import Ovsdb
    from network.lab.checks import ping
    from network.lab.fabric import CORE_PLANE
    from network.tests.labinventory import inventory_for

    shape = topology.generate(sites=2, hosts_per_site=1, core_kind="dot1q").as_dict()
    next(sw for sw in shape["switches"] if sw["name"] == "sw-s2")["ports"].append(
        {"name": "rt", "role": "router_trunk", "core": None}
    )
    lab = Lab.up(topology.from_dict(shape), run_root=run_root)
    router_ns = f"{lab.prefix}rt"
    try:
        inv = inventory_for(lab)
        public = services.segment_create(owner="pub", hosts=[inv["hosts"]["h-s1-1"]], gateway=False)
        closed = services.segment_create(owner="cls", hosts=[inv["hosts"]["h-s1-1"]], gateway=True)
        for seg in (public, closed):
            workflows.provision(seg.pk).apply().get()
        with switch_session(lab.switch_spec("sw-s2")) as session:
            assert session.port_vlans()["rt"] == {public.vid}

        # the provider's router: untags the public VLAN from the trunk, holds the subnet's router address
        plane = lab.state["switches"]["sw-s2"].get("plane", CORE_PLANE)
        plane_ns, trunk_end = lab.plane_netns(plane), lab.state["switches"]["sw-s2"]["port_map"]["rt"] + "x"
        subprocess.run(["ip", "netns", "add", router_ns], check=True)
        subprocess.run(
            [
                "ip",
                "-n",
                plane_ns,
                "link",
                "add",
                f"{lab.prefix}rtv",
                "type",
                "veth",
                "peer",
                "eth0",
                "netns",
                router_ns,
            ],
            check=True,
        )
        subprocess.run(["ip", "-n", plane_ns, "link", "set", f"{lab.prefix}rtv", "up"], check=True)
        script = (
            "ip link set lo up && ip addr add 198.18.20.1/24 dev eth0 && ip link set eth0 up"
            " && ethtool -K eth0 tx off >/dev/null"
        )
        subprocess.run(["ip", "netns", "exec", router_ns, "sh", "-c", script], check=True)
        router_bridge = f"{lab.prefix}rbr"
        Ovsdb(device="router", db=lab.plane_db(plane)).run(
            ["add-br", router_bridge],
            ["set", "Bridge", router_bridge, "datapath_type=netdev"],
            ["add-port", router_bridge, trunk_end],
            ["set", "Port", trunk_end, "vlan_mode=trunk", f"trunks={public.vid}"],
            ["add-port", router_bridge, f"{lab.prefix}rtv"],
            ["set", "Port", f"{lab.prefix}rtv", f"tag={public.vid}"],
        )

        lab.attach_vm("h-s1-1", public.vid, "pub1", "198.18.20.10/24")
        lab.attach_vm("h-s1-1", closed.vid, "cls1", "198.18.20.11/24")
        assert ping(lab, "pub1", "198.18.20.1", count=2, timeout=2)  # across the core, to the router
        assert not ping(lab, "cls1", "198.18.20.1", timeout=1)  # a closed cluster never reaches it

        lab.detach_vm("pub1")
        services.segment_delete(segment=public)
        workflows.teardown(public.pk).apply().get()
        with switch_session(lab.switch_spec("sw-s2")) as session:
            assert session.port_vlans() == {"p-h1": frozenset(), "up": frozenset(), "rt": frozenset()}
    finally:
        subprocess.run(["ip", "netns", "del", router_ns], capture_output=True, check=False)
        lab.down()
