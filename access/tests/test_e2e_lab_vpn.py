"""End to end in the netns lab: users reach their closed clusters at every site through the portal's OpenVPN
access gateway (issue 6, "done means").

Everything comes from the portal: clusters created through the API with a user-provided image (so closed)
and made READY by a real Celery worker on the lab's Open vSwitch switches; the gateway's configuration and
keys (``manage.py gateway config``); its state (VLAN map, CRL, AA certificate, sessions to cut) pulled over
HTTP with its own token (``manage.py gateway pull``); the users' profiles downloaded through the API
(``POST /api/access/vpn-profiles/``) over HTTP too. Topology (``vl…`` names are the lab's, ``va…`` ours)::

    <va>-ws  "user workstation": openvpn client(s), tap 198.18.10.200/24
       |  veth 198.18.248.2/30 -- 198.18.248.1/30 (the gateway's public side)
    <vl>gw   the lab's gateway namespace: openvpn server (vlan-tagging), its tap <va>t in gwbr0
       |  gwbr0 (plain Linux bridge) -- gwt0 -- trunk port "gw" of brno-sw (carries every closed VLAN)
    brno-sw ==QinQ core== pilsen-sw, prague-sw -- hosts -- VM namespaces

Clusters (the same addresses in all three, as closed clusters may):
alice's ``alpha`` (group physics: bob too) with node1..3 = 198.18.10.1..3 at brno/pilsen/prague;
alice's ``beta`` with node1..3 at the same addresses and node4 = 198.18.10.99 (beta only);
charlie's ``gamma`` with node1 = 198.18.10.1 at brno.

Proves: the downloaded profile reaches alpha's VMs at all three sites (the replies come from alpha's MACs)
and nothing of beta or gamma, not even with frames the workstation writes into the tunnel already tagged
with beta's VLAN (802.1Q, 802.1ad + 802.1Q, alpha's tag + beta's); switching the profile's
``setenv UV_VCLUSTER`` lands on beta; a cluster the AC does not cover (gamma) → AUTH_FAILED, and the API
refuses that profile; tampered and expired ACs (certificates from the portal's own CA and AA) → refused at
TLS; revocation in the portal → the gateway's pull installs the CRL and cuts the live session, the reconnect
is refused; with the portal stopped the pull fails (exit 75), the gateway keeps its last state and an
authorized user (bob) still connects.
"""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests._lab are parameters here)

from __future__ import annotations

import datetime as dt
import json
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from django.core.management import call_command
from rest_framework.test import APIClient

from access import attrcerts, pki, services
from access.gateway import vpn as vpn_hooks
from access.gateway.state import RunAs
from access.models import Authority, AuthorityKind, Credential, Gateway, GatewayKind
from access.selectors import cluster_label
from access.tests._lab import (
    LabNetns,
    PullFailed,
    cluster_post,
    gateway_pull,
    gateway_token,
    lab_inventory,
    portal,
    user_token,
    wait_ready,
)
from access.tests._procs import (
    Netns,
    can_use_netns,
    gateway_link,
    reachable_for,
    read,
    run_prefix,
    sh,
    stop,
    wait_for,
)

_skip = can_use_netns() or (None if shutil.which("openvpn") else "openvpn binary not installed")
pytestmark = [
    pytest.mark.lab,
    pytest.mark.worker,
    pytest.mark.skipif(bool(_skip), reason=_skip or ""),
    pytest.mark.django_db(transaction=True),
]

GW_PUBLIC, WS_PUBLIC = "198.18.248.1", "198.18.248.2"
CLIENT_ADDR = "198.18.10.200/24"
SITES = ["brno-h1", "pilsen-h1", "prague-h1"]


class Gw:
    """The gateway as deployed in the lab, and the workstation that talks to it."""

    def __init__(self, tmp: Path, prefix: str, gw_ns: LabNetns, ws: Netns, state: Path):
        self.tmp, self.prefix, self.gw, self.ws, self.state = tmp, prefix, gw_ns, ws, state
        self.log = tmp / "gateway.log"
        self.procs: list[subprocess.Popen] = []
        self.taps = iter(range(1, 100))

    def says(self, needle: str, timeout: float = 10) -> None:
        wait_for(lambda: needle in read(self.log), timeout, what=f"gateway log line {needle!r}")

    def pull(self, portal_url: str, token_file: Path) -> str:
        return gateway_pull(portal_url, token_file, self.state)

    def client(self, text: str, name: str, *extra: str) -> Client:
        """The workstation's openvpn 2.x with the downloaded file (only the tap's name given on the command
        line, so that parallel runs never share one)."""
        path = self.tmp / f"{name}.ovpn"
        path.write_text(text)
        path.chmod(0o600)
        dev = f"{self.prefix}c{next(self.taps)}"
        log = self.tmp / f"{name}.log"
        proc = self.ws.popen("openvpn", "--config", str(path), "--dev", dev, "--log", str(log), *extra)
        self.procs.append(proc)
        return Client(self, proc, dev, log)


