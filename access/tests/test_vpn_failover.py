"""VPN failover for real: one profile naming two gateways that carry the cluster, real OpenVPN 2.6 servers in two
namespaces, one client namespace linked to both.

Topology (per run, prefix ``va<hex>``)::

    <p>-g1  gateway 1: openvpn server (virtcloud-gateway-gw1)   198.18.250.1/30 ── <p>a ┐
    <p>-g2  gateway 2: openvpn server (virtcloud-gateway-gw2)   198.18.250.5/30 ── <p>b ┤ <p>-cl  the client

Each gateway has its own server certificate and its own tls-crypt key, as the portal's gateways do; one VPN CA
and one Attribute Authority for both. Proves: the profile's first gateway down → the client lands on the second;
the first gateway shut down under a live session (``explicit-exit-notify 2``) → the client moves to the second;
a gateway whose certificate's name is outside the pinned prefix is refused, and the next one is tried; so is one
that answers with a certificate the profile does not pin (a re-enrolled gateway's old key: same CA, same name).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from access import attrcerts, openvpn, pki
from access.gateway.state import VpnState, fresh_until_path, fresh_until_text, vlan_map_json, write_atomic
from access.tests._procs import Netns, can_use_netns, gateway_link, read, run_prefix, stop, wait_for

_skip = can_use_netns() or (None if shutil.which("openvpn") else "openvpn binary not installed")
pytestmark = [pytest.mark.lab, pytest.mark.skipif(bool(_skip), reason=_skip or "")]

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
ADDRS = {"gw1": ("198.18.250.1", "198.18.250.2"), "gw2": ("198.18.250.5", "198.18.250.6")}
VLANS = {"c42": 142}


class Pki:
    def __init__(self):
        self.ca = pki.create_ca("VirtCloud VPN CA")
        self.aa_key = pki.generate_private_key()
        self.aa_cert = pki.issue_aa_cert(self.ca, public_key=self.aa_key.public_key(), serial=2)
        self.serial = 100

    def next_serial(self) -> int:
        self.serial += 1
        return self.serial


class Server:
    """One gateway: its state (own server certificate and tls-crypt key), its namespace and its openvpn."""

    def __init__(self, tmp: Path, ca: Pki, name: str, server_name: str):
        self.name, self.server_name = name, server_name
        self.address = ADDRS[name][0]
        self.tls_crypt = pki.generate_tls_crypt_key()
        self.root = tmp / name
        self.state = VpnState.at(self.root / "state")
        self.state.ensure_dirs()
        key = pki.generate_client_key()
        cert = pki.issue_server_cert(ca.ca, public_key=key.public_key, common_name=server_name, serial=ca.next_serial())
        self.fingerprint = pki.cert_fingerprint(cert)
        write_atomic(self.state.ca, ca.ca.cert_pem())
        write_atomic(self.state.aa, pki.cert_to_pem(ca.aa_cert))
        write_atomic(self.state.server_cert, pki.cert_to_pem(cert))
        write_atomic(self.state.server_key, key.private_pem)
        write_atomic(self.state.tls_crypt, self.tls_crypt)
        write_atomic(self.state.vlans, vlan_map_json(VLANS, generated_at=NOW.isoformat()))
        write_atomic(fresh_until_path(self.root / "state"), fresh_until_text(time.time() + 3600), 0o644)
        write_atomic(self.state.crl, pki.crl_to_pem(pki.build_crl(ca.ca, [], crl_number=1)))
        self.log = self.root / "server.log"
        self.proc: subprocess.Popen | None = None
        self.ns: Netns | None = None
        self.tap = ""

    def start(self) -> None:
        conf = self.root / "server.conf"
        conf.write_text(
            openvpn.render_server_config(state_dir=self.state.root.parent, dev=self.tap, local=self.address)
        )
        self.proc = self.ns.popen("openvpn", "--config", str(conf), "--log", str(self.log))
        wait_for(lambda: "Initialization Sequence Completed" in read(self.log), 10, what=f"{self.name} to start")

    def remote(self) -> openvpn.Remote:
        return openvpn.Remote(
            host=self.address,
            port=1194,
            proto="udp",
            server_name=self.server_name,
            tls_crypt_key=self.tls_crypt,
            fingerprint=self.fingerprint,
        )


@contextlib.contextmanager
def _lab(tmp: Path, names: dict[str, str]) -> Iterator[tuple[Pki, dict[str, Server], Netns, list]]:
    """Two gateway namespaces (their server names from ``names``), a client namespace linked to both; nothing
    started. Everything is stopped and deleted on exit."""
    prefix = run_prefix()
    made: list[Netns] = []
    procs: list[subprocess.Popen] = []
    servers: dict[str, Server] = {}
    ca = Pki()
    try:
        client = Netns(f"{prefix}-cl")
        made.append(client)
        for i, (name, server_name) in enumerate(names.items()):
            server = Server(tmp, ca, name, server_name)
            server.ns = Netns(f"{prefix}-g{i + 1}")
            made.append(server.ns)
            server.tap = gateway_link(server.ns, client, prefix, *ADDRS[name], f"{prefix}{'ab'[i]}")
            servers[name] = server
        yield ca, servers, client, procs
    finally:
        for p in [*procs, *(s.proc for s in servers.values() if s.proc)]:
            stop(p, kill=True)
        for ns in made:
            ns.delete()


def _profile(ca: Pki, first: Server, *fallbacks: Server, dev: str = "vcf0") -> str:
    key = pki.generate_client_key()
    serial = ca.next_serial()
    start, end = NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=1)
    ac = attrcerts.issue_ac(
        aa_key=ca.aa_key,
        aa_cert=ca.aa_cert,
        holder=attrcerts.Holder(ca.ca.name, serial, start, end),
        serial=serial,
        fqans=[attrcerts.fqan("c42")],
    )
    cert = pki.issue_client_cert(
        ca.ca, public_key=key.public_key, user="alice", serial=serial, not_before=start, not_after=end, ac_der=ac
    )
    return openvpn.render_client_profile(
        cluster="c42",
        remote=(first.address, 1194),
        server_name=first.server_name,
        server_fingerprint=first.fingerprint,
        ca_pem=ca.ca.cert_pem(),
        cert_pem=pki.cert_to_pem(cert),
        key_pem=key.private_pem,
        tls_crypt_key=first.tls_crypt,
        dev=dev,
        user="alice",
        fallbacks=[s.remote() for s in fallbacks],
    )


def _client(tmp: Path, client: Netns, procs: list, text: str, name: str = "alice") -> Path:
    path, log = tmp / f"{name}.ovpn", tmp / f"{name}.log"
    path.write_text(text)
    os.chmod(path, 0o600)
    procs.append(client.popen("openvpn", "--config", str(path), "--log", str(log)))
    return log


def _accepted(server: Server) -> bool:
    return "cluster c42 -> vlan-pvid 142" in read(server.log)


def test_the_client_lands_on_the_second_gateway_when_the_first_does_not_answer(tmp_path):
    names = {"gw1": "virtcloud-gateway-gw1", "gw2": "virtcloud-gateway-gw2"}
    with _lab(tmp_path, names) as (ca, servers, client, procs):
        gw1, gw2 = servers["gw1"], servers["gw2"]
        gw2.start()  # gw1 is down
        log = _client(tmp_path, client, procs, _profile(ca, gw1, gw2))
        wait_for(lambda: "Initialization Sequence Completed" in read(log), 40, what="the client to connect to gw2")
        assert _accepted(gw2), read(gw2.log)[-2000:]
        assert f"[AF_INET]{gw2.address}:1194" in read(log)


def test_a_live_session_moves_to_the_second_gateway_when_the_first_shuts_down(tmp_path):
    names = {"gw1": "virtcloud-gateway-gw1", "gw2": "virtcloud-gateway-gw2"}
    with _lab(tmp_path, names) as (ca, servers, client, procs):
        gw1, gw2 = servers["gw1"], servers["gw2"]
        gw1.start()
        gw2.start()
        log = _client(tmp_path, client, procs, _profile(ca, gw1, gw2))
        wait_for(lambda: "Initialization Sequence Completed" in read(log), 20, what="the client to connect to gw1")
        assert _accepted(gw1) and not _accepted(gw2)
        gw1.proc.send_signal(signal.SIGTERM)  # maintenance: the server tells its clients to go on to the next
        # one SIGTERM, and time to tell them: a second one at once (stop()'s) made a loaded server exit before
        # its exit notification went out — the client then waited for its ping-restart (60 s)
        try:
            gw1.proc.wait(20)
        except subprocess.TimeoutExpired:
            stop(gw1.proc)
        # told to go on, it does within seconds; a notification lost (UDP, a loaded machine) leaves it to its
        # ping-restart (60 s) and the poll of the gateway gone (10 s): it moves then
        try:
            wait_for(lambda: _accepted(gw2), 90, what="the client to move to gw2")
        except AssertionError:
            raise AssertionError(f"the client did not move to gw2:\n{read(log)[-3000:]}") from None
        wait_for(lambda: read(log).count("Initialization Sequence Completed") >= 2, 10, what="the session to be up")


def test_a_gateway_outside_the_pinned_names_is_refused_and_the_next_one_tried(tmp_path):
    """The profile pins the start its gateways' names share: a server certificate of the same CA under another
    name (here the first gateway's) is refused, and the client goes on to the next gateway."""
    names = {"gw1": "rogue-gateway-gw1", "gw2": "virtcloud-gateway-gw2"}
    with _lab(tmp_path, names) as (ca, servers, client, procs):
        gw1, gw2 = servers["gw1"], servers["gw2"]
        gw1.start()
        gw2.start()
        pinned_as = Server.__new__(Server)  # the profile believes gw1 is a virtcloud gateway
        pinned_as.__dict__.update(gw1.__dict__, server_name="virtcloud-gateway-gw1")
        log = _client(tmp_path, client, procs, _profile(ca, pinned_as, gw2))
        wait_for(lambda: "Initialization Sequence Completed" in read(log), 40, what="the client to connect to gw2")
        assert "VERIFY X509NAME ERROR: O=VirtCloud, CN=rogue-gateway-gw1" in read(log)
        assert _accepted(gw2) and not _accepted(gw1)


def test_a_gateway_answering_with_a_certificate_the_profile_does_not_pin_is_refused(tmp_path):
    """Profiles pin their gateways' certificates by fingerprint as well as by name: after gw1 was re-enrolled (the
    portal records a new certificate, the profile pins that one), whoever still holds gw1's old key — a valid
    certificate of the same CA under the right name — is refused, and the client goes on to the next gateway."""
    names = {"gw1": "virtcloud-gateway-gw1", "gw2": "virtcloud-gateway-gw2"}
    with _lab(tmp_path, names) as (ca, servers, client, procs):
        gw1, gw2 = servers["gw1"], servers["gw2"]
        gw1.start()  # still serving the old certificate
        gw2.start()
        renewed = pki.issue_server_cert(
            ca.ca, public_key=pki.generate_client_key().public_key, common_name=gw1.server_name, serial=ca.next_serial()
        )
        re_enrolled = Server.__new__(Server)
        re_enrolled.__dict__.update(gw1.__dict__, fingerprint=pki.cert_fingerprint(renewed))
        log = _client(tmp_path, client, procs, _profile(ca, re_enrolled, gw2))
        wait_for(lambda: "Initialization Sequence Completed" in read(log), 40, what="the client to connect to gw2")
        old = ":".join(gw1.fingerprint[i : i + 2] for i in range(0, 64, 2))
        assert f"certificate hash verification failed. (got certificate fingerprint: {old})" in read(log)
        assert _accepted(gw2) and not _accepted(gw1)
