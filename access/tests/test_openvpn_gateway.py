"""The OpenVPN access gateway for real: openvpn server and clients in two namespaces, our hooks, our PKI.

Topology (per run, prefix ``va<hex>``)::

    <p>-cl  client namespace: openvpn clients (one tap each)       198.18.250.2/30
       |  veth
    <p>-gw  gateway namespace: openvpn server, persistent tap <p>t  198.18.250.1/30
            tcpdump on the tap sees the frames OpenVPN tags with the client's VLAN

Proves: authorized cluster -> connected, client-connect wrote the right ``vlan-pvid`` and frames carry
that tag; a user with two clusters lands on each; unauthorized cluster -> AUTH_FAILED; no AC -> TLS
refused; revoked (CRL) -> refused; tampered/expired AC -> refused; the management ``kill`` cuts a live
session and the revoked client cannot come back.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from access import attrcerts, openvpn, pki, ssh
from access.gateway import management, pull, vpn
from access.gateway.state import VpnState, fresh_until_path, fresh_until_text, vlan_map_json, write_atomic
from access.tests._procs import can_use_netns, gateway_pair, read, stop, tagged_frame_seen, wait_for

_skip = can_use_netns() or (None if shutil.which("openvpn") else "openvpn binary not installed")


def needs_lab(fn):
    return pytest.mark.lab(pytest.mark.skipif(bool(_skip), reason=_skip or "")(fn))


GW_ADDR, CL_ADDR = "198.18.250.1", "198.18.250.2"
SERVER_NAME = "gw1.virtcloud.test"
VLANS = {"c42": 142, "c43": 143}
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


class Gateway:
    """PKI + state dir + the running server, and a way to make client profiles."""

    def __init__(self, tmp: Path, prefix: str):
        self.tmp, self.prefix = tmp, prefix
        self.ca = pki.create_ca("VirtCloud VPN CA")
        self.aa_key = pki.generate_private_key()
        self.aa_cert = pki.issue_aa_cert(self.ca, public_key=self.aa_key.public_key(), serial=2)
        self.tls_crypt = pki.generate_tls_crypt_key()
        self.revoked: list[tuple[int, dt.datetime, str]] = []
        self.crl_number = 0
        self.serial = 1000
        self.state = VpnState.at(tmp / "state")
        self.state.ensure_dirs()
        server_key = pki.generate_client_key()
        server_cert = pki.issue_server_cert(
            self.ca, public_key=server_key.public_key, common_name=SERVER_NAME, serial=3
        )
        write_atomic(self.state.ca, self.ca.cert_pem())
        write_atomic(self.state.aa, pki.cert_to_pem(self.aa_cert))
        write_atomic(self.state.server_cert, pki.cert_to_pem(server_cert))
        self.server_fingerprint = pki.cert_fingerprint(server_cert)
        write_atomic(self.state.server_key, server_key.private_pem)
        write_atomic(self.state.tls_crypt, self.tls_crypt)
        write_atomic(self.state.vlans, vlan_map_json(VLANS, generated_at=NOW.isoformat()))
        write_atomic(fresh_until_path(tmp / "state"), fresh_until_text(time.time() + 3600), 0o644)  # pulled now
        self.publish_crl()

    def publish_crl(self) -> None:
        self.crl_number += 1
        crl = pki.build_crl(self.ca, self.revoked, crl_number=self.crl_number)
        write_atomic(self.state.crl, pki.crl_to_pem(crl))

    def revoke(self, serial: int) -> None:
        self.revoked.append((serial, NOW, "key_compromise"))
        self.publish_crl()

    def profile(
        self,
        user: str,
        cluster: str,
        *,
        fqans: list[str] | None = None,
        ac: str = "good",
        dev: str,
    ) -> tuple[str, int]:
        """(profile text, cert serial). ``ac``: good | none | tampered | expired."""
        self.serial += 1
        serial = self.serial
        key = pki.generate_client_key()
        start, end = NOW - dt.timedelta(hours=1), NOW + dt.timedelta(days=1)
        holder = attrcerts.Holder(self.ca.name, serial, start, end)
        ac_der = None
        if ac != "none":
            window = {}
            if ac == "expired":
                window = {"not_before": start, "not_after": NOW - dt.timedelta(minutes=10)}
            ac_der = attrcerts.issue_ac(
                aa_key=self.aa_key,
                aa_cert=self.aa_cert,
                holder=holder,
                serial=serial,
                fqans=fqans or [attrcerts.fqan(cluster)],
                **window,
            )
            if ac == "tampered":
                i = ac_der.index(b"/virtcloud/") + len(b"/virtcloud/")
                ac_der = ac_der[:i] + bytes([ac_der[i] ^ 0x01]) + ac_der[i + 1 :]
        cert = pki.issue_client_cert(
            self.ca, public_key=key.public_key, user=user, serial=serial, not_before=start, not_after=end, ac_der=ac_der
        )
        text = openvpn.render_client_profile(
            cluster=cluster,
            remote=(GW_ADDR, 1194),
            server_name=SERVER_NAME,
            server_fingerprint=self.server_fingerprint,
            ca_pem=self.ca.cert_pem(),
            cert_pem=pki.cert_to_pem(cert),
            key_pem=key.private_pem,
            tls_crypt_key=self.tls_crypt,
            dev=dev,
            user=user,
        )
        return text, serial


@contextlib.contextmanager
def _running_gateway(tmp: Path, **server) -> Iterator[Gateway]:
    """A gateway namespace running our rendered server config (``server``: more of its arguments) and a
    client namespace linked to it."""
    with gateway_pair("cl", GW_ADDR, CL_ADDR) as (prefix, gw, cl, tap, procs):
        g = Gateway(tmp, prefix)
        conf = tmp / "server.conf"
        conf.write_text(openvpn.render_server_config(state_dir=g.state.root.parent, dev=tap, local=GW_ADDR, **server))
        log = tmp / "server.log"
        procs.append(gw.popen("openvpn", "--config", str(conf), "--log", str(log)))
        wait_for(lambda: "Initialization Sequence Completed" in read(log), 10, what="openvpn server start")
        g.gw, g.cl, g.tap, g.log, g.procs = gw, cl, tap, log, procs
        yield g


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with _running_gateway(tmp_path_factory.mktemp("ovpn")) as g:
        yield g


def _start_client(lab, text: str, name: str) -> tuple[subprocess.Popen, Path, float]:
    path = lab.tmp / f"{name}.ovpn"
    path.write_text(text)
    os.chmod(path, 0o600)
    log = lab.tmp / f"{name}.log"
    started = time.monotonic()
    proc = lab.cl.popen("openvpn", "--config", str(path), "--log", str(log))
    lab.procs.append(proc)
    return proc, log, started


def _connect_ok(lab, text: str, name: str) -> tuple[subprocess.Popen, Path, float]:
    proc, log, started = _start_client(lab, text, name)
    wait_for(
        lambda: "Initialization Sequence Completed" in read(log) or "AUTH_FAILED" in read(log),
        10,
        what=f"client {name} to connect",
    )
    elapsed = (time.monotonic() - started) * 1000
    assert "Initialization Sequence Completed" in read(log), read(log)[-2000:]
    return proc, log, elapsed


def _server_says(lab, needle: str, timeout: float = 10) -> None:
    wait_for(lambda: needle in read(lab.log), timeout, what=f"server log line {needle!r}")


@needs_lab
def test_authorized_cluster_connects_on_its_vlan(lab):
    text, serial = lab.profile("alice", "c42", fqans=[attrcerts.fqan("c42"), attrcerts.fqan("c43")], dev="vct1")
    proc, log, ms = _connect_ok(lab, text, "alice-c42")
    print(f"\nopenvpn connect (authorized): {ms:.0f} ms")
    _server_says(lab, f"ACCEPT cn=alice serial={serial}: cluster c42 -> vlan-pvid 142")
    frame = tagged_frame_seen(lab.gw, lab.tap, lab.cl, "vct1", 142, "198.18.252.1", "198.18.252.250")
    assert "vlan 142" in frame, frame

    # The same user, second cluster of the same AC, at the same time: lands on VLAN 143.
    text2, serial2 = lab.profile("alice", "c43", fqans=[attrcerts.fqan("c42"), attrcerts.fqan("c43")], dev="vct2")
    proc2, _, _ = _connect_ok(lab, text2, "alice-c43")
    _server_says(lab, f"ACCEPT cn=alice serial={serial2}: cluster c43 -> vlan-pvid 143")
    frame = tagged_frame_seen(lab.gw, lab.tap, lab.cl, "vct2", 143, "198.18.253.1", "198.18.253.250")
    assert "vlan 143" in frame and "vlan 142" not in frame, frame
    stop(proc, kill=True)
    stop(proc2, kill=True)


@needs_lab
def test_unauthorized_cluster_gets_auth_failed(lab):
    # An AC for c42 only, asking for c43 (which exists on the gateway).
    text, serial = lab.profile("bob", "c43", fqans=[attrcerts.fqan("c42")], dev="vct3")
    proc, log, _ = _start_client(lab, text, "bob-c43")
    wait_for(lambda: "AUTH_FAILED" in read(log), 10, what="AUTH_FAILED on the client")
    _server_says(lab, f"REFUSE client-connect: cn=bob serial={serial}: cluster c43 is not in the AC (grants: c42)")
    stop(proc, kill=True)


@needs_lab
def test_cluster_without_vlan_refused(lab):
    text, serial = lab.profile("bob", "c99", dev="vct4")  # AC grants c99, but the gateway map has no c99
    proc, log, _ = _start_client(lab, text, "bob-c99")
    wait_for(lambda: "AUTH_FAILED" in read(log), 10, what="AUTH_FAILED on the client")
    _server_says(lab, f"cn=bob serial={serial}: cluster c99 has no VLAN on this gateway")
    stop(proc, kill=True)


@needs_lab
@pytest.mark.parametrize(
    ("ac", "reason"),
    [
        ("none", "certificate carries no attribute certificate"),
        ("tampered", "AC invalid: bad signature"),
        ("expired", "AC invalid: AC expired"),
    ],
)
def test_bad_ac_refused_at_tls(lab, ac, reason):
    text, serial = lab.profile("carol", "c42", ac=ac, dev="vct5")
    proc, log, _ = _start_client(lab, text, f"carol-{ac}")
    _server_says(lab, f"REFUSE tls-verify: subject='O=VirtCloud, CN=carol' serial={serial}: {reason}")
    _server_says(lab, "VERIFY SCRIPT ERROR")
    time.sleep(0.3)
    assert "Initialization Sequence Completed" not in read(log)
    stop(proc, kill=True)


@needs_lab
def test_a_profile_refuses_a_gateway_whose_certificate_it_does_not_pin(lab):
    """The gateway's certificate is of the right CA and name, but not the one the profile pins (the gateway was
    re-enrolled since, or someone holds its old key): the client refuses it at TLS and never connects."""
    text, _ = lab.profile("fred", "c42", dev="vct7")
    pinned = ":".join(lab.server_fingerprint[i : i + 2] for i in range(0, 64, 2))
    assert f"\nsetenv opt peer-fingerprint {pinned}\n" in text
    proc, log, _ = _start_client(lab, text.replace(pinned, ":".join(["5a"] * 32)), "fred-unpinned")
    wait_for(lambda: "certificate hash verification failed" in read(log), 10, what="the client to refuse the gateway")
    assert f"got certificate fingerprint: {pinned}" in read(log)
    assert "Initialization Sequence Completed" not in read(log)
    stop(proc, kill=True)


@needs_lab
def test_revoked_certificate_refused(lab):
    text, serial = lab.profile("erin", "c42", dev="vct6")
    lab.revoke(serial)
    proc, log, _ = _start_client(lab, text, "erin-revoked")
    _server_says(lab, f"error=certificate revoked: O=VirtCloud, CN=erin, serial={serial}")
    time.sleep(0.3)
    assert "Initialization Sequence Completed" not in read(log)
    stop(proc, kill=True)


@needs_lab
def test_a_session_that_ends_is_forgotten_and_the_other_of_the_same_profile_kept(lab):
    """client-disconnect drops the session's peer from its certificate's record (the record with its last
    peer): the records hold the sessions that are up, and do not pile up on a long-running gateway."""
    text, serial = lab.profile("erin", "c42", dev="vctb")
    first, _, _ = _connect_ok(lab, text, "erin-1")
    second, _, _ = _connect_ok(lab, text.replace("dev vctb", "dev vctc"), "erin-2")  # the same profile, twice
    wait_for(lambda: len(vpn.session_peers(lab.state, serial)) == 2, 5, what="both sessions recorded")
    stop(first)  # (SIGTERM: the client says goodbye, explicit-exit-notify)
    _server_says(lab, f"DISCONNECT cn=erin serial={serial}")
    wait_for(lambda: len(vpn.session_peers(lab.state, serial)) == 1, 10, what="the first session forgotten")
    stop(second)
    wait_for(lambda: not (lab.state.sessions / f"{serial}.json").exists(), 10, what="the record gone")


@needs_lab
def test_management_kill_cuts_live_session_of_revoked_user(lab, monkeypatch):
    text, serial = lab.profile("dave", "c42", dev="vct7")
    proc, log, _ = _connect_ok(lab, text, "dave")
    sock = lab.state.management
    listed = management.list_sessions(sock)
    assert [s.common_name for s in listed].count("dave") == 1

    lab.revoke(serial)  # the portal publishes the CRL, the gateway pulls it, then cuts the sessions
    assert management.kill_sessions(sock, "dave") == 1
    wait_for(lambda: proc.poll() is not None, 5, what="the client to stop after HALT")
    wait_for(
        lambda: "dave" not in [s.common_name for s in management.list_sessions(sock)], 10, what="server forgets dave"
    )
    assert management.kill_sessions(sock, "dave") == 0
    # Listed, then gone before client-kill (the client left in between): OpenVPN's answer is not an error.
    monkeypatch.setattr(management, "list_sessions", lambda *a, **kw: listed)
    assert management.kill_sessions(sock, "dave") == 0
    ip, _, port = next(s.real_address for s in listed if s.common_name == "dave").rpartition(":")
    assert management.kill_peers(sock, [(ip, port)]) == 0
    monkeypatch.undo()

    # Trying again with the same profile meets the new CRL.
    again, _, _ = _start_client(lab, text, "dave-again")
    _server_says(lab, f"error=certificate revoked: O=VirtCloud, CN=dave, serial={serial}")
    stop(again, kill=True)


@needs_lab
def test_pull_installs_crl_and_cuts_only_the_revoked_session(lab):
    """The gateway's pull: new CRL in place, then exactly the revoked certificate's session is cut."""
    lost, lost_serial = lab.profile("hana", "c42", dev="vcta")
    kept, _ = lab.profile("hana", "c43", dev="vctb")
    lost_proc, _, _ = _connect_ok(lab, lost, "hana-lost")
    kept_proc, _, _ = _connect_ok(lab, kept, "hana-kept")
    assert len(vpn.session_peers(lab.state, lost_serial)) == 1

    lab.revoked.append((lost_serial, NOW, "key_compromise"))
    lab.crl_number += 1
    doc = {
        "format": 1,
        "generated_at": NOW.isoformat(),
        "max_age": 3600,
        "vpn": {
            "ca": lab.ca.cert_pem().decode(),
            "aa": pki.cert_to_pem(lab.aa_cert).decode(),
            "crl": pki.crl_to_pem(pki.build_crl(lab.ca, lab.revoked, crl_number=lab.crl_number)).decode(),
            "vlans": VLANS,
            "revoked_sessions": [{"serial": lost_serial, "common_name": "hana", "revoked_at": NOW.isoformat()}],
        },
    }
    report = pull.install_state(lab.state.root.parent, doc)
    assert str(lab.state.crl) in report.written
    assert report.cut == [lost_serial] and report.cut_errors == []
    wait_for(lambda: lost_proc.poll() is not None, 5, what="the revoked session's client to stop")
    time.sleep(0.5)
    assert kept_proc.poll() is None  # the same user's other session stays up
    assert pull.install_state(lab.state.root.parent, doc).cut == []  # cut once, not at every pull
    stop(kept_proc, kill=True)


@needs_lab
def test_a_gateway_whose_state_went_stale_tells_its_clients_to_reconnect_not_to_exit(lab):
    """Failing closed (no pull for the state's max_age) cuts every session with RESTART: nothing says its user lost
    the access, so the client stays up and reconnects — to the next gateway of a failover profile, or here,
    once this one admits it again (its state fresh: at once). A revoked certificate's client is told to exit
    (``test_pull_installs_crl_and_cuts_only_the_revoked_session``)."""
    text, serial = lab.profile("ivan", "c42", dev="vctd")
    proc, log, _ = _connect_ok(lab, text, "ivan")
    wait_for(lambda: len(vpn.session_peers(lab.state, serial)) == 1, 5, what="the session recorded")
    report = pull.fail_closed(lab.state.root.parent, now=time.time() + 7200)  # (its state expired by then)
    assert report is not None and serial in report.cut and report.cut_errors == []
    wait_for(lambda: read(log).count("Initialization Sequence Completed") == 2, 20, what="the client to reconnect")
    assert proc.poll() is None and "server-pushed-connection-reset" in read(log), read(log)[-2000:]
    stop(proc, kill=True)


@needs_lab
def test_hook_timing(lab):
    """Run both hooks as OpenVPN does (fresh interpreter each time) and report per-call milliseconds."""
    text, serial = lab.profile("frank", "c42", dev="vct8")
    cert_pem = text.split("<cert>\n", 1)[1].split("\n</cert>", 1)[0] + "\n"
    peer = lab.tmp / "peer.pem"
    peer.write_text(cert_pem)
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    fp = x509.load_pem_x509_certificate(cert_pem.encode()).fingerprint(hashes.SHA256()).hex(":").upper()
    state_dir = str(lab.state.root.parent)
    env = {"peer_cert": str(peer), "tls_digest_sha256_0": fp, "common_name": "frank", "UV_VCLUSTER": "c42"}
    verify_cmd = openvpn.hook_command("tls-verify", state_dir).split() + ["0", "CN=frank"]
    connect_cmd = openvpn.hook_command("client-connect", state_dir).split() + [str(lab.tmp / "cc.out")]

    def timed(cmd):
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return (time.perf_counter() - t) * 1000

    verify_ms = sorted(timed(verify_cmd) for _ in range(5))[2]
    connect_ms = sorted(timed(connect_cmd) for _ in range(5))[2]
    assert (lab.tmp / "cc.out").read_text() == "vlan-pvid 142\n"
    # In-process cost (what the hook does beyond starting Python).
    t = time.perf_counter()
    for _ in range(20):
        vpn.tls_verify(lab.state, 0, "CN=frank", env)
    inproc_ms = (time.perf_counter() - t) * 50
    print(
        f"\nhook tls-verify {verify_ms:.0f} ms, client-connect {connect_ms:.0f} ms (median of 5, "
        f"fresh interpreter); tls-verify in-process {inproc_ms:.2f} ms ({sys.executable})"
    )
    assert verify_ms < 1000 and connect_ms < 1000
    cached = json.loads(next(lab.state.ac_cache.glob(fp.replace(":", "").lower() + ".json")).read_text())
    assert cached["clusters"] == {"c42": "member"}


@needs_lab
def test_publish_profile_connects_with_its_named_tap(lab):
    text, serial = lab.profile("gina", "c43", dev="vct9")
    text = text.replace("dev vct9\n", "")  # let the publish renderer pick the name below
    pub = openvpn.render_client_profile(
        cluster="c43",
        remote=(GW_ADDR, 1194),
        server_name=SERVER_NAME,
        server_fingerprint=lab.server_fingerprint,
        ca_pem=lab.ca.cert_pem(),
        cert_pem=text.split("<cert>\n", 1)[1].split("\n</cert>", 1)[0],
        key_pem=text.split("<key>\n", 1)[1].split("\n</key>", 1)[0],
        tls_crypt_key=lab.tls_crypt,
        publish=True,
    )
    assert "persist-tun" in pub and "dev vc-c43" in pub
    proc, log, _ = _connect_ok(lab, pub, "gina-publish")
    assert "TUN/TAP device vc-c43 opened" in read(log)
    _server_says(lab, f"ACCEPT cn=gina serial={serial}: cluster c43 -> vlan-pvid 143")
    stop(proc, kill=True)


@needs_lab
def test_an_expired_state_refuses_everyone_and_ends_live_sessions_at_renegotiation(tmp_path):
    """A gateway that has not pulled for its state's max_age fails closed (a cluster may have ended since and
    its VLAN gone to another): a new client is refused, and a live session ends at its next renegotiation
    (``reneg-sec``: tls-verify runs again) — without any pull, as when the pull timer itself is dead."""
    with _running_gateway(tmp_path, reneg_sec=3) as g:
        text, serial = g.profile("ida", "c42", dev="vct9")
        proc, _, _ = _connect_ok(g, text, "ida")

        def verified() -> int:
            return read(g.log).count(f"VERIFIED subject='O=VirtCloud, CN=ida' serial={serial}")

        def ida_connected() -> bool:
            return any(s.common_name == "ida" for s in management.list_sessions(g.state.management))

        wait_for(lambda: verified() >= 2, 10, what="a renegotiation that passes while the state is fresh")
        assert ida_connected() and proc.poll() is None

        write_atomic(fresh_until_path(g.state.root.parent), fresh_until_text(time.time() - 1), 0o644)
        _server_says(g, "REFUSE tls-verify: subject='O=VirtCloud, CN=ida': the pulled state expired", timeout=10)
        wait_for(lambda: not ida_connected(), 10, what="the live session to end at its renegotiation")

        late, late_serial = g.profile("jan", "c42", dev="vcta")
        late_proc, late_log, _ = _start_client(g, late, "jan")
        _server_says(g, "REFUSE tls-verify: subject='O=VirtCloud, CN=jan': the pulled state expired", timeout=10)
        time.sleep(1)
        assert "Initialization Sequence Completed" not in read(late_log)
        assert f"ACCEPT cn=jan serial={late_serial}" not in read(g.log)
        stop(proc, kill=True)
        stop(late_proc, kill=True)


# ---- the hooks' decisions without OpenVPN (fast, no root) -------------------------------------------------------

FP = "ab" * 32
#: what a client profile needs besides its cluster (placeholders where only the rendering is checked)
PROFILE = dict(
    remote=("gw", 1194),
    server_name="gw1",
    server_fingerprint=FP,
    ca_pem="C",
    cert_pem="X",
    key_pem="K",
    tls_crypt_key="T",
)


def _state(tmp_path, clusters=None, vlans=VLANS, not_after=None):
    st = VpnState.at(tmp_path)
    st.ensure_dirs()
    write_atomic(fresh_until_path(tmp_path), fresh_until_text(time.time() + 3600), 0o644)  # pulled now
    if vlans is not None:
        write_atomic(st.vlans, vlan_map_json(vlans, generated_at="now"))
    if clusters is not None:
        entry = {
            "serial": 5,
            "subject": "CN=alice",
            "ac_serial": 5,
            "fqans": [],
            "clusters": clusters,
            "not_after": not_after or time.time() + 3600,
        }
        write_atomic(st.ac_cache / f"{FP}.json", json.dumps(entry))
    return st


def _env(**kw):
    return {
        "tls_digest_sha256_0": ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper(),
        "common_name": "alice",
        **kw,
    }


def test_client_connect_writes_vlan_pvid(tmp_path):
    st = _state(tmp_path, {"c42": "member", "c43": "member"})
    out = tmp_path / "cc"
    assert vpn.client_connect(st, str(out), _env(UV_VCLUSTER="c43")) == 143
    assert out.read_text() == "vlan-pvid 143\n"


@pytest.mark.parametrize(
    ("clusters", "env", "kw", "reason"),
    [
        (None, {"UV_VCLUSTER": "c42"}, {}, "no verified AC for this certificate"),
        ({"c42": "member"}, {"UV_VCLUSTER": "c42"}, {"not_after": 1.0}, "AC expired"),
        ({"c42": "member"}, {"UV_VCLUSTER": "c42;rm -rf"}, {}, "malformed UV_VCLUSTER"),
        ({"c42": "member"}, {"UV_VCLUSTER": "c43"}, {}, "cluster c43 is not in the AC (grants: c42)"),
        ({"c42": "member", "c43": "member"}, {}, {}, "no UV_VCLUSTER and the AC grants 2 reachable clusters"),
        ({"c42": "member"}, {"UV_VCLUSTER": "c42"}, {"vlans": None}, "no VLAN map"),
        ({"c42": "member"}, {"UV_VCLUSTER": "c42"}, {"vlans": {"c43": 143}}, "cluster c42 has no VLAN"),
    ],
)
def test_client_connect_refusals(tmp_path, clusters, env, kw, reason):
    st = _state(tmp_path, clusters, **kw)
    with pytest.raises(vpn.Refused, match=re.escape(reason)):
        vpn.client_connect(st, str(tmp_path / "cc"), _env(**env))
    assert not (tmp_path / "cc").exists()


def test_client_connect_single_cluster_needs_no_choice(tmp_path):
    st = _state(tmp_path, {"c42": "member", "c99": "member"})  # c99 has no VLAN here: c42 is the only choice
    assert vpn.client_connect(st, str(tmp_path / "cc"), _env()) == 142


def test_main_fails_closed_with_one_log_line(tmp_path, capsys):
    _state(tmp_path, {"c42": "member"})
    rc = vpn.main(
        ["client-connect", "--state", str(tmp_path.parent / tmp_path.name), str(tmp_path / "cc")],
        env=_env(UV_VCLUSTER="c43"),
    )
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "virtcloud-vpn: REFUSE client-connect: cn=alice serial=5: cluster c43 is not in the AC (grants: c42)"
    ]
    # A broken state (garbage cache entry) refuses too, instead of crashing open.
    (VpnState.at(tmp_path).ac_cache / f"{FP}.json").write_text("{")
    assert vpn.main(["client-connect", "--state", str(tmp_path), str(tmp_path / "cc")], env=_env()) == 1
    assert "internal error" in capsys.readouterr().err


def test_tls_verify_ignores_ca_depth_and_needs_peer_cert(tmp_path):
    st = _state(tmp_path)
    vpn.tls_verify(st, 1, "CN=VirtCloud VPN CA", {})  # nothing to check above the leaf
    with pytest.raises(vpn.Refused, match="no peer_cert"):
        vpn.tls_verify(st, 0, "CN=alice", {})


@pytest.mark.parametrize("fresh_until", [None, "soon", -1], ids=["never pulled", "unreadable", "expired"])
def test_both_hooks_refuse_everyone_when_the_state_is_not_fresh(tmp_path, fresh_until):
    st = _state(tmp_path, clusters={"c42": "member"})
    path = fresh_until_path(tmp_path)
    if fresh_until is None:
        path.unlink()
    else:
        path.write_text(fresh_until if isinstance(fresh_until, str) else fresh_until_text(time.time() + fresh_until))
    why = {None: "has not pulled its state", "soon": "unreadable", -1: "the pulled state expired"}[fresh_until]
    with pytest.raises(vpn.Refused, match=why):
        vpn.client_connect(st, str(tmp_path / "ccd"), _env(UV_VCLUSTER="c42"))
    with pytest.raises(vpn.Refused, match=why):
        vpn.tls_verify(st, 0, "CN=alice", {"peer_cert": str(tmp_path / "nothing-read")})
    assert not (tmp_path / "ccd").exists()
    path.write_text(fresh_until_text(time.time() + 60))
    assert vpn.client_connect(st, str(tmp_path / "ccd"), _env(UV_VCLUSTER="c42")) == 142


def test_server_config_directives(tmp_path):
    conf = openvpn.render_server_config(state_dir=tmp_path, dev="tapgw0", local="198.18.250.1")
    for directive in (
        "mode server",
        "dev tapgw0",
        "dev-type tap",
        "vlan-tagging",
        "vlan-accept tagged",
        "disable-dco",
        f"tls-crypt {tmp_path}/vpn/tls-crypt.key",
        f"crl-verify {tmp_path}/vpn/crl.pem",
        f"tls-export-cert {tmp_path}/vpn/run/peer-certs",
        "tls-version-min 1.2",
        "remote-cert-tls client",
        f"management {tmp_path}/vpn/run/management.sock unix",
        "script-security 2",
        "dh none",
    ):
        assert f"\n{directive}\n" in conf, directive
    assert re.search(r'\ntls-verify ".* -I .*/access/gateway/vpn\.py tls-verify --state .*"\n', conf)
    assert re.search(r'\nclient-connect ".* -I .*/access/gateway/vpn\.py client-connect --state .*"\n', conf)
    assert "\ndata-ciphers AES-256-GCM:CHACHA20-POLY1305:AES-128-GCM\n" in conf


def test_profile_refuses_injection():
    base = dict(PROFILE)
    with pytest.raises(openvpn.ProfileError):
        openvpn.render_client_profile(cluster="c42\nscript-security 3", **base)
    with pytest.raises(openvpn.ProfileError):
        openvpn.render_client_profile(cluster="c42", **{**base, "cert_pem": "x</cert>\n<connection>"})
    text = openvpn.render_client_profile(cluster="c42", **base)
    assert "\nsetenv UV_VCLUSTER c42\n" in text and "\npush-peer-info\n" in text
    assert "\nremote-cert-tls server\n" in text and '\nverify-x509-name "gw1" name\n' in text
    assert "<ca>\nC\n</ca>" in text and "<key>\nK\n</key>" in text and "<tls-crypt>\nT\n</tls-crypt>" in text
    assert "persist-tun" not in text
    pinned = ":".join(FP[i : i + 2] for i in range(0, 64, 2))
    assert f"\nsetenv opt peer-fingerprint {pinned}\n" in text  # an OpenVPN 2.5 client ignores it, 2.6 checks it


@pytest.mark.parametrize(
    "bad",
    [
        {"cluster": "c42\n"},  # a trailing newline passes a "...$" pattern
        {"remote": ("gw\n", 1194)},
        {"remote": ("gw", 0)},
        {"remote": ("gw", 65536)},
        {"server_name": "gw1\n"},
        {"user": "alice\nup /bin/sh"},
        {"expires": "2026-01-01\nscript-security 3"},
        {"proto": "tcp-server"},  # the server's side
        {"proto": "sctp"},
        {"server_fingerprint": ""},  # a profile always pins the gateway's certificate
        {"server_fingerprint": FP.upper()},
        {"server_fingerprint": FP + "\ncomp-lzo"},
        {"server_fingerprint": FP[:-2]},
    ],
)
def test_profile_refuses_control_characters_and_values_out_of_range(bad):
    base = dict(PROFILE, cluster="c42")
    with pytest.raises(openvpn.ProfileError):
        openvpn.render_client_profile(**{**base, **bad})


def test_one_transport_gives_each_side_its_proto(tmp_path):
    base = dict(PROFILE)
    for proto, client, server in (
        ("udp", "udp", "udp"),
        ("tcp", "tcp-client", "tcp-server"),
        ("tcp6", "tcp6-client", "tcp6-server"),
    ):
        assert f"\nproto {client}\n" in openvpn.render_client_profile(cluster="c42", proto=proto, **base)
        assert f"\nproto {server}\n" in openvpn.render_server_config(state_dir=tmp_path, dev="tap-vc", proto=proto)
    with pytest.raises(openvpn.ProfileError):
        openvpn.render_server_config(state_dir=tmp_path, dev="tap-vc", proto="tcp-client")
    with pytest.raises(openvpn.ProfileError):
        openvpn.render_server_config(state_dir=tmp_path, dev="tap-vc", port=0)


def test_pull_keeps_last_good_state_on_a_bad_document(tmp_path):
    ca = pki.create_ca("CA")
    crl = pki.crl_to_pem(pki.build_crl(ca, [], crl_number=1)).decode()
    good = {
        "format": 1,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(),
        "max_age": 3600,
        "vpn": {"ca": ca.cert_pem().decode(), "aa": ca.cert_pem().decode(), "crl": crl, "vlans": {"c42": 142}},
    }
    pull.install_state(tmp_path, good)
    st = VpnState.at(tmp_path)
    before = {p: p.read_bytes() for p in (st.ca, st.crl, st.vlans)}
    krl = base64.b64encode(ssh.build_krl(ca_public_key=ssh.public_key_line(ssh.generate_ca_key()), version=1)).decode()
    for bad, why in (
        ({**good, "format": 2}, "unknown format"),
        ({**good, "vpn": {**good["vpn"], "vlans": {"c42": 5000}}}, "invalid VLAN id 5000"),
        ({**good, "vpn": {**good["vpn"], "crl": "garbage"}}, "vpn.crl is not a PEM X509 CRL"),
        ({**good, "vpn": "garbage"}, "vpn is not a map"),
        ({**good, "vpn": {**good["vpn"], "revoked_sessions": [{"serial": "x"}]}}, "vpn.revoked_sessions"),
        (
            {**good, "ssh": {"account": "virtcloud", "krl": krl, "clusters": {"c42": {"targets": [["h", "x"]]}}}},
            r"\[host, port\] targets",
        ),
        ({**good, "ssh": {"account": "root; rm", "krl": krl, "clusters": {}}}, "invalid bastion account name"),
        ({k: v for k, v in good.items() if k != "max_age"}, "max_age is not a number of seconds"),
        ({**good, "max_age": True}, "max_age is not a number of seconds"),
        ({**good, "max_age": 0}, "max_age is not a number of seconds"),
        ({**good, "generated_at": "yesterday"}, "generated_at is not an ISO 8601 time"),
        ({**good, "generated_at": "2026-12-01T10:00:00"}, "generated_at has no time zone"),
    ):
        # A clear refusal saying what is wrong (the pull keeps its state), not a traceback.
        with pytest.raises(vpn.StateError, match=why):
            pull.install_state(tmp_path, bad)
    assert {p: p.read_bytes() for p in before} == before
    assert pull.install_state(tmp_path, good).written == []  # unchanged files are not rewritten
