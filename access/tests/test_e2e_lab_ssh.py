"""End to end in the netns lab: a user lands on the nodes of his closed cluster at every site through the
portal's SSH bastion, with the ssh_config, key and certificate downloaded through the API (issue 7, "done
means").

Everything comes from the portal: clusters created through the API with a user-provided image (closed), nodes
given their ``address``, made READY by a real Celery worker; the bastion's ``sshd_config``, host key and
certificate (``manage.py gateway config``); its state (user CA, KRL, principals with ``permitopen`` targets =
the cluster's node addresses) pulled over HTTP with its token (``manage.py gateway pull``); the nodes' host
certificates from the portal's host CA; the user's certificate, key pair and ``virtcloud.conf`` from
``POST /api/access/ssh-certificates/``. Topology (``vl…`` names are the lab's, ``va…`` ours)::

    <va>-ws   "user workstation": ssh -F virtcloud.conf <cluster>-node<n>            198.18.249.2/30
       |  veth
    bastion   sshd (portal-rendered), public leg 198.18.249.1/30, cluster leg 198.18.20.250/24
       |  eth0 = access port of alpha's VLAN on brno-h1's bridge (lab.attach_vm)
    brno-sw ==QinQ core== pilsen-sw, prague-sw -- alpha node1..3 (198.18.20.1..3): sshd, host certs

Why the bastion's cluster leg is a VM-like access port rather than a leg on the gateway trunk: this kernel has
no 802.1Q (LAB.md §1), so a namespace cannot terminate one VLAN of the trunk bridge (no VLAN sub-interface,
no VLAN filtering on the plain Linux bridge). A host bridge port tagged with the cluster's VLAN (Open vSwitch
does the tagging) is the same L2 leg. In production the bastion has one VLAN sub-interface per cluster on the
trunk; note that ``permitopen`` names addresses, so the portal withholds an address that two clusters use
(step 7).

Clusters: alice's ``alpha`` (group physics) with node1..3 at brno/pilsen/prague; charlie's ``beta`` with one
node in another subnet.

Proves: ``ssh -F virtcloud.conf alpha-…-node<n>`` lands on every node (ProxyJump through the bastion, host
certificates, no prompt: StrictHostKeyChecking yes); refused with sshd's own messages for an expired
certificate, a principal of another cluster, a forwarding target outside the cluster, a certificate revoked in
the portal (KRL installed by the pull), and a certificate signed by another CA; and once another cluster
uses the address of one of alpha's nodes, the bastion relays to that node for neither cluster (the rest of
alpha stays reachable).
"""
# ruff: noqa: F401, F811 (pytest fixtures imported from access.tests._lab are parameters here)

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from access import services, ssh
from access.gateway import bastion as bastion_module
from access.gateway import sshd
from access.gateway.state import SshState
from access.models import Authority, AuthorityKind, Gateway, GatewayKind
from access.selectors import cluster_label
from access.tests._lab import (
    LabNetns,
    cluster_post,
    gateway_pull,
    gateway_token,
    lab_inventory,
    portal,
    user_token,
    wait_ready,
)
from access.tests._procs import Netns, can_use_netns, node_sshd_config, public_link, read, run_prefix, stop, wait_for

SSHD = "/usr/sbin/sshd"
_skip = (
    can_use_netns()
    or (None if os.path.exists(SSHD) else "openssh-server (sshd) not installed")
    or (None if shutil.which("ssh") else "openssh-client (ssh) not installed")
)
pytestmark = [
    pytest.mark.lab,
    pytest.mark.worker,
    pytest.mark.skipif(bool(_skip), reason=_skip or ""),
    pytest.mark.django_db(transaction=True),
]

BASTION_PUBLIC, WS_PUBLIC = "198.18.249.1", "198.18.249.2"
BASTION_CLUSTER_LEG = "198.18.20.250/24"
ACCOUNT = "nobody"  # exists everywhere with a no-login shell: right for a relay-only bastion
SITES = ["brno-h1", "pilsen-h1", "prague-h1"]


