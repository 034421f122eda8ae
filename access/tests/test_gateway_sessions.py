"""The gateway's session cutting and state installation, without OpenVPN (a fake management socket that
speaks ``status 3`` and ``client-kill`` as OpenVPN 2.6 does; the real daemon is in test_openvpn_gateway)."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from access import pki
from access.gateway import pull, vpn
from access.gateway.state import StateError, VpnState, check_fresh, write_all_atomic, write_atomic

FP = "ab" * 32
_HEADER = (
    "HEADER\tCLIENT_LIST\tCommon Name\tReal Address\tVirtual Address\tVirtual IPv6 Address\tBytes Received"
    "\tBytes Sent\tConnected Since\tConnected Since (time_t)\tUsername\tClient ID\tPeer ID\tData Channel Cipher"
)


class FakeManagement:
    """OpenVPN's management interface as far as the gateway uses it; ``sessions``: client id → (cn, address
    as ``status 3`` prints it: ``ip:port`` for IPv4, the bare address for native IPv6)."""

    def __init__(self, path, sessions: dict[int, tuple[str, str]]):
        self.sessions = dict(sessions)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b">INFO:OpenVPN Management Interface Version 5 -- type 'help' for more info\r\n")
                for raw in lines:
                    command = raw.decode().strip()
                    if command == "status 3":
                        rows = ["TITLE\tOpenVPN 2.6", _HEADER]
                        rows += [
                            f"CLIENT_LIST\t{cn}\t{address}\t\t\t1\t1\tx\t1700000000\tUNDEF\t{cid}\t{cid}\tAES-256-GCM"
                            for cid, (cn, address) in self.sessions.items()
                        ]
                        conn.sendall(("\r\n".join([*rows, "END"]) + "\r\n").encode())
                    elif command.startswith("client-kill "):
                        cid = int(command.split()[1])
                        gone = self.sessions.pop(cid, None) is None
                        conn.sendall(b"ERROR: client-kill command failed\r\n" if gone else b"SUCCESS: done\r\n")
                    elif command == "quit":
                        break

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def gateway_state(tmp_path):
    """A gateway state directory with a first state (cluster c42 on VLAN 142), the CA that signs its CRL,
    and the document that installed it."""
    ca = pki.create_ca("CA")
    crl = pki.crl_to_pem(pki.build_crl(ca, [], crl_number=1)).decode()
    doc = {
        "format": 1,
        "generated_at": dt.datetime.now(dt.UTC).isoformat(),
        "max_age": 3600,
        "vpn": {"ca": ca.cert_pem().decode(), "aa": ca.cert_pem().decode(), "crl": crl, "vlans": {"c42": 142}},
    }
    pull.install_state(tmp_path, doc, cut_sessions=False)
    state = VpnState.at(tmp_path)
    # what tls-verify cached for certificate serial 77 (its AC grants c42)
    entry = {"serial": 77, "subject": "CN=alice", "ac_serial": 77, "fqans": [], "clusters": {"c42": "member"}}
    write_atomic(state.ac_cache / f"{FP}.json", json.dumps({**entry, "not_after": time.time() + 3600}))
    return state, ca, doc


def revoking(ca, doc: dict, serial: int) -> dict:
    crl = pki.crl_to_pem(pki.build_crl(ca, [(serial, pki._now(), "key_compromise")], crl_number=2)).decode()
    revoked = [{"serial": serial, "common_name": "alice", "revoked_at": "now"}]
    return {**doc, "vpn": {**doc["vpn"], "crl": crl, "revoked_sessions": revoked}}


def connect(state, tmp_path, name: str, **peer) -> None:
    env = {"tls_digest_sha256_0": FP, "common_name": "alice", "UV_VCLUSTER": "c42", **peer}
    vpn.client_connect(state, str(tmp_path / name), env)


def test_every_session_of_a_revoked_certificate_is_cut_ipv4_and_ipv6(gateway_state, tmp_path):
    """One profile up in three places (``duplicate-cn``), one of them over IPv6: all three are cut, the
    other users' sessions from the same IPv4 address — even from the same port — stay, and the next pull cuts
    nothing more."""
    state, ca, doc = gateway_state
    connect(state, tmp_path, "a", trusted_ip="203.0.113.5", trusted_port="40001")
    connect(state, tmp_path, "b", trusted_ip="198.51.100.9", trusted_port="50002")
    connect(state, tmp_path, "c", trusted_ip6="2001:db8::5", trusted_port="40003")
    assert vpn.session_peers(state, 77) == [
        ("203.0.113.5", "40001"),
        ("198.51.100.9", "50002"),
        ("2001:db8::5", "40003"),
    ]
    listed = {1: ("alice", "203.0.113.5:40001"), 2: ("alice", "198.51.100.9:50002"), 3: ("alice", "2001:db8::5")}
    # bob: another port of the same address; carol: alice's first address and port, reused by a NAT since
    others = {4: ("bob", "203.0.113.5:40009"), 5: ("carol", "203.0.113.5:40001")}
    fake = FakeManagement(state.management, {**listed, **others})
    try:
        report = pull.install_state(state.root.parent, revoking(ca, doc, 77))
        assert report.cut == [77] and report.cut_errors == []
        assert fake.sessions == others
        assert pull.install_state(state.root.parent, revoking(ca, doc, 77)).cut == []
    finally:
        fake.close()


def test_a_session_on_a_cluster_the_map_no_longer_holds_is_cut_even_unrevoked(gateway_state, tmp_path):
    """OpenVPN checks the VLAN map at connect only. The cluster ends and leaves the map (after the hold-down its
    VLAN goes to another cluster): a session on it is cut at the pull that installs that map, though its
    certificate's revocation never reached this gateway; a session on a cluster still mapped stays. One whose
    cluster was mapped to another VLAN meanwhile is cut as well; a later pull (304) retries what failed."""
    state, ca, doc = gateway_state
    connect(state, tmp_path, "a", trusted_ip="203.0.113.5", trusted_port="40001")
    assert vpn.sessions(state)[0]["vlan"] == 142
    other = {"tls_digest_sha256_0": "cd" * 32, "common_name": "bob", "UV_VCLUSTER": "c43"}
    entry = {"serial": 78, "subject": "CN=bob", "ac_serial": 78, "fqans": [], "clusters": {"c43": "member"}}
    write_atomic(state.ac_cache / f"{'cd' * 32}.json", json.dumps({**entry, "not_after": time.time() + 3600}))
    both = {**doc, "vpn": {**doc["vpn"], "vlans": {"c42": 142, "c43": 143}}}
    pull.install_state(state.root.parent, both, cut_sessions=False)
    vpn.client_connect(state, str(tmp_path / "b"), {**other, "trusted_ip": "198.51.100.9", "trusted_port": "5"})
    fake = FakeManagement(state.management, {1: ("alice", "203.0.113.5:40001"), 2: ("bob", "198.51.100.9:5")})
    try:
        gone = {**doc, "vpn": {**doc["vpn"], "vlans": {"c43": 143}}}  # c42 ended; nobody revoked
        report = pull.install_state(state.root.parent, gone)
        assert report.cut == [77] and report.cut_errors == []
        assert fake.sessions == {2: ("bob", "198.51.100.9:5")}
        assert vpn.session_peers(state, 77) == [] and vpn.session_peers(state, 78) == [("198.51.100.9", "5")]
        moved = {**doc, "vpn": {**doc["vpn"], "vlans": {"c43": 243}}}  # (another VLAN for c43: cut too)
        assert pull.install_state(state.root.parent, moved).cut == [78]
        assert fake.sessions == {} and pull.cut_revoked(state.root.parent).cut == []
    finally:
        fake.close()


def test_a_client_that_passed_the_old_crl_is_refused_after_the_pull(gateway_state, tmp_path):
    """Its handshake met the old CRL just before the pull; its client-connect comes after: refused (it was
    admitted, and the pull, which had found no session to cut, never cut it)."""
    state, ca, doc = gateway_state
    fake = FakeManagement(state.management, {})
    try:
        pull.install_state(state.root.parent, revoking(ca, doc, 77))
    finally:
        fake.close()
    with pytest.raises(vpn.Refused, match="serial=77: certificate revoked"):
        connect(state, tmp_path, "late", trusted_ip="203.0.113.5", trusted_port="40001")
    assert vpn.session_peers(state, 77) == []


@pytest.mark.parametrize(
    "change",
    [
        # certificates and a CRL with the right armor and a corrupt body: written, they refused everyone
        {"vpn": {"aa": "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"}},
        {"vpn": {"ca": "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"}},
        {"vpn": {"crl": "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"}},
        {"ssh": {"krl": None}},
        {"ssh": {"krl": 5}},
        {"vpn": {"revoked_sessions": [{"serial": float("inf")}]}},
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"principals": [7], "targets": [["h", 22]]}}}},
        {
            "ssh": {
                "krl": "U1NIS1JMCgA=",
                "clusters": {"c42": {"principals": ["c42.a"], "targets": [["h", float("inf")]]}},
            }
        },
        # what the --on-change hook (root) reads: a VLAN id and node fields it may put on a command line
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"vlan": 5000}}}},
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"vlan": True}}}},
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c 42": {}}}},
        {
            "ssh": {
                "krl": "U1NIS1JMCgA=",
                "clusters": {"c42": {"nodes": [{"name": "n1", "alias": "n1.c42", "address": "$(reboot)"}]}},
            }
        },
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"nodes": [{"name": "n1"}]}}}},
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"bastion_address": "10.0.0.1"}}}},  # no prefix
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"bastion_address": 5}}}},
        # forwarding targets the bastion would reach through the gateway's other routes, not the cluster's leg
        {"ssh": {"krl": "U1NIS1JMCgA=", "clusters": {"c42": {"principals": ["c42.a"], "targets": [[["n1.c42"], 22]]}}}},
        {
            "ssh": {
                "krl": "U1NIS1JMCgA=",
                "clusters": {"c42": {"principals": ["c42.a"], "targets": [["127.0.0.1", 22]]}},
            }
        },
        {
            "ssh": {
                "krl": "U1NIS1JMCgA=",
                "clusters": {
                    "c42": {"principals": ["c42.a"], "targets": [["10.0.1.5", 22]], "bastion_address": "10.0.0.254/24"}
                },
            }
        },
        # in the leg's network, but the leg itself (the gateway's own services, over loopback) or its broadcast
        *(
            {
                "ssh": {
                    "krl": "U1NIS1JMCgA=",
                    "clusters": {
                        "c42": {"principals": ["c42.a"], "targets": [[own, 22]], "bastion_address": "10.0.0.254/24"}
                    },
                }
            }
            for own in ("10.0.0.254", "10.0.0.255", "10.0.0.0")
        ),
        {
            "ssh": {
                "krl": "U1NIS1JMCgA=",
                "clusters": {
                    "c42": {
                        "principals": ["c42.a"],
                        "targets": [["gateway.example.org", 22]],
                        "nodes": [{"name": "n1", "alias": "n1.c42", "address": "n1.c42"}],
                    }
                },
            }
        },
    ],
)
def test_a_malformed_state_is_refused_and_the_old_one_kept(gateway_state, change):
    state, _ca, doc = gateway_state
    before = {p: p.read_bytes() for p in state.root.rglob("*") if p.is_file()}
    bad = {**doc, **{k: {**doc.get(k, {}), **v} for k, v in change.items()}}
    with pytest.raises(StateError):
        pull.install_state(state.root.parent, bad)
    assert {p: p.read_bytes() for p in state.root.rglob("*") if p.is_file()} == before


def test_a_write_that_fails_midway_leaves_the_old_set_whole(tmp_path, monkeypatch):
    (tmp_path / "crl.pem").write_text("old crl")
    (tmp_path / "vlans.json").write_text("old map")
    real = os.fsync
    calls = []

    def disk_full_on_the_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", disk_full_on_the_second)
    with pytest.raises(OSError, match="No space left"):
        write_all_atomic({tmp_path / "crl.pem": ("new crl", 0o644), tmp_path / "vlans.json": ("new map", 0o644)})
    assert (tmp_path / "crl.pem").read_text() == "old crl" and (tmp_path / "vlans.json").read_text() == "old map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem", "vlans.json"]  # no temporary file left


def test_a_link_planted_where_the_temporary_file_goes_is_not_followed(tmp_path):
    """The directory may be writable by OpenVPN's user (``user=``): a guessable temporary name would let it
    point root's write at any file."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for pid in range(os.getpid() - 2, os.getpid() + 3):  # the old names: .<file>.<pid>.tmp
        (tmp_path / f".cut.json.{pid}.tmp").symlink_to(victim)
    write_atomic(tmp_path / "cut.json", "[77]")
    assert victim.read_text() == "precious" and (tmp_path / "cut.json").read_text() == "[77]"