class Client:
    def __init__(self, gw: Gw, proc: subprocess.Popen, dev: str, log: Path):
        self.gw, self.proc, self.dev, self.log = gw, proc, dev, log

    def outcome(self, timeout: float = 15) -> str:
        """'connected' or 'auth-failed', whichever the client's log says first."""

        def seen():
            text = read(self.log)
            if "Initialization Sequence Completed" in text:
                return "connected"
            if "AUTH_FAILED" in text:
                return "auth-failed"
            return None

        return wait_for(seen, timeout, what=f"client {self.dev} to connect or fail")

    def up(self) -> Client:
        assert self.outcome() == "connected", read(self.log)[-3000:]
        self.gw.ws.ip("addr", "add", CLIENT_ADDR, "dev", self.dev)
        self.gw.ws.ip("link", "set", self.dev, "up")
        return self

    def ping(self, address: str, count: int = 3) -> bool:
        r = self.gw.ws.run(
            "ping", "-c", str(count), "-i", "0.2", "-W", "1", "-I", self.dev, address, check=False, timeout=15
        )
        return r.returncode == 0

    def mac_of(self, address: str) -> str:
        out = self.gw.ws.run("ip", "neigh", "show", address, "dev", self.dev).stdout
        m = re.search(r"lladdr ([0-9a-f:]{17})", out)
        return m.group(1) if m else ""

    def stop(self) -> None:
        stop(self.proc)
        self.gw.ws.run("ip", "link", "del", self.dev, check=False)  # a HALTed client may leave it behind


@pytest.fixture
def gw(lab_inventory, tmp_path):
    """The brno access gateway: openvpn in the lab's gateway namespace, its tap in the trunk bridge; a
    workstation namespace linked to the gateway's public side."""
    lab = lab_inventory
    attach = lab.gateway("brno-sw")
    prefix = run_prefix()
    gw_ns = LabNetns(attach["netns"])
    ws = Netns(f"{prefix}-ws")
    g = None
    try:
        tap = gateway_link(gw_ns, ws, prefix, GW_PUBLIC, WS_PUBLIC, f"{prefix}w")
        # On the trunk: OpenVPN tags each client's frames with its VLAN.
        gw_ns.ip("link", "set", tap, "master", attach["bridge"])
        g = Gw(tmp_path, prefix, gw_ns, ws, tmp_path / "gw-state")
        g.tap = tap
        yield g
    finally:
        if g is not None:
            for p in g.procs:
                stop(p)
        ws.delete()
        sh("ip", "-n", attach["netns"], "link", "del", f"{prefix}t", check=False)  # the veth went with ws


def _between(text: str, tag: str) -> str:
    return text.split(f"<{tag}>\n", 1)[1].split(f"\n</{tag}>", 1)[0] + "\n"


def _with_bad_ac(text: str, label: str, how: str) -> tuple[str, int]:
    """The downloaded profile with its certificate re-issued by the portal's own CA for the same key, but
    carrying an AC that is expired, or altered after the AA signed it."""
    passphrase = services.ca_passphrase()
    rows = {a.kind: a for a in Authority.objects.all()}
    ca = pki.load_ca(rows["vpn"].certificate.encode(), str(rows["vpn"].private_key).encode(), passphrase)
    aa = pki.load_ca(rows["aa"].certificate.encode(), str(rows["aa"].private_key).encode(), passphrase)
    key = load_pem_private_key(_between(text, "key").encode(), None)
    serial = services.serial_allocate("e2e-bad-ac")
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    start, end = now - dt.timedelta(hours=2), now + dt.timedelta(days=1)
    holder = attrcerts.Holder(ca.cert.subject, serial, start, end)
    window = {"not_before": start, "not_after": now - dt.timedelta(minutes=30)} if how == "expired" else {}
    ac = attrcerts.issue_ac(
        aa_key=aa.key, aa_cert=aa.cert, holder=holder, serial=serial, fqans=[attrcerts.fqan(label)], **window
    )
    if how == "tampered":  # one bit of the cluster name
        i = ac.index(b"/virtcloud/") + len(b"/virtcloud/")
        ac = ac[:i] + bytes([ac[i] ^ 0x01]) + ac[i + 1 :]
    cert = pki.issue_client_cert(
        ca, public_key=key.public_key(), user="alice", serial=serial, not_before=start, not_after=end, ac_der=ac
    )
    return text.replace(_between(text, "cert"), pki.cert_to_pem(cert).decode()), serial