@pytest.fixture
def run_dir():
    # Not under /tmp: sshd's StrictModes refuses a principals file below a world-writable directory.
    prefix = run_prefix()
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/run"))
    root.chmod(0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    try:
        yield prefix, root
    finally:
        if not os.environ.get("VIRTCLOUD_KEEP_TEST_FILES"):
            shutil.rmtree(root, ignore_errors=True)


def _node_sshd(d: Path, portal, token: str, cluster_id: int, node) -> tuple[Path, dict]:
    """A cluster node's sshd as the cluster's image sets it up at boot: its own host key, certified by the
    portal (``POST /api/access/host-certificates/`` with the owner's token), and from the same answer the
    portal's user CA, trusted for root with the cluster's principals. Returns the config and the answer."""
    d.mkdir(mode=0o755)
    key = ssh.generate_user_key()
    (d / "host_key").write_bytes(key.private_openssh)
    (d / "host_key").chmod(0o600)
    body = {"cluster": cluster_id, "node": node.name, "public_key": key.public_line}
    status, answer, _ = portal.request("POST", "/api/access/host-certificates/", token, body)
    assert status == 201, answer
    issued = json.loads(answer)
    (d / "host_key-cert.pub").write_text(issued["certificate"] + "\n")
    (d / "user_ca.pub").write_text(issued["user_ca"] + "\n")
    conf = node_sshd_config(
        d, address=node.address, user_ca=d / "user_ca.pub", principals=issued["authorized_principals"]
    )
    return conf, issued


class Workstation:
    """The user's machine: one folder per download (as unzipped), ``ssh -F virtcloud.conf`` run inside it."""

    def __init__(self, ns: Netns, root: Path):
        self.ns, self.root = ns, root
        self.n = 0

    def folder(self, issued: dict) -> Path:
        """Save an API answer as the download's files (relative paths, as the config expects)."""
        self.n += 1
        d = self.root / f"user{self.n}"
        d.mkdir(mode=0o700)
        (d / services.SSH_CONFIG_FILE).write_text(issued["ssh_config"])
        (d / services.SSH_KNOWN_HOSTS_FILE).write_text(issued["known_hosts"])
        (d / services.SSH_CERT_FILE).write_text(issued["certificate"] + "\n")
        (d / services.SSH_KEY_FILE).write_text(issued["private_key"])
        (d / services.SSH_KEY_FILE).chmod(0o600)
        return d

    def variant(self, d: Path, certificate: str) -> Path:
        """A copy of the folder ``d`` with another certificate for the same key."""
        self.n += 1
        copy = self.root / f"user{self.n}"
        shutil.copytree(d, copy)
        (copy / services.SSH_CERT_FILE).write_text(certificate + "\n")
        return copy

    def ssh(self, d: Path, host: str, *command: str, hostname: str | None = None) -> subprocess.CompletedProcess:
        opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
        if hostname:
            opts += ["-o", f"HostName={hostname}"]
        return subprocess.run(
            self.ns.cmd("ssh", "-F", services.SSH_CONFIG_FILE, *opts, host, *command),
            cwd=d,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
        )


def _denied(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 255 and "Permission denied (publickey)" in r.stderr, (r.returncode, r.stderr)


def test_ssh_through_the_portal_made_bastion_to_every_site(
    lab_inventory, celery_worker, portal, run_dir, alice, charlie, root, team
):
    lab = lab_inventory
    prefix, rundir = run_dir
    started = time.monotonic()
    api = {u.username: APIClient() for u in (alice, charlie)}
    for u in (alice, charlie):
        api[u.username].force_authenticate(u)
    a_id, a_nodes = cluster_post(
        api["alice"],
        "alpha",
        [(h, f"198.18.20.{i}") for i, h in enumerate(SITES, 1)],
        group="physics",
        bastion_address=BASTION_CLUSTER_LEG,
    )
    # (the bastion forwards only into the network of its address in a cluster: beta's has one too)
    b_id, b_nodes = cluster_post(
        api["charlie"], "beta", [("pilsen-h2", "198.18.21.1")], bastion_address="198.18.21.250/24"
    )
    clusters = wait_ready(a_id, b_id)
    alpha, beta = clusters[a_id], clusters[b_id]
    la, lb = cluster_label(alpha), cluster_label(beta)
    vms = {n.name: lab.attach_vm(n.host, alpha.vlan_id, f"alpha-{n.name}", f"{n.address}/24", n.mac) for n in a_nodes}

    # The bastion: made in the portal, configured by `gateway config`, state pulled over HTTP.
    from network.models import Site

    gateway = Gateway.objects.create(
        name="brno-bastion",
        site=Site.objects.get(name="brno"),
        kind=GatewayKind.SSH,
        address=BASTION_PUBLIC,
        ssh_user=ACCOUNT,
    )
    state = rundir / "gw"
    token_file = gateway_token(gateway, root, rundir / "gateway.token")
    call_command(
        "gateway", "config", gateway.name, "--dir", str(state), "--ssh-listen", BASTION_PUBLIC, stdout=StringIO()
    )

    def pull() -> str:
        return gateway_pull(portal.url, token_file, state)

    assert "gateway pull:" in pull()
    # Its leg into alpha, as the operator's --on-change hook makes it from ssh/clusters.json (the VLAN and
    # the address alpha's scheduler gave; here an access port of that VLAN, see above).
    leg = json.loads((state / "ssh" / "clusters.json").read_text())["clusters"][la]
    assert (leg["vlan"], leg["bastion_address"]) == (alpha.vlan_id, BASTION_CLUSTER_LEG)
    bastion_vm = lab.attach_vm("brno-h1", leg["vlan"], "bastion", leg["bastion_address"])
    ready_s = time.monotonic() - started

    procs: list[subprocess.Popen] = []
    ws = Netns(f"{prefix}-ws")
    try:
        bastion = LabNetns(bastion_vm.netns)
        public_link(bastion, ws, prefix, BASTION_PUBLIC, WS_PUBLIC, f"{prefix}w")

        principals = (state / "ssh" / "principals" / ACCOUNT).read_text()
        targets = ",".join(f'permitopen="{n.address}:22"' for n in a_nodes)
        assert f"restrict,port-forwarding,{targets} {la}.alice" in principals, principals
        bastion_log = rundir / "bastion.log"
        procs.append(bastion.popen(SSHD, "-D", "-f", str(state / "sshd_config"), "-E", str(bastion_log)))

        # alpha's nodes: sshd with host certificates, trusting the user CA for alpha's principals.
        doc = services.gateway_state(gateway=gateway)
        alpha_principals = doc["ssh"]["clusters"][la]["principals"]
        assert alpha_principals == [f"{la}.alice"]  # owner; the group's other members would be listed too
        logs = [bastion_log]
        owner_token = user_token(alice)
        for n in a_nodes:
            conf, host = _node_sshd(rundir / n.name, portal, owner_token, a_id, n)
            assert host["principals"] == [f"{n.name}.{la}"]  # the alias: the ssh_config's HostKeyAlias
            # what the node trusts is what the bastion pulled: the same user CA, the same principals
            assert host["user_ca"] == (state / "ssh" / "user_ca.pub").read_text().strip()
            assert [p for p in host["authorized_principals"].splitlines() if p[:1] != "#"] == alpha_principals
            logs.append(rundir / f"{n.name}.log")
            procs.append(LabNetns(vms[n.name].netns).popen(SSHD, "-D", "-f", str(conf), "-E", str(logs[-1])))
        for log in logs:
            wait_for(lambda log=log: "Server listening on" in read(log), 10, what=f"sshd in {log.name}")

        def bastion_says(needle: str) -> None:
            wait_for(lambda: needle in read(bastion_log), 5, what=f"bastion log line {needle!r}")

        # alice downloads her certificate, key and ssh_config (over HTTP, with her API token).
        alice_token = user_token(alice)
        status, body, _ = portal.request("POST", "/api/access/ssh-certificates/", alice_token, {"cluster": a_id})
        assert status == 201, body
        issued = json.loads(body)
        assert issued["principal"] == f"{la}.alice"
        station = Workstation(ws, rundir)
        home = station.folder(issued)

        # 1. Every node, at every site, through the bastion; no host-key prompt is possible (BatchMode,
        #    StrictHostKeyChecking yes): the host certificates from the portal's host CA are checked.
        for n in a_nodes:
            t = time.perf_counter()
            r = station.ssh(home, f"{n.name}.{la}", "ip", "-brief", "addr", "show", "eth0")
            assert r.returncode == 0, r.stderr
            assert f"{n.address}/24" in r.stdout, r.stdout
            print(f"\nssh {n.name}.{la} ({n.host}) through the bastion: {(time.perf_counter() - t) * 1000:.0f} ms")
        bastion_says(f'Accepted certificate ID "{issued["key_id"]}" (serial {issued["serial"]})')

        user_ca = ssh.load_ca_key(
            str(Authority.objects.get(kind=AuthorityKind.SSH_USER).private_key).encode(), services.ca_passphrase()
        )

        def portal_signed(cluster: str, **kw) -> str:
            return ssh.issue_user_cert(
                user_ca,
                public_key=issued["public_key"],
                user="alice",
                cluster=cluster,
                serial=services.serial_allocate("e2e-ssh"),
                **kw,
            )

        # 2. An expired certificate (the portal's CA, alice's key and principal, ended an hour ago).
        old = station.variant(home, portal_signed(la, hours=1, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)))
        _denied(station.ssh(old, f"node1.{la}", "true"))
        bastion_says("Certificate invalid: expired")

        # 3. A principal of another cluster: charlie's beta, which alice is not a member of.
        other = station.variant(home, portal_signed(lb))
        _denied(station.ssh(other, f"node1.{la}", "true"))
        bastion_says("Certificate does not contain an authorized principal")

        # 4. Forwarding outside the cluster: charlie's valid beta certificate may log in to the bastion,
        #    but not open a channel to alpha's node (reachable from the bastion, not permitted to beta).
        status, body, _ = portal.request(
            "POST", "/api/access/ssh-certificates/", user_token(charlie), {"cluster": b_id}
        )
        assert status == 201, body
        charlie_home = station.folder(json.loads(body))
        assert "pull:" in pull()  # (the state already had beta: nothing else changes)
        r = station.ssh(charlie_home, f"node1.{lb}", "true", hostname=a_nodes[0].address)
        assert r.returncode == 255 and "administratively prohibited" in r.stderr, r.stderr
        bastion_says(f"to connect to host {a_nodes[0].address} port 22, but the request was denied")

        # 5. Revoked in the portal (the user, through the API), KRL installed by the gateway's pull.
        assert station.ssh(home, f"node1.{la}", "true").returncode == 0
        status, body, _ = portal.request(
            "POST", f"/api/access/credentials/{issued['credential']}/revoke/", alice_token, {}
        )
        assert status == 200, body
        assert "updated" in pull()
        _denied(station.ssh(home, f"node1.{la}", "true"))
        bastion_says("revoked by file")

        # 6. A certificate from another CA, for alice's key and her alpha principal (a valid one works).
        status, body, _ = portal.request("POST", "/api/access/ssh-certificates/", alice_token, {"cluster": a_id})
        assert status == 201, body
        fresh = station.folder(json.loads(body))
        assert station.ssh(fresh, f"node3.{la}", "true").returncode == 0
        rogue, serial = ssh.generate_ca_key(), services.serial_allocate("e2e-ssh")
        forged = ssh.issue_user_cert(rogue, public_key=issued["public_key"], user="alice", cluster=la, serial=serial)
        _denied(station.ssh(station.variant(home, forged), f"node1.{la}", "true"))
        bastion_says(f"(serial {serial}) CA ED25519 {ssh.fingerprint(rogue)}")
        assert not re.search(rf'Accepted certificate ID "[^"]*:serial={serial}:', read(bastion_log))
        assert f'Accepted certificate ID "{issued["key_id"]}"' in read(rundir / "node1.log")  # the node's own check

        # 7. beta's scheduler gives beta's node alpha's node2 address (closed clusters may): the bastion,
        #    which forwards by address, must carry neither cluster's users there; the rest is unchanged.
        from clusters.models import Node

        shared = a_nodes[1].address
        Node.objects.filter(cluster_id=b_id).update(address=shared)
        assert "updated" in pull()
        assert f'permitopen="{shared}:22"' not in (state / "ssh" / "principals" / ACCOUNT).read_text()
        r = station.ssh(fresh, f"{a_nodes[1].name}.{la}", "true", hostname=shared)
        assert r.returncode == 255 and "administratively prohibited" in r.stderr, r.stderr
        r = station.ssh(charlie_home, f"node1.{lb}", "true", hostname=shared)
        _denied(r)  # beta's principal has no target left: no login at all
        assert station.ssh(fresh, f"node3.{la}", "true").returncode == 0
        print(f"clusters READY and VMs attached in {ready_s:.1f} s; scenario {time.monotonic() - started:.1f} s")
    finally:
        for p in procs:
            stop(p)
        ws.delete()


def test_a_bastion_per_cluster_tells_apart_clusters_that_use_the_same_addresses(
    lab_inventory, celery_worker, portal, run_dir, alice, charlie, root
):
    """Two closed clusters whose only nodes have the same address (at different sites), both giving the same
    bastion address. The gateway runs a bastion per cluster (``ssh_port_base``, access/gateway/bastion.py):
    each cluster's port starts sshd inside the namespace of that cluster's leg, so alice lands on alpha's node
    and charlie on gamma's (told apart by their MAC addresses), and alice's certificate opens nothing on
    gamma's port. The legs are what ``legs.py --namespaces`` makes, built here as access ports of each VLAN
    (this kernel has no 802.1Q) under the names the bastion expects."""
    lab = lab_inventory
    prefix, rundir = run_dir
    api = {u.username: APIClient() for u in (alice, charlie)}
    for u in (alice, charlie):
        api[u.username].force_authenticate(u)
    same, leg_address, base = "198.18.30.1", "198.18.30.250/24", 30000
    public, ws_public = "198.18.249.5", "198.18.249.6"
    a_id, (a_node,) = cluster_post(api["alice"], "alpha", [("brno-h1", same)], bastion_address=leg_address)
    g_id, (g_node,) = cluster_post(api["charlie"], "gamma", [("pilsen-h1", same)], bastion_address=leg_address)
    clusters = wait_ready(a_id, g_id)
    alpha, gamma = clusters[a_id], clusters[g_id]
    la, lg = cluster_label(alpha), cluster_label(gamma)
    vm_netns = {
        c.name: lab.attach_vm(n.host, c.vlan_id, f"ns-{c.name}-{n.name}", f"{same}/24", n.mac).netns
        for c, n in ((alpha, a_node), (gamma, g_node))
    }

    gateway = Gateway.objects.create(
        name="ns-bastion", kind=GatewayKind.SSH, address=public, ssh_user=ACCOUNT, ssh_port_base=base
    )
    state = rundir / "gw"
    token_file = gateway_token(gateway, root, rundir / "gateway.token")
    call_command("gateway", "config", gateway.name, "--dir", str(state), "--ssh-listen", public, stdout=StringIO())
    assert "gateway pull:" in gateway_pull(portal.url, token_file, state)
    doc = services.gateway_state(gateway=gateway)
    assert doc["ssh"]["clusters"][la]["targets"] == [[same, 22]] == doc["ssh"]["clusters"][lg]["targets"]

    legs = json.loads((state / "ssh" / "clusters.json").read_text())["clusters"]
    template = f"{prefix}L{{vid}}"
    aliases, procs = [], []
    pub, ws = Netns(f"{prefix}-pub"), Netns(f"{prefix}-ws")
    try:
        for label, node in ((la, a_node), (lg, g_node)):
            entry = legs[label]  # (plugged in where the VLAN is: the lab's gateway trunk is not a namespace's)
            vm = lab.attach_vm(node.host, entry["vlan"], f"leg-{label}", entry["bastion_address"])
            alias = Path("/run/netns") / template.format(vid=entry["vlan"])
            alias.touch()
            aliases.append(alias)
            subprocess.run(["mount", "--bind", f"/run/netns/{vm.netns}", str(alias)], check=True)
        public_link(pub, ws, prefix, public, ws_public, f"{prefix}w")
        sshd_log, log = rundir / "sshd.log", rundir / "bastion.log"
        procs.append(
            pub.popen(
                sys.executable, "-I", str(Path(bastion_module.__file__)), "--state", str(state), "--listen", public,
                "--port-base", str(base), "--netns", template, "--every", "0.5", "--sshd-log", str(sshd_log),
                log=log,
            )
        )  # fmt: skip
        for c in (alpha, gamma):
            wait_for(lambda c=c: f"port {base + c.vlan_id}: cluster" in read(log), 10, what=f"{c.name}'s port")
        for c, node, owner in ((alpha, a_node, alice), (gamma, g_node, charlie)):
            conf, _ = _node_sshd(rundir / c.name, portal, user_token(owner), c.pk, node)
            node_log = rundir / f"{c.name}.log"
            procs.append(LabNetns(vm_netns[c.name]).popen(SSHD, "-D", "-f", str(conf), "-E", str(node_log)))
            wait_for(lambda node_log=node_log: "Server listening on" in read(node_log), 10, what="node sshd")

        station = Workstation(ws, rundir)
        homes, serials, credentials = {}, {}, {}
        for user, cid in ((alice, a_id), (charlie, g_id)):
            status, body, _ = portal.request(
                "POST", "/api/access/ssh-certificates/", user_token(user), {"cluster": cid}
            )
            assert status == 201, body
            issued = json.loads(body)
            homes[user.username] = station.folder(issued)
            serials[user.username] = issued["serial"]
            credentials[user.username] = issued["credential"]
        assert f"Port {base + alpha.vlan_id}\n" in (homes["alice"] / services.SSH_CONFIG_FILE).read_text()
        # the host CA is trusted for her bastion's port and alpha's node only (as ssh looks them up)
        trusted = (homes["alice"] / services.SSH_KNOWN_HOSTS_FILE).read_text().split()[1]
        assert trusted == f"[{public}]:{base + alpha.vlan_id},node1.{la}"  # the node by its alias (HostKeyAlias)

        mac_of = "cat /sys/class/net/eth0/address"
        r = station.ssh(homes["alice"], f"node1.{la}", mac_of)
        assert (r.returncode, r.stdout.strip()) == (0, a_node.mac), r.stderr + read(sshd_log)
        r = station.ssh(homes["charlie"], f"node1.{lg}", mac_of)
        assert (r.returncode, r.stdout.strip()) == (0, g_node.mac), r.stderr + read(sshd_log)
        # the logins were recorded as with one sshd (what a revocation or an expired state cuts)
        assert all((state / "ssh" / "run" / "sessions" / str(n)).exists() for n in serials.values())

        # alice's certificate on gamma's port: gamma's bastion knows only gamma's principals.
        crossed = station.variant(homes["alice"], (homes["alice"] / services.SSH_CERT_FILE).read_text().strip())
        config = crossed / services.SSH_CONFIG_FILE
        config.write_text(
            config.read_text().replace(f"Port {base + alpha.vlan_id}\n", f"Port {base + gamma.vlan_id}\n")
        )
        known = crossed / services.SSH_KNOWN_HOSTS_FILE  # (her host CA line names her bastion's port only)
        known.write_text(known.read_text().replace(f"]:{base + alpha.vlan_id},", f"]:{base + gamma.vlan_id},"))
        accepted = rf"Accepted publickey for \S+ from .* ID \S*:serial={serials['alice']}:"
        refused = "Certificate does not contain an authorized principal"
        before, refusals = len(re.findall(accepted, read(sshd_log))), read(sshd_log).count(refused)
        assert before >= 1, read(sshd_log)  # her login through alpha's bastion is in the log the bastions write
        _denied(station.ssh(crossed, f"node1.{la}", "true"))
        # refused by gamma's bastion itself (gamma's node would refuse her too: that alone would prove nothing)
        wait_for(lambda: read(sshd_log).count(refused) > refusals, 5, what="gamma's bastion refusing her principal")
        assert len(re.findall(accepted, read(sshd_log))) == before, read(sshd_log)

        # Revoked in the portal: the pull ends alice's live session through her cluster's bastion too, and
        # leaves charlie's (through his) alone.
        live = {}
        for user, label in (("alice", la), ("charlie", lg)):
            live[user] = subprocess.Popen(
                ws.cmd("ssh", "-F", services.SSH_CONFIG_FILE, "-o", "BatchMode=yes", f"node1.{label}", "sleep", "60"),
                cwd=homes[user],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(live[user])
        logged_in = set(serials.values())
        wait_for(lambda: logged_in <= sshd.live_serials(SshState.at(state)), 10, what="both live logins")
        status, body, _ = portal.request(
            "POST", f"/api/access/credentials/{credentials['alice']}/revoke/", user_token(alice), {}
        )
        assert status == 200, body
        assert "updated" in gateway_pull(portal.url, token_file, state)
        wait_for(lambda: live["alice"].poll() is not None, 10, what="alice's session to end")
        assert live["charlie"].poll() is None
    finally:
        for p in procs:
            stop(p)
        for alias in aliases:
            subprocess.run(["umount", str(alias)], check=False)
            alias.unlink(missing_ok=True)
        pub.delete()
        ws.delete()