def test_the_state_is_trusted_for_max_age_from_the_pull_or_else_from_when_it_was_made(tmp_path):
    ca = pki.create_ca("CA")
    crl = pki.crl_to_pem(pki.build_crl(ca, [], crl_number=1)).decode()
    made = dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.UTC)
    doc = {
        "format": 1,
        "etag": "e1",
        "generated_at": made.isoformat(),
        "max_age": 600,
        "vpn": {"ca": ca.cert_pem().decode(), "aa": ca.cert_pem().decode(), "crl": crl, "vlans": {}},
    }
    pull.install_state(tmp_path, doc)  # (as ``pull.py < state.json`` without --fetched-at)
    assert (tmp_path / "fresh-until").read_text() == f"{int(made.timestamp()) + 600}\n"
    with pytest.raises(StateError, match="expired"):
        check_fresh(tmp_path)
    pull.install_state(tmp_path, doc, fetched_at=1_900_000_000.7)
    assert (tmp_path / "fresh-until").read_text() == "1900000600\n"
    assert check_fresh(tmp_path, now=1_900_000_000) == 600
    assert pull.installed(tmp_path) == {"etag": "e1", "generated_at": made.isoformat(), "max_age": 600}
    pull.refresh(tmp_path, fetched_at=1_900_001_000)  # a 304
    assert (tmp_path / "fresh-until").read_text() == "1900001600\n"