# --- raw frames into a tunnel, and captures that keep every byte ----------------------------------------------

TPID_8021Q, TPID_8021AD = 0x8100, 0x88A8

# Run in the workstation's namespace (``ip netns exec``): what any program there with CAP_NET_RAW can do.
_SEND_FRAMES = """
import socket, sys, time
dev, rounds, frames = sys.argv[1], int(sys.argv[2]), [bytes.fromhex(h) for h in sys.argv[3:]]
with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
    s.bind((dev, 0))
    for _ in range(rounds):
        for frame in frames:
            s.send(frame)
        time.sleep(0.1)
"""


def send_frames(ns: Netns, dev: str, frames: list[bytes], rounds: int = 3) -> None:
    """Write ``frames`` (complete Ethernet frames, tags included, as given) out of ``dev`` in ``ns`` through an
    AF_PACKET socket, ``rounds`` times."""
    ns.run(sys.executable, "-I", "-c", _SEND_FRAMES, dev, str(rounds), *(f.hex() for f in frames), timeout=15)


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_broadcast(src_mac: str, src_ip: str, marker: bytes, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    """A broadcast Ethernet frame carrying an IPv4/UDP broadcast (to the discard port) whose payload is
    ``marker``, behind ``tags`` = ((TPID, VLAN id), ...), outermost first."""
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(marker), 0) + marker
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, socket.inet_aton(src_ip), b"\xff" * 4)
    ip = ip[:10] + struct.pack("!H", _ip_checksum(ip)) + ip[12:]
    frame = b"\xff" * 6 + bytes.fromhex(src_mac.replace(":", ""))
    for tpid, vid in tags:
        frame += struct.pack("!HH", tpid, vid)
    return frame + struct.pack("!H", 0x0800) + ip + udp


def link_mac(ns: Netns, dev: str) -> str:
    return json.loads(ns.run("ip", "-j", "link", "show", "dev", dev).stdout)[0]["address"]


class Pcap:
    """tcpdump writing every frame seen on one interface to a pcap file. The test searches the frames'
    bytes for its markers (a text filter could miss a frame whose tags it does not expect) and reads the
    outer tag of the frames that carry one."""

    def __init__(self, ns: Netns, iface: str, path: Path):
        self.where, self.path, self.err = f"{ns.name}/{iface}", path, path.with_suffix(".err")
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ns.cmd(
                    "tcpdump", "-i", iface, "-n", "-s", "0", "-U", "--immediate-mode", "-Z", "root", "-w", str(path)
                ),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def listening(self, timeout: float = 10) -> None:
        wait_for(lambda: "listening on" in read(self.err) or self.proc.poll() is not None, timeout, what=self.where)
        assert self.proc.poll() is None, f"tcpdump on {self.where}: {read(self.err)}"

    def frames(self) -> list[bytes]:
        """The frames written so far (``-U``: each one as it comes); a record still being written is left out."""
        data = self.path.read_bytes() if self.path.exists() else b""
        if len(data) < 24:
            return []
        endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        assert struct.unpack(endian + "I", data[20:24])[0] == 1, f"{self.where}: not an Ethernet capture"
        frames, offset = [], 24
        while offset + 16 <= len(data):
            length = struct.unpack(endian + "I", data[offset + 8 : offset + 12])[0]
            frame = data[offset + 16 : offset + 16 + length]
            if len(frame) < length:
                break
            frames.append(frame)
            offset += 16 + length
        return frames

    def carrying(self, marker: bytes) -> list[bytes]:
        return [f for f in self.frames() if marker in f]

    def stop(self) -> None:
        stop(self.proc)


def outer_tag(frame: bytes) -> tuple[int, int] | None:
    """(TPID, VLAN id) of the frame's outer tag, None if untagged."""
    tpid = struct.unpack("!H", frame[12:14])[0]
    return (tpid, struct.unpack("!H", frame[14:16])[0] & 0x0FFF) if tpid in (TPID_8021Q, TPID_8021AD) else None


