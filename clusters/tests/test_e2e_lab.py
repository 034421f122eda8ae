"""End to end in the lab: clusters created through the API by a real Celery worker that configures the lab's
Open vSwitch switches and hosts (netns); VMs attached as libvirt would; packets prove the promise."""

from __future__ import annotations

import itertools

import pytest
from rest_framework.test import APIClient

from clusters.models import ClusterState, Node, VirtualCluster
from clusters.tests.helpers import wait_state
from network.drivers import host_session, switch_session
from network.lab import broadcast, ping
from network.models import Host, Switch
from network.specs import host_spec, switch_spec
from network.tests.labinventory import demo_lab

pytestmark = [pytest.mark.lab, pytest.mark.worker, pytest.mark.django_db(transaction=True)]
_macs = itertools.count(1)


@pytest.fixture
def lab_inventory(transactional_db):
    """The demo topology in the database and built as a lab that the inventory points at."""
    with demo_lab("e2e") as lab:
        yield lab


def mac() -> str:
    n = next(_macs)
    return f"52:54:00:aa:{n // 256:02x}:{n % 256:02x}"


def create(api, name: str, hosts: list[str]) -> tuple[int, dict[str, tuple[str, str]]]:
    nodes = {f"{name}n{i}": (host, mac()) for i, host in enumerate(hosts, 1)}
    r = api.post(
        "/api/clusters/",
        {
            "name": name,
            "image": "my-own",
            "admin_rights": True,
            "nodes": [{"name": n, "host": h, "mac": m} for n, (h, m) in nodes.items()],
        },
        format="json",
    )
    assert r.status_code == 201, r.content
    cluster = wait_state(r.data["id"], ClusterState.READY, ClusterState.FAILED)
    assert cluster.state == ClusterState.READY, cluster.state_reason
    return cluster.pk, nodes


def device_vlans() -> tuple[dict, dict]:
    switches = {}
    for sw in Switch.objects.all():
        with switch_session(switch_spec(sw)) as s:
            switches[sw.name] = s.port_vlans()
    hosts = {}
    for host in Host.objects.all():
        with host_session(host_spec(host)) as h:
            hosts[host.name] = h.vlans()
    return switches, hosts


def test_clusters_across_three_sites(lab_inventory, celery_worker, alice, bob):
    lab = lab_inventory
    api_a, api_b = APIClient(), APIClient()
    api_a.force_authenticate(alice)
    api_b.force_authenticate(bob)
    hosts = ["brno-h1", "pilsen-h1", "prague-h1"]
    a_id, a_nodes = create(api_a, "alpha", hosts)
    b_id, b_nodes = create(api_b, "beta", hosts)
    a_vid = VirtualCluster.objects.get(pk=a_id).vlan_id
    b_vid = VirtualCluster.objects.get(pk=b_id).vlan_id
    assert a_vid != b_vid
    # the API tells the VM manager where to plug each node: the lab host's OVS bridge, tagged with the VLAN
    for node in api_a.get(f"/api/clusters/{a_id}/").data["nodes"]:
        plug = node["attachment"]
        assert plug["bridge"] == lab.host_driver_args(node["host"])["bridge"], plug
        assert (plug["vlan"], plug["virtualport"]) == (a_vid, "openvswitch")
        assert f'<tag id="{a_vid}" />' in plug["libvirt"] and node["mac"] in plug["libvirt"]

    # Both clusters use the same addresses (closed clusters may), as libvirt would plug the VMs in.
    ips = {}
    for nodes, vid in ((a_nodes, a_vid), (b_nodes, b_vid)):
        for i, (name, (host, m)) in enumerate(nodes.items(), 1):
            lab.attach_vm(host, vid, name, f"198.18.10.{i}/24", m)
            ips[name] = f"198.18.10.{i}"
    lab.attach_vm("prague-h1", b_vid, "betaonly", "198.18.10.99/24", mac())  # an address only beta has

    for nodes in (a_nodes, b_nodes):
        for src, dst in itertools.permutations(nodes, 2):
            assert ping(lab, src, ips[dst]), f"{src} cannot reach {dst}"
    for src in a_nodes:
        assert not ping(lab, src, "198.18.10.99"), f"{src} (alpha) reaches a beta-only address"

    # Migration: alpha's pilsen node moves to prague-h2 and keeps its address and reachability.
    node = Node.objects.get(cluster_id=a_id, name="alphan2")
    r = api_a.post(f"/api/clusters/{a_id}/nodes/{node.pk}/migrate/", {"target_host": "prague-h2"}, format="json")
    assert r.status_code == 202
    moving = next(n for n in r.data["nodes"] if n["id"] == node.pk)
    assert moving["target_attachment"]["bridge"] == lab.host_driver_args("prague-h2")["bridge"]
    wait_state(a_id, ClusterState.READY)
    _, host_vlans = device_vlans()
    assert a_vid in host_vlans["prague-h2"]
    lab.detach_vm("alphan2")
    lab.attach_vm("prague-h2", a_vid, "alphan2", "198.18.10.2/24", a_nodes["alphan2"][1])
    broadcast(lab, "alphan2", count=1)  # the announcement QEMU sends after a migration (MAC tables learn)
    assert api_a.post(f"/api/clusters/{a_id}/nodes/{node.pk}/migrated/", {}, format="json").status_code == 202
    wait_state(a_id, ClusterState.READY)
    for other in ("alphan1", "alphan3"):
        assert ping(lab, other, "198.18.10.2"), f"{other} lost the migrated node"
    switches, host_vlans = device_vlans()
    assert a_vid not in host_vlans["pilsen-h1"]
    assert b_vid in host_vlans["pilsen-h1"]  # beta still lives there
    assert a_vid not in switches["pilsen-sw"]["h1"]

    # Teardown: no VLAN left on any switch, no attachment on any host.
    for vm in lab.vms():
        lab.detach_vm(vm.name)
    for api, cid in ((api_a, a_id), (api_b, b_id)):
        assert api.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202
    for cid in (a_id, b_id):
        wait_state(cid, ClusterState.TORN_DOWN)
    switches, host_vlans = device_vlans()
    assert all(not vids for ports in switches.values() for vids in ports.values()), switches
    assert all(not vids for vids in host_vlans.values()), host_vlans