def _principals_command(
    tmp_path, account: str, fresh_until: str | None, serial: str = "", *cluster: str
) -> subprocess.CompletedProcess:
    from access.gateway import sshd

    script = tmp_path / "principals-command"
    script.write_text(sshd.render_principals_command(tmp_path))
    (tmp_path / "ssh" / "principals").mkdir(parents=True, exist_ok=True)
    (tmp_path / "ssh" / "principals" / "virtcloud").write_text(
        "restrict,port-forwarding c42.alice\nrestrict,port-forwarding c420.bob\nrestrict c4.carol\n"
    )
    (tmp_path / "fresh-until").unlink(missing_ok=True)
    if fresh_until is not None:
        (tmp_path / "fresh-until").write_text(fresh_until)
    return subprocess.run(
        ["/bin/sh", str(script), account, serial, *cluster], capture_output=True, text=True, timeout=10
    )


@pytest.mark.parametrize(
    ("account", "fresh_until", "gives"),
    [
        (
            "virtcloud",
            "+60",
            "restrict,port-forwarding c42.alice\nrestrict,port-forwarding c420.bob\nrestrict c4.carol\n",
        ),
        ("virtcloud", "-1", ""),
        ("virtcloud", None, ""),
        ("virtcloud", "12 34", ""),
        ("../virtcloud", "+60", ""),
        ("", "+60", ""),
    ],
    ids=["fresh", "expired", "never pulled", "unreadable", "a path", "no account"],
)
def test_the_bastions_principals_command_gives_principals_only_while_the_state_is_fresh(
    tmp_path, account, fresh_until, gives
):
    if fresh_until is not None and fresh_until[0] in "+-":
        fresh_until = f"{int(time.time()) + int(fresh_until)}\n"
    result = _principals_command(tmp_path, account, fresh_until)
    assert (result.returncode, result.stdout) == (0, gives), result.stderr