# The frames a client writes into its tunnel to try to leave its VLAN: each tagged for beta in its own way.
HOPS = {
    "802.1Q": lambda own, other: ((TPID_8021Q, other),),
    "802.1ad+802.1Q": lambda own, other: ((TPID_8021AD, other), (TPID_8021Q, other)),
    "own-tag+802.1Q": lambda own, other: ((TPID_8021Q, own), (TPID_8021Q, other)),  # the classic double tag
}


def _try_to_hop_to(lab, gw: Gw, client: Client, *, alpha, beta) -> dict:
    """From alice's workstation, write into her tunnel to ``alpha`` UDP broadcasts tagged with ``beta``'s VLAN
    (:data:`HOPS`), and the same broadcast untagged (the control); meanwhile beta's node4 broadcasts in its
    own VLAN. Captured on alpha's node1, beta's node1 (same site as the gateway) and node4 (another site,
    across the QinQ core), the gateway's tap and its trunk to brno-sw. Returns::

        {"alpha": control frames at alpha's node1,
         "beta": {where: {kind: frames carrying that marker}},   kinds: HOPS, "control", "own"
         "trunk": {where: {kind: [outer tag of each frame carrying that marker]}}}
    """
    token = secrets.token_hex(4)
    markers = {kind: f"virtcloud-hop-{kind}-{token}".encode() for kind in [*HOPS, "control", "own"]}
    attach = lab.gateway("brno-sw")
    members = json.loads(gw.gw.run("ip", "-j", "link", "show", "master", attach["bridge"]).stdout)
    (uplink,) = [m["ifname"] for m in members if m["ifname"] != gw.tap]  # the veth to brno-sw's trunk port
    vms = {name: lab.vm(name) for name in ("alpha-node1", "beta-node1", "beta-node4")}
    places = [(name, LabNetns(vm.netns), "eth0") for name, vm in vms.items()]
    places += [("gateway tap", gw.gw, gw.tap), ("gateway trunk", gw.gw, uplink)]
    captures: dict[str, Pcap] = {}
    try:
        for name, ns, iface in places:
            captures[name] = Pcap(ns, iface, gw.tmp / f"hop-{name.replace(' ', '-')}.pcap")
        for capture in captures.values():
            capture.listening()
        src_mac, src_ip = link_mac(gw.ws, client.dev), CLIENT_ADDR.split("/")[0]
        frames = [
            udp_broadcast(src_mac, src_ip, markers[k], tag(alpha.vlan_id, beta.vlan_id)) for k, tag in HOPS.items()
        ]
        send_frames(gw.ws, client.dev, [*frames, udp_broadcast(src_mac, src_ip, markers["control"])])
        node4 = LabNetns(vms["beta-node4"].netns)
        send_frames(node4, "eth0", [udp_broadcast(vms["beta-node4"].mac, "198.18.10.99", markers["own"])], rounds=2)
        # The tagged frames went first on the same path: once the control and beta's own are in, so are they.
        wait_for(lambda: captures["alpha-node1"].carrying(markers["control"]), 10, what="the control at alpha")
        wait_for(lambda: captures["beta-node1"].carrying(markers["own"]), 10, what="beta's own broadcast")
        time.sleep(0.3)  # frames still in flight through the userspace datapath
    finally:
        for capture in captures.values():
            capture.stop()
    return {
        "alpha": captures["alpha-node1"].carrying(markers["control"]),
        "beta": {
            f"{name} ({vms[name].host})": {kind: captures[name].carrying(m) for kind, m in markers.items()}
            for name in ("beta-node1", "beta-node4")
        },
        "trunk": {
            name: {kind: [outer_tag(f) for f in captures[name].carrying(m)] for kind, m in markers.items()}
            for name in ("gateway tap", "gateway trunk")
        },
    }