HOSTS = ["brno-h1", "brno-h2", "pilsen-h1", "pilsen-h2", "prague-h1", "prague-h2"]


def _burst(calls) -> list:
    """Run the API calls at once, each from a thread with its own database connection (as web workers do)."""
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection

    def run(call):
        try:
            return call()
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(run, calls))


def _expected(clusters: dict[int, list[str]]) -> tuple[dict, dict]:
    """What the devices must carry, from the clusters' nodes alone (closed clusters: the gateway trunk is at
    Brno, so a cluster's VLAN reaches Brno's switch and crosses the core whenever it spans two sites)."""
    vid = dict(VirtualCluster.objects.filter(pk__in=clusters).values_list("pk", "vlan_id"))
    switches = {f"{site}-sw": {"h1": set(), "h2": set(), "core": set()} for site in ("brno", "pilsen", "prague")}
    switches["brno-sw"]["gw"] = set()
    hosts = {h: set() for h in HOSTS}
    for cid, on in clusters.items():
        sites = {h.split("-")[0] for h in on} | {"brno"}
        for h in on:
            hosts[h].add(vid[cid])
            switches[f"{h.split('-')[0]}-sw"][h.split("-")[1]].add(vid[cid])
        switches["brno-sw"]["gw"].add(vid[cid])
        if len(sites) > 1:
            for site in sites:
                switches[f"{site}-sw"]["core"].add(vid[cid])
    return switches, hosts


def _carried() -> tuple[dict, dict]:
    switches, hosts = device_vlans()
    return (
        {sw: {port: set(vids) for port, vids in ports.items()} for sw, ports in switches.items()},
        {h: set(vids) for h, vids in hosts.items()},
    )


def test_a_burst_of_clusters_created_and_torn_down_at_once(lab_inventory, celery_worker, alice):
    """A scheduler starting many jobs at once: clusters sharing every switch are created concurrently, then
    some torn down while others are created, then the rest torn down. Every device carries exactly what the
    live clusters need after each wave (no lost update between layers of different clusters that converge
    the same switch), and nothing is left at the end."""
    from network.models import VlanAllocation

    api = APIClient()
    api.force_authenticate(alice)

    def creator(name: str, on: list[str]):
        def call():
            client = APIClient()
            client.force_authenticate(alice)
            nodes = [{"name": f"{name}n{i}", "host": h, "mac": mac()} for i, h in enumerate(on)]
            r = client.post(
                "/api/clusters/", {"name": name, "image": "my-own", "nodes": nodes, "lifetime": 3600}, format="json"
            )
            assert r.status_code == 201, r.content
            return r.data["id"], on

        return call

    def teardown(cid: int):
        def call():
            client = APIClient()
            client.force_authenticate(alice)
            assert client.post(f"/api/clusters/{cid}/teardown/", {}, format="json").status_code == 202

        return call

    def settle(ids, state: str) -> None:
        for cid in ids:
            r = api.get(f"/api/clusters/{cid}/wait/?timeout=25")
            assert r.status_code == 200 and r.data["state"] == state, (cid, r.data["state"], r.data["state_reason"])

    layouts = [[HOSTS[i % 6], HOSTS[(i + 2) % 6]] + ([HOSTS[(i + 3) % 6]] if i % 2 else []) for i in range(8)]
    layouts.append(["pilsen-h2"])  # one site only (plus the gateway's)
    live = dict(_burst([creator(f"w{i}", on) for i, on in enumerate(layouts)]))
    settle(live, "ready")
    vids = list(VirtualCluster.objects.filter(pk__in=live).values_list("vlan_id", flat=True))
    assert len(set(vids)) == len(live)
    assert _carried() == _expected(live)

    # second wave: tear five down while four new ones are created on the same switches and hosts
    gone = list(live)[:5]
    results = _burst(
        [teardown(cid) for cid in gone]
        + [creator(f"x{i}", [HOSTS[(5 * i) % 6], HOSTS[(5 * i + 3) % 6]]) for i in range(4)]
    )
    for cid in gone:
        del live[cid]
    live.update(dict(r for r in results if r is not None))
    settle(gone, "torn_down")
    settle(live, "ready")
    assert _carried() == _expected(live)

    _burst([teardown(cid) for cid in live])
    settle(live, "torn_down")
    switches, hosts = _carried()
    assert all(not vids for ports in switches.values() for vids in ports.values()), switches
    assert all(not vids for vids in hosts.values()), hosts
    assert not VlanAllocation.objects.filter(state="allocated").exists()