def test_the_principals_command_works_from_any_state_directory(tmp_path):
    odd = tmp_path / "it's a $(dir)"
    (odd / "ssh" / "run" / "sessions").mkdir(parents=True)
    result = _principals_command(odd, "virtcloud", f"{int(time.time()) + 60}\n", serial="7")
    assert result.returncode == 0 and result.stdout.startswith("restrict,port-forwarding c42.alice\n"), result.stderr
    pid, started = (odd / "ssh" / "run" / "sessions" / "7").read_text().split()
    assert int(pid) == os.getpid() and started.isdigit()  # (the test is the command's parent here)


def test_a_flood_of_key_queries_records_the_connection_once(tmp_path):
    """sshd runs the principals command for every key a client offers, before any signature is checked: one
    connection asking over and over grew its certificate's record past what root reads (which then dropped it,
    so a revocation cut none of its logins) and started a watchdog each time. It is recorded once; a watchdog's
    mark goes with it, and one left by a killed watchdog goes at the next pull."""
    from access.gateway import sshd
    from access.gateway.state import SshState

    sessions = tmp_path / "ssh" / "run" / "sessions"
    sessions.mkdir(parents=True)
    fresh = f"{int(time.time()) + 60}\n"
    for _ in range(30):
        assert _principals_command(tmp_path, "virtcloud", fresh, "7").returncode == 0
    assert len((sessions / "7").read_text().splitlines()) == 1
    for _ in range(50):  # (a watchdog whose parent is not sshd leaves at once, its mark with it)
        if not list(sessions.glob(".watch-*")):
            break
        time.sleep(0.1)
    assert list(sessions.glob(".watch-*")) == []
    (sessions / ".watch-999999999-1").mkdir()  # a killed watchdog's
    alive = sessions / f".watch-{os.getpid()}-{sshd._started(os.getpid())}"
    alive.mkdir()
    sshd.prune_sessions(SshState.at(tmp_path))
    assert [p.name for p in sessions.glob(".watch-*")] == [alive.name]


