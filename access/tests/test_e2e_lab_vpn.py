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
and nothing of beta or gamma; switching the profile's ``setenv UV_VCLUSTER`` lands on beta; a cluster the
AC does not cover (gamma) → AUTH_FAILED, and the API refuses that profile; tampered and expired ACs
(certificates from the portal's own CA and AA) → refused at TLS; revocation in the portal → the gateway's
pull installs the CRL and cuts the live session, the reconnect is refused; with the portal stopped the pull
fails (exit 75), the gateway keeps its last state and an authorized user (bob) still connects.
"""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests._lab are parameters here)

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from django.core.management import call_command
from rest_framework.test import APIClient

from access import attrcerts, pki, services
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
from access.tests._procs import Netns, can_use_netns, gateway_link, read, run_prefix, sh, stop, wait_for

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
    gw.procs.append(gw.gw.popen("openvpn", "--config", str(gw.state / "openvpn.conf"), "--log", str(gw.log)))
    gw.says("Initialization Sequence Completed")

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