def test_users_reach_their_cluster_at_every_site_through_the_portal_made_gateway(
    lab_inventory, celery_worker, gw, portal, alice, bob, charlie, root, team
):
    lab = lab_inventory
    started = time.monotonic()
    api = {u.username: APIClient() for u in (alice, charlie)}
    for u in (alice, charlie):
        api[u.username].force_authenticate(u)
    a_id, a_nodes = cluster_post(
        api["alice"], "alpha", [(h, f"198.18.10.{i}") for i, h in enumerate(SITES, 1)], group="physics"
    )
    b_id, b_nodes = cluster_post(
        api["alice"],
        "beta",
        [("brno-h2", "198.18.10.1"), ("pilsen-h2", "198.18.10.2"), ("prague-h2", "198.18.10.3")]
        + [("prague-h2", "198.18.10.99")],
    )
    c_id, c_nodes = cluster_post(api["charlie"], "gamma", [("brno-h1", "198.18.10.1")])
    clusters = wait_ready(a_id, b_id, c_id)
    alpha, beta, gamma = clusters[a_id], clusters[b_id], clusters[c_id]
    assert {c.connectivity for c in clusters.values()} == {"closed"}
    for cluster, nodes in ((alpha, a_nodes), (beta, b_nodes), (gamma, c_nodes)):
        for n in nodes:  # as libvirt would plug the VMs in
            lab.attach_vm(n.host, cluster.vlan_id, f"{cluster.name}-{n.name}", f"{n.address}/24", n.mac)
    ready_s = time.monotonic() - started

    # The gateway: made in the portal, configured by `gateway config`, state pulled over HTTP.
    from network.models import Site

    gateway = Gateway.objects.create(
        name="brno-gw", site=Site.objects.get(name="brno"), kind=GatewayKind.VPN, address=GW_PUBLIC
    )
    token_file = gateway_token(gateway, root, gw.tmp / "gateway.token")
    call_command("gateway", "config", "brno-gw", "--dir", str(gw.state), "--dev", gw.tap, "--vpn-local", GW_PUBLIC)
    assert "gateway pull:" in gw.pull(portal.url, token_file)
    vlans = json.loads((gw.state / "vpn" / "vlans.json").read_text())["clusters"]
    assert vlans == {cluster_label(c): c.vlan_id for c in (alpha, beta, gamma)}
    # As `gateway config` sets it up: OpenVPN drops to nobody:nogroup after start, its hooks run as that account
    # (where they can reach this machine's Python: see reachable_for); its log is on its stdout.
    run_as = RunAs.lookup("nobody", "nogroup")
    with reachable_for(run_as, [gw.state / "vpn" / "crl.pem", sys.executable, Path(vpn_hooks.__file__)]) as prefix:
        gw.procs.append(gw.gw.popen(*prefix, "openvpn", "--config", str(gw.state / "openvpn.conf"), log=gw.log))
        gw.says("Initialization Sequence Completed")
    assert "UID set to nobody" in read(gw.log)

    # alice downloads one profile for both her clusters (over HTTP, with her API token).
    alice_token = user_token(alice)
    status, body, headers = portal.request("POST", "/api/access/vpn-profiles/", alice_token, {"clusters": [a_id, b_id]})
    assert status == 200, body
    profile = body.decode()
    la, lb, lg = cluster_label(alpha), cluster_label(beta), cluster_label(gamma)
    assert f"\nsetenv UV_VCLUSTER {la}\n" in profile and f"admits to: {la}, {lb}" in profile
    credential = Credential.objects.get(pk=int(headers["X-Credential-Id"]))

    # 1. alpha at every site, with alpha's VMs answering; nothing of beta (node4) reachable.
    c = gw.client(profile, "alice-alpha").up()
    gw.says(f"ACCEPT cn=alice serial={credential.serial}: cluster {la} -> vlan-pvid {alpha.vlan_id}")
    for n in a_nodes:
        assert c.ping(n.address), f"alpha {n.name} at {n.host} unreachable through the gateway"
        assert c.mac_of(n.address) == n.mac, f"{n.address} answered from {c.mac_of(n.address)}, not alpha's {n.name}"
    assert not c.ping("198.18.10.99", count=2), "alpha's tunnel reaches beta's node4"
    # ...not even by writing frames into the tunnel already tagged with beta's VLAN. The gateway drops 802.1Q
    # tagged ones (vlan-tagging); OpenVPN reads only 0x8100 as a tag, so the 802.1ad one travels as alpha's
    # payload, tagged alpha: nothing of them may be seen in beta's VLAN, on the trunk or at beta's VMs.
    hop = _try_to_hop_to(lab, gw, c, alpha=alpha, beta=beta)
    assert hop["alpha"], "the untagged control frame, written the same way, did not reach alpha's VM"
    for where, seen in hop["beta"].items():
        assert seen["own"], f"{where} captured none of beta's own broadcasts: its capture proves nothing"
        for kind in [*HOPS, "control"]:
            assert not seen[kind], f"a frame alice wrote ({kind}) into alpha's tunnel reached beta's VM {where}"
    for where, tags in hop["trunk"].items():
        assert tags["control"] and set(tags["control"]) == {(TPID_8021Q, alpha.vlan_id)}, (where, tags)
        assert (TPID_8021Q, beta.vlan_id) in tags["own"], f"{where} did not see beta's VLAN: {tags}"
        for kind in HOPS:
            assert set(tags[kind]) <= {(TPID_8021Q, alpha.vlan_id)}, f"{kind} out of alpha's VLAN on {where}: {tags}"
        assert tags["802.1Q"] == tags["own-tag+802.1Q"] == [], f"802.1Q-tagged client frames passed {where}: {tags}"
    c.stop()

    # 2. The documented switch: the profile's `setenv UV_VCLUSTER` line names the other cluster.
    c = gw.client(profile.replace(f"setenv UV_VCLUSTER {la}", f"setenv UV_VCLUSTER {lb}"), "alice-beta").up()
    gw.says(f"ACCEPT cn=alice serial={credential.serial}: cluster {lb} -> vlan-pvid {beta.vlan_id}")
    for n in b_nodes:
        assert c.ping(n.address), f"beta {n.name} at {n.host} unreachable"
        assert c.mac_of(n.address) == n.mac
    c.stop()

    # 3. A cluster the AC does not cover (charlie's gamma): refused by the gateway, and by the API.
    c = gw.client(profile.replace(f"setenv UV_VCLUSTER {la}", f"setenv UV_VCLUSTER {lg}"), "alice-gamma")
    assert c.outcome() == "auth-failed", read(c.log)[-2000:]
    gw.says(f"cluster {lg} is not in the AC (grants: {la}, {lb})")
    c.stop()
    status, body, _ = portal.request("POST", "/api/access/vpn-profiles/", alice_token, {"clusters": [c_id]})
    assert status == 403, body

    # 4. Tampered and expired ACs inside certificates of the portal's own CA: refused at TLS.
    for how, reason in (("tampered", "AC invalid: bad signature"), ("expired", "AC invalid: AC expired")):
        text, serial = _with_bad_ac(profile, la, how)
        c = gw.client(text, f"alice-{how}")
        gw.says(f"REFUSE tls-verify: subject='O=VirtCloud, CN=alice' serial={serial}: {reason}")
        assert "Initialization Sequence Completed" not in read(c.log)
        c.stop()

    # 5. Revocation in the portal (the user's "I lost my laptop", through the API): the gateway's next pull
    #    installs the CRL and cuts the live session; the reconnect is refused.
    c = gw.client(profile, "alice-live").up()
    assert c.ping(a_nodes[1].address)
    status, body, _ = portal.request("POST", f"/api/access/credentials/{credential.pk}/revoke/", alice_token, {})
    assert status == 200, body
    out = gw.pull(portal.url, token_file)
    assert f"cut the sessions of serials {credential.serial}" in out, out
    wait_for(lambda: "Halt command was pushed by server" in read(c.log), 10, what="the live session cut")
    c.stop()
    c = gw.client(profile, "alice-revoked")
    gw.says(f"certificate revoked: O=VirtCloud, CN=alice, serial={credential.serial}")
    assert "Initialization Sequence Completed" not in read(c.log)
    c.stop()

    # 6. The portal goes down: the pull fails (EX_TEMPFAIL), the gateway keeps authorizing from its last
    #    state, and bob (alpha's group) connects with the profile he downloaded before.
    status, body, _ = portal.request("POST", "/api/access/vpn-profiles/", user_token(bob), {"clusters": [a_id]})
    assert status == 200, body
    bob_profile = body.decode()
    portal.stop()
    with pytest.raises(PullFailed) as exit_info:
        gw.pull(portal.url, token_file)
    assert exit_info.value.code == 75
    c = gw.client(bob_profile, "bob-portal-down").up()
    gw.says(f"cn=bob serial={Credential.objects.get(user=bob).serial}: cluster {la} -> vlan-pvid {alpha.vlan_id}")
    for n in a_nodes:
        assert c.ping(n.address), f"with the portal down, bob cannot reach alpha {n.name}"
    c.stop()
    print(f"\nclusters READY and VMs attached in {ready_s:.1f} s; whole scenario {time.monotonic() - started:.1f} s")