def test_many_short_connections_of_one_certificate_never_push_a_long_lived_login_out_of_its_record(tmp_path):
    """A user who opens a long-lived login (a tunnel), then tens of thousands of short connections offering the same
    certificate, grew the record past what root reads: root dropped it, and a revocation cut nothing — the tunnel
    stayed. Each new connection drops the lines of connections that are gone: the record holds the logins up."""
    from access.gateway import sshd
    from access.gateway.state import SshState

    sessions = tmp_path / "ssh" / "run" / "sessions"
    sessions.mkdir(parents=True)
    gone = "".join(f"{999_000_000 + n} 12345\n" for n in range(70_000))  # connections that came and went
    (sessions / "7").write_text(gone)
    assert (sessions / "7").stat().st_size > sshd.SESSIONS_LIMIT
    fresh = f"{int(time.time()) + 60}\n"
    assert _principals_command(tmp_path, "virtcloud", fresh, "7").returncode == 0  # the tunnel's connection
    lines = (sessions / "7").read_text().splitlines()
    assert lines == [f"{os.getpid()} {sshd._started(os.getpid())}"]
    assert not list(sessions.glob(".new-*"))
    assert sshd.session_processes(SshState.at(tmp_path), 7) == []  # (the test is no sshd: read, not taken)


def test_a_bastion_of_one_cluster_gets_only_that_clusters_principals(tmp_path):
    """A bastion in one cluster's namespace (gateway/bastion.py) passes the cluster: another cluster's
    principal — c420's, c4's: the prefix must end at the dot — must not log in there."""
    fresh = f"{int(time.time()) + 60}\n"
    assert _principals_command(tmp_path, "virtcloud", fresh, "", "c42").stdout == "restrict,port-forwarding c42.alice\n"
    assert _principals_command(tmp_path, "virtcloud", fresh, "", "c4").stdout == "restrict c4.carol\n"
    assert _principals_command(tmp_path, "virtcloud", fresh, "", "c9").stdout == ""
    assert _principals_command(tmp_path, "virtcloud", fresh, "", "c4/../x").stdout == ""  # not a cluster name
    assert _principals_command(tmp_path, "virtcloud", "1\n", "", "c42").stdout == ""  # expired: nobody


def test_an_older_state_never_goes_over_a_newer_one_and_installs_take_turns(gateway_state, tmp_path):
    """The agent fetched a document, then a revocation made the portal install a newer one on this host (its own
    gateway) before the agent's install landed: the older document is left out — the CRL and the revoked serials
    never go back in time (the revoked certificate admitted again until the next pull). And two installs never
    interleave: one waits for the other's lock."""
    import threading

    state, ca, doc = gateway_state
    older = {**doc, "generated_at": (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)).isoformat()}
    newer = revoking(ca, {**doc, "generated_at": dt.datetime.now(dt.UTC).isoformat()}, 77)
    pull.install_state(tmp_path, newer, cut_sessions=False)
    crl = state.crl.read_bytes()
    report = pull.install_state(tmp_path, older, cut_sessions=False)
    assert report.written == [] and "left out" in report.notes[0], report
    from access.gateway.state import revoked_serials

    assert state.crl.read_bytes() == crl and 77 in revoked_serials(state.revoked)
    assert json.loads((tmp_path / ".installed.json").read_text())["generated_at"] == newer["generated_at"]

    with pull._serialized(tmp_path):  # an install under way (another process's)
        done = threading.Event()
        threading.Thread(target=lambda: (pull.install_state(tmp_path, newer, cut_sessions=False), done.set())).start()
        assert not done.wait(0.5)  # waits for it
    assert done.wait(10)


def test_a_session_recorded_while_the_cut_ran_stays_recorded_for_the_next_cut(gateway_state, tmp_path, monkeypatch):
    """A client-connect that passed the old revoked list records its session after the pull read the peers to cut:
    the cut does not take it along when it forgets the record (a revoked session with layer-2 access until the
    next renegotiation, and no record for any later pull to cut) — the next pull cuts it."""
    from access.gateway import management

    state, ca, doc = gateway_state
    connect(state, tmp_path, "a", trusted_ip="203.0.113.5", trusted_port="40001")
    killed = []

    def kill_peers(socket_path, peers, *, common_name=None, message="HALT", timeout=5.0):
        if not killed:  # (OpenVPN ran the late client-connect, which read the revoked list before the pull wrote it)
            with monkeypatch.context() as before_the_pull:
                before_the_pull.setattr(vpn, "revoked_lately", lambda state: set())
                connect(state, tmp_path, "late", trusted_ip="198.51.100.9", trusted_port="50002")
        killed.append(list(peers))
        return len(peers)

    monkeypatch.setattr(management, "kill_peers", kill_peers)
    pull.install_state(state.root.parent, revoking(ca, doc, 77))
    assert vpn.session_peers(state, 77) == [("203.0.113.5", "40001"), ("198.51.100.9", "50002")]
    pull.cut_revoked(state.root.parent)
    assert killed[-1] == [("203.0.113.5", "40001"), ("198.51.100.9", "50002")]
    assert not (state.sessions / "77.json").exists()


def test_client_disconnect_forgets_that_peer_only(gateway_state, tmp_path):
    state, _ca, _doc = gateway_state
    connect(state, tmp_path, "a", trusted_ip="203.0.113.5", trusted_port="40001")
    connect(state, tmp_path, "b", trusted_ip6="2001:db8::5", trusted_port="40003")
    gone = {"common_name": "alice", "trusted_ip": "203.0.113.5", "trusted_port": "40001"}
    vpn.client_disconnect(state, {**gone, "tls_serial_0": "77"})
    assert vpn.session_peers(state, 77) == [("2001:db8::5", "40003")]
    assert vpn.session_owner(state, 77) == "alice"
    # without tls_serial_0, the certificate comes from what tls-verify cached for the session's fingerprint
    vpn.client_disconnect(state, {"tls_digest_sha256_0": FP, "trusted_ip6": "2001:db8::5", "trusted_port": "40003"})
    assert not (state.sessions / "77.json").exists()
    # a session never recorded (refused before client-connect), or forgotten already: nothing to do, no error
    vpn.client_disconnect(state, {"tls_serial_0": "78", "trusted_ip": "203.0.113.9", "trusted_port": "1"})
    vpn.client_disconnect(state, {"trusted_ip": "203.0.113.9", "trusted_port": "1"})
    assert vpn.main(["client-disconnect", "--state", str(state.root.parent)], env={"tls_serial_0": "77"}) == 0


def test_old_login_records_with_no_login_up_are_dropped_at_a_pull(tmp_path):
    """sshd reports no logout: a record whose certificate expired long ago (nothing appended for
    RECORD_KEPT) and whose logins are all gone is dropped, a recent one or one with a login up is kept."""
    from access.gateway import sshd
    from access.gateway.state import SshState

    ssh = SshState.at(tmp_path)
    ssh.sessions.mkdir(parents=True)
    me = os.getpid()
    login = subprocess.Popen(["bash", "-c", "exec -a sshd-login sleep 30"])  # a process that looks like sshd's
    try:
        time.sleep(0.2)
        long_ago = time.time() - sshd.RECORD_KEPT - 60
        records = {
            "1": "999999999 1\n",  # old, its login gone: dropped
            "2": "999999999 1\n",  # recent (its certificate may log in again): kept
            "3": f"{me} {sshd._started(me)}\n",  # old, this process: not an sshd, so no login up: dropped
            "4": f"{login.pid} {sshd._started(login.pid)}\n",  # old, a login up: kept
        }
        for name, text in records.items():
            (ssh.sessions / name).write_text(text)
        for name in ("1", "3", "4"):
            os.utime(ssh.sessions / name, (long_ago, long_ago))
        assert sshd.session_processes(ssh, 4) == [login.pid] and sshd.session_processes(ssh, 3) == []
        sshd.prune_sessions(ssh)
        assert sorted(p.name for p in ssh.sessions.iterdir()) == ["2", "4"]
        assert sshd.live_serials(ssh) == {4}
    finally:
        login.kill()
        login.wait()


def test_the_standalone_pull_trusts_the_state_from_when_its_fetch_started(tmp_path, monkeypatch, capsys):
    """``pull.py --state DIR --fetched-at EPOCH < state.json`` (a gateway fetching with curl)."""
    ca = pki.create_ca("CA")
    crl = pki.crl_to_pem(pki.build_crl(ca, [], crl_number=1)).decode()
    doc = {
        "format": 1,
        "etag": "e1",
        "generated_at": "2026-12-01T10:00:00+00:00",
        "max_age": 600,
        "vpn": {"ca": ca.cert_pem().decode(), "aa": ca.cert_pem().decode(), "crl": crl, "vlans": {}},
    }
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(doc)))
    assert pull.main(["--state", str(tmp_path), "--fetched-at", "1900000000"]) == 0
    assert (tmp_path / "fresh-until").read_text() == "1900000600\n"
    assert "wrote" in capsys.readouterr().err
    assert pull.main(["--state", str(tmp_path), "--fetched-at", "soon"]) == 2  # argparse's usage error
    monkeypatch.setattr("sys.stdin", io.StringIO("{not json"))
    assert pull.main(["--state", str(tmp_path)]) == 1
    assert "kept the previous state" in capsys.readouterr().err


def test_a_document_without_the_vpn_section_cuts_the_vpn_sessions_and_admits_nobody(gateway_state, tmp_path):
    """The gateway no longer serves VPN (its document has no ``vpn``): the sessions up are cut, as when the state
    expires, and the VLAN map is emptied, so a reconnect is refused although fresh-until is renewed."""
    state, _ca, doc = gateway_state
    connect(state, tmp_path, "a", trusted_ip="203.0.113.5", trusted_port="40001")
    fake = FakeManagement(state.management, {1: ("alice", "203.0.113.5:40001"), 2: ("bob", "198.51.100.9:1")})
    try:
        report = pull.install_state(tmp_path, {k: v for k, v in doc.items() if k != "vpn"})
    finally:
        fake.close()
    assert report.cut == [77] and fake.sessions == {2: ("bob", "198.51.100.9:1")}
    assert any("no longer has this gateway serve VPN" in note for note in report.notes)
    check_fresh(tmp_path)
    with pytest.raises(vpn.Refused, match="cluster c42 has no VLAN"):
        connect(state, tmp_path, "again", trusted_ip="203.0.113.5", trusted_port="40002")


def test_a_fifo_or_a_link_among_the_bastions_login_records_is_not_followed(tmp_path):
    """The bastion's account writes ``ssh/run/sessions``; the pull (root) reads it to cut logins: a FIFO there would
    block every pull, a link would have root read what it points to. Neither is read; both entries are dropped."""
    from access.gateway import sshd
    from access.gateway.state import SshState

    ssh = SshState.at(tmp_path)
    ssh.sessions.mkdir(parents=True)
    os.mkfifo(ssh.sessions / "23")
    target = tmp_path / "elsewhere"
    target.write_text(f"{os.getpid()} 1\n")
    (ssh.sessions / "24").symlink_to(target)
    done = threading.Event()
    threading.Thread(target=lambda: (pull.fail_closed(tmp_path, now=4e9), done.set()), daemon=True).start()
    assert done.wait(20), "the pull hangs on a FIFO"
    assert sshd.recorded_serials(ssh) == set() and target.read_text() == f"{os.getpid()} 1\n"


def test_the_bastions_run_directory_is_reachable_whatever_the_umask_it_was_made_under(tmp_path):
    """``ssh/run`` made under umask 077 (an operator's root shell running ``gateway config``) was 0700 root's: the
    bastion account's principals command could not record a login there, so no SSH session was ever cut, without
    a word. Every install makes it 0755 again (``run/sessions`` inside stays the account's own, 0700)."""
    from access.gateway.state import SshState

    ssh = SshState.at(tmp_path)
    old = os.umask(0o077)
    try:
        ssh.sessions.mkdir(parents=True)
    finally:
        os.umask(old)
    assert ssh.sessions.parent.stat().st_mode & 0o777 == 0o700
    ssh.ensure_dirs()
    assert ssh.sessions.parent.stat().st_mode & 0o777 == 0o755
    assert ssh.sessions.stat().st_mode & 0o777 == 0o700
