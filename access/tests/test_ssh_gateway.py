"""The SSH bastion for real: our rendered sshd_config, principals file, KRL and certificates with OpenSSH.

One namespace per run (``va<hex>-ssh``) with addresses on its own loopback::

    198.18.60.1:22   bastion sshd (our render_sshd_config), account ``nobody`` (no-login shell)
    198.18.61.11:22  node1 of cluster c42 (a cluster VM's sshd trusting the same user CA)
    198.18.61.12:22  node2 (of another cluster) — the bastion must not forward there for c42

The client uses our rendered ssh_config (ProxyJump) and an ``@cert-authority`` known_hosts line, with
StrictHostKeyChecking=yes: a login proves the host certificates too (no prompt possible).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from access import ssh
from access.gateway import pull, sshd
from access.gateway.state import SshState, fresh_until_path, fresh_until_text, write_atomic
from access.tests._procs import Netns, can_use_netns, node_sshd_config, read, run_prefix, stop, wait_for

SSHD = "/usr/sbin/sshd"
_skip = (
    can_use_netns()
    or (None if os.path.exists(SSHD) else "openssh-server (sshd) not installed")
    or (None if shutil.which("ssh") else "openssh-client (ssh) not installed")
)
pytestmark = [pytest.mark.skipif(bool(_skip), reason=_skip or ""), pytest.mark.lab]

BASTION, NODE1, NODE2 = "198.18.60.1", "198.18.61.11", "198.18.61.12"
LEG = "198.18.61.254/24"  # the clusters' bastion_address: the nodes' network
ACCOUNT = "nobody"  # exists everywhere with a no-login shell: right for a relay-only bastion


def _host_key(dirpath: Path, host_ca, principals: list[str], serial: int) -> tuple[Path, Path]:
    key = ssh.generate_user_key()  # what the portal enrols a gateway with
    key_path = dirpath / "host_key"
    write_atomic(key_path, key.private_openssh)
    cert_path = dirpath / "host_key-cert.pub"
    line = ssh.issue_host_cert(host_ca, public_key=key.public_line, principals=principals, serial=serial)
    write_atomic(cert_path, line + "\n", 0o644)
    return key_path, cert_path


class Bastion:
    def __init__(self, root: Path, ns: Netns):
        self.root, self.ns = root, ns
        self.user_ca = ssh.generate_ca_key()
        self.host_ca = ssh.generate_ca_key()
        self.revoked: list[int] = []
        self.krl_version = 0
        self.state = SshState.at(root / "state")
        self.state.ensure_dirs()
        _host_key(self.state.root, self.host_ca, [BASTION, "bastion"], 1)
        self.publish_krl()  # the first pull installs CA key, KRL and principals

        self.config = self.state.root / "sshd_config"
        write_atomic(
            self.config,
            sshd.render_sshd_config(
                state_dir=self.state.root.parent,
                listen=[(BASTION, 22)],
                account=ACCOUNT,
                pid_file=self.state.root / "sshd.pid",
            ),
            0o644,
        )
        self.log = root / "bastion.log"

    def publish_krl(self) -> pull.InstallReport:
        """What the portal publishes and the gateway pulls (access.gateway.pull installs it)."""
        self.krl_version += 1
        krl = ssh.build_krl(
            ca_public_key=ssh.public_key_line(self.user_ca), serials=self.revoked, version=self.krl_version
        )
        doc = {
            "format": 1,
            "generated_at": dt.datetime.now(dt.UTC).isoformat(),
            "max_age": 3600,
            "ssh": {
                "account": ACCOUNT,
                "user_ca": ssh.public_key_line(self.user_ca),
                "host_ca": ssh.public_key_line(self.host_ca),
                "krl": base64.b64encode(krl).decode(),
                "revoked_sessions": [{"serial": serial} for serial in self.revoked],
                "clusters": {
                    # the bastion forwards only into the network of its address in the cluster (its leg)
                    "c42": {
                        "principals": [ssh.principal("c42", "alice")],
                        "targets": [[NODE1, 22]],
                        "bastion_address": LEG,
                    },
                    "c43": {
                        "principals": [ssh.principal("c43", "bob")],
                        "targets": [[NODE2, 22]],
                        "bastion_address": LEG,
                    },
                    "c44": {"principals": [ssh.principal("c44", "nobody-home")], "targets": []},
                },
            },
        }
        report = pull.install_state(self.state.root.parent, doc)
        assert str(self.state.krl) in report.written
        return report

    def node_config(self, name: str, address: str) -> Path:
        """A cluster node's sshd: trusts the user CA; root may log in with the cluster's principals."""
        d = self.root / name
        d.mkdir(mode=0o755)
        # the portal certifies a node by its alias (the ssh_config's HostKeyAlias); these nodes serve both clusters
        _host_key(d, self.host_ca, [ssh.node_alias(c, name) for c in ("c42", "c43")], 10 + len(name))
        return node_sshd_config(d, address=address, user_ca=self.state.user_ca, principals=["c42.alice", "c43.bob"])


class User:
    """A workstation: key, certificate, known_hosts and the rendered ssh_config profile."""

    def __init__(self, lab, name: str, cert_line: str, key: ssh.UserKeyPair, cluster: str = "c42", port: int = 22):
        self.dir = lab.root / f"user-{name}"
        self.dir.mkdir(mode=0o700)
        ident = self.dir / "id"
        write_atomic(ident, key.private_openssh)
        write_atomic(self.dir / "id-cert.pub", cert_line + "\n", 0o644)
        nodes = [("node1", NODE1), ("node2", NODE2)]
        patterns = ssh.known_hosts_patterns(cluster=cluster, nodes=nodes, gateway_host=BASTION, gateway_port=port)
        write_atomic(
            self.dir / "known_hosts", ssh.known_hosts_line(ssh.public_key_line(lab.bastion.host_ca), patterns), 0o644
        )
        self.config = self.dir / "ssh_config"
        self.config.write_text(
            ssh.render_ssh_config(
                cluster=cluster,
                nodes=nodes,
                gateway_host=BASTION,
                gateway_port=port,
                gateway_user=ACCOUNT,
                identity_file=str(ident),
                certificate_file=str(self.dir / "id-cert.pub"),
                known_hosts_file=str(self.dir / "known_hosts"),
            )
            + "Host *\n  GlobalKnownHostsFile /dev/null\n  BatchMode yes\n  ConnectTimeout 5\n"
        )
        self.lab = lab

    def ssh(self, host: str, *command: str) -> subprocess.CompletedProcess[str]:
        return self.lab.ns.run("ssh", "-F", str(self.config), host, *command, check=False, timeout=20)


@pytest.fixture(scope="module")
def lab():
    prefix = run_prefix()
    # Not under /tmp: sshd's StrictModes refuses a principals file below a world-writable directory.
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/run"))
    os.chmod(root, 0o755)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    ns = None
    procs: list[subprocess.Popen] = []
    try:
        ns = Netns(f"{prefix}-ssh")
        for addr in (BASTION, NODE1, NODE2):
            ns.ip("addr", "add", f"{addr}/32", "dev", "lo")
        bastion = Bastion(root, ns)
        started = time.monotonic()
        procs.append(ns.popen(SSHD, "-D", "-f", str(bastion.config), "-E", str(bastion.log)))
        for name, addr in (("node1", NODE1), ("node2", NODE2)):
            conf = bastion.node_config(name, addr)
            procs.append(ns.popen(SSHD, "-D", "-f", str(conf), "-E", str(root / f"{name}.log")))
        for log in (bastion.log, root / "node1.log", root / "node2.log"):
            wait_for(lambda log=log: "Server listening on" in read(log), 10, what=f"sshd in {log.name}")
        print(f"\nthree sshd up in {(time.monotonic() - started) * 1000:.0f} ms")

        class Lab:
            pass

        lab = Lab()
        lab.root, lab.ns, lab.bastion = root, ns, bastion
        yield lab
    finally:
        for p in procs:
            stop(p)
        if ns:
            ns.delete()
        if not os.environ.get("VIRTCLOUD_KEEP_TEST_FILES"):
            shutil.rmtree(root, ignore_errors=True)


_serial = iter(range(100, 10_000))


def _user(lab, name="alice", cluster="c42", *, ca=None, now=None, hours=1.0) -> tuple[User, int]:
    key = ssh.generate_user_key()
    serial = next(_serial)
    cert = ssh.issue_user_cert(
        ca or lab.bastion.user_ca,
        public_key=key.public_line,
        user=name,
        cluster=cluster,
        serial=serial,
        hours=hours,
        now=now,
    )
    return User(lab, f"{name}-{serial}", cert, key, cluster=cluster), serial


def _bastion_says(lab, needle: str) -> None:
    wait_for(lambda: needle in read(lab.bastion.log), 5, what=f"bastion log line {needle!r}")


def test_valid_certificate_jumps_to_its_cluster_node(lab):
    user, serial = _user(lab)
    t = time.perf_counter()
    r = user.ssh("node1.c42", "echo", "hello-from-$(hostname -I 2>/dev/null || echo node)")
    ms = (time.perf_counter() - t) * 1000
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("hello-from-")
    print(f"\nssh login + command through the bastion (ProxyJump): {ms:.0f} ms")
    # The audit trail: sshd logged the certificate's key id and serial.
    _bastion_says(lab, f"ID virtcloud:user=alice:cluster=c42:serial={serial}:issued=")
    _bastion_says(lab, f"serial {serial}")


def test_forwarding_outside_the_cluster_refused(lab):
    user, _ = _user(lab)
    r = user.ssh("node2.c42", "true")  # node2 is reachable from the bastion, but not permitted to c42
    assert r.returncode == 255
    assert "administratively prohibited" in r.stderr, r.stderr
    _bastion_says(lab, f"to connect to host {NODE2} port 22, but the request was denied")


def test_expired_certificate_refused(lab):
    user, _ = _user(lab, now=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3), hours=1)
    r = user.ssh("node1.c42", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr
    _bastion_says(lab, "Certificate invalid: expired")


def test_an_expired_state_lets_nobody_in(lab):
    """A bastion that has not pulled for its state's max_age fails closed (the principals may name a cluster
    that ended since): sshd's principals command gives nothing, so a valid certificate is refused — until the
    next pull, with nothing restarted."""
    user, serial = _user(lab)
    log = lab.root / f"live-{serial}.log"
    live = lab.ns.popen("ssh", "-F", str(user.config), "node1.c42", "echo up; sleep 60", log=log)
    fresh = fresh_until_path(lab.bastion.state.root.parent)
    kept = fresh.read_text()
    try:
        wait_for(lambda: "up" in read(log), 10, what="the login through the bastion")
        assert sshd.session_processes(lab.bastion.state, serial)
        write_atomic(fresh, fresh_until_text(time.time() - 1), 0o644)
        r = user.ssh("node1.c42", "true")
        assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr
        # The pull that cannot reach the portal ends the logins that are up.
        assert serial in pull.fail_closed(lab.bastion.state.root.parent).ssh_cut
        wait_for(lambda: live.poll() is not None, 10, what="the live login to end")
    finally:
        write_atomic(fresh, kept, 0o644)
        stop(live, kill=True)
    assert pull.fail_closed(lab.bastion.state.root.parent) is None  # fresh again: nothing to cut
    assert user.ssh("node1.c42", "true").returncode == 0


def test_a_live_login_ends_when_the_state_expires_even_if_no_pull_runs(lab):
    """The pull timer itself is dead: nothing cuts the logins that are up — but each connection's watchdog
    (left by the principals command) ends its session once the state it was let in on expires."""
    user, serial = _user(lab)
    fresh = fresh_until_path(lab.bastion.state.root.parent)
    kept = fresh.read_text()
    log = lab.root / f"live-watchdog-{serial}.log"
    write_atomic(fresh, fresh_until_text(time.time() + 6), 0o644)  # (no pull comes after this one)
    live = lab.ns.popen("ssh", "-F", str(user.config), "node1.c42", "echo up; sleep 60", log=log)
    try:
        wait_for(lambda: "up" in read(log), 5, what="the login through the bastion")
        wait_for(lambda: live.poll() is not None, 20, what="the login to end once the state expired")
        assert live.returncode != 0
    finally:
        write_atomic(fresh, kept, 0o644)
        stop(live, kill=True)
    assert user.ssh("node1.c42", "true").returncode == 0  # a pull came: in again


def test_principal_of_another_cluster_refused(lab):
    user, _ = _user(lab, "alice", "c99")  # a valid certificate, but for a cluster the bastion does not list
    r = user.ssh("node1.c99", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr
    _bastion_says(lab, "Certificate does not contain an authorized principal")


def test_principal_without_targets_has_no_line(lab):
    user, _ = _user(lab, "nobody-home", "c44")
    assert user.ssh("node1.c44", "true").returncode == 255


def test_revoked_certificate_refused_by_krl(lab):
    user, serial = _user(lab)
    assert user.ssh("node1.c42", "true").returncode == 0
    lab.bastion.revoked.append(serial)
    lab.bastion.publish_krl()  # sshd reads the KRL at each authentication: no reload needed
    r = user.ssh("node1.c42", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr
    _bastion_says(lab, "revoked by file")


def test_a_revocation_cuts_the_live_logins_of_that_certificate_and_no_other(lab):
    """The principals command records each login's sshd under the certificate's serial; a pull that brings
    the revocation ends exactly those connections (and every forwarding in them), as the VPN gateway cuts a
    revoked profile's sessions."""
    user, serial = _user(lab)
    other, other_serial = _user(lab)
    logs = {name: lab.root / f"live-{name}.log" for name in ("user", "other")}
    live = lab.ns.popen("ssh", "-F", str(user.config), "node1.c42", "echo up; sleep 60", log=logs["user"])
    kept = lab.ns.popen("ssh", "-F", str(other.config), "node1.c42", "echo up; sleep 60", log=logs["other"])
    try:
        for name, s in (("user", serial), ("other", other_serial)):
            wait_for(lambda name=name: "up" in read(logs[name]), 10, what=f"the login of serial {s}")
            assert sshd.session_processes(lab.bastion.state, s)
        assert live.poll() is None and kept.poll() is None

        lab.bastion.revoked.append(serial)
        report = lab.bastion.publish_krl()
        assert report.ssh_cut == [serial] and report.cut_errors == []
        wait_for(lambda: live.poll() is not None, 10, what="the revoked certificate's login to end")
        assert live.returncode != 0
        time.sleep(0.5)
        assert kept.poll() is None, read(logs["other"])
        assert sshd.session_processes(lab.bastion.state, serial) == []
        assert len(sshd.session_processes(lab.bastion.state, other_serial)) == 1
        assert lab.bastion.publish_krl().ssh_cut == []  # once
    finally:
        stop(live, kill=True)
        stop(kept, kill=True)


def test_certificate_from_another_ca_refused(lab):
    rogue = ssh.generate_ca_key()
    user, serial = _user(lab, ca=rogue)
    r = user.ssh("node1.c42", "true")
    assert r.returncode == 255 and "Permission denied" in r.stderr, r.stderr
    _bastion_says(lab, f"(serial {serial}) CA ED25519 {ssh.fingerprint(rogue)}")
    assert f'Accepted certificate ID "virtcloud:user=alice:cluster=c42:serial={serial}:' not in read(lab.bastion.log)


def test_no_shell_on_the_bastion(lab):
    user, _ = _user(lab)
    r = user.ssh("virtcloud-gw-c42", "id")
    assert r.returncode != 0
    assert "uid=" not in r.stdout
    assert "not available" in r.stdout + r.stderr  # nologin: the bastion account has no shell


def test_no_shell_on_the_bastion_even_for_an_account_that_has_one(lab):
    """The bastion's sshd forces ``nologin`` on every session: an operator who gave the account a real shell
    still gives users nothing but ProxyJump. The same bastion (state, CAs, principals) on a port of its own, its
    sshd in a mount namespace where the account's shell is /bin/sh (the machine's /etc/passwd is left alone)."""
    import re

    passwd = lab.root / "passwd"
    entry = re.compile(rf"^({ACCOUNT}:(?:[^:\n]*:){{5}})[^:\n]*$", re.MULTILINE)
    passwd.write_text(entry.sub(r"\1/bin/sh", Path("/etc/passwd").read_text()))
    bind = 'mount --bind "$0" /etc/passwd && exec "$@"'
    with_shell = ["unshare", "--mount", "--propagation", "private", "sh", "-c", bind]
    seen = lab.ns.run(*with_shell, str(passwd), "getent", "passwd", ACCOUNT)
    assert seen.stdout.strip().endswith(":/bin/sh"), seen.stdout  # what sshd's getpwnam() reads there
    config = lab.root / "sshd_config.shell"
    write_atomic(
        config,
        sshd.render_sshd_config(
            state_dir=lab.bastion.state.root.parent,
            listen=[(BASTION, 2222)],
            account=ACCOUNT,
            pid_file=lab.root / "shell.pid",
        ),
        0o644,
    )
    log = lab.root / "shell.log"
    proc = lab.ns.popen(*with_shell, str(passwd), SSHD, "-D", "-f", str(config), "-E", str(log))
    try:
        wait_for(lambda: "Server listening on" in read(log), 10, what="the second bastion sshd")
        key, serial = ssh.generate_user_key(), next(_serial)
        cert = ssh.issue_user_cert(
            lab.bastion.user_ca, public_key=key.public_line, user="alice", cluster="c42", serial=serial
        )
        user = User(lab, f"shell-{serial}", cert, key, port=2222)
        r = user.ssh("virtcloud-gw-c42", "id")
        assert "uid=" not in r.stdout and r.returncode != 0, (r.stdout, r.stderr)
        assert "not available" in r.stdout + r.stderr, r.stderr  # nologin, run by the account's /bin/sh
        assert f'Accepted certificate ID "virtcloud:user=alice:cluster=c42:serial={serial}:' in read(log)  # it got in
        r = user.ssh("node1.c42", "true")
        assert r.returncode == 0, r.stderr  # and relays as ever (ProxyJump: a direct-tcpip channel, no session)
    finally:
        stop(proc)


def test_a_revoked_node_host_key_is_refused_by_the_client(lab):
    """What the portal puts into every profile's known_hosts for a revoked node host certificate (``@revoked``
    with the node's key) makes ssh refuse that node's certificate, though the host CA still signs for it."""
    user, _ = _user(lab)
    assert user.ssh("node1.c42", "true").returncode == 0
    public = lab.ns.run("ssh-keygen", "-y", "-f", str(lab.root / "node1" / "host_key")).stdout
    # for the names the profile reaches the node by (the @cert-authority line's, the gateway's first)
    ca_line = next(line for line in (user.dir / "known_hosts").read_text().splitlines() if line.startswith("@cert"))
    with open(user.dir / "known_hosts", "a") as known_hosts:
        known_hosts.write(ssh.known_hosts_revoked_line(public, ca_line.split()[1].split(",")[1:]))
    r = user.ssh("node1.c42", "true")
    assert r.returncode == 255 and "REVOKED HOST KEY" in r.stderr, r.stderr


@pytest.mark.django_db
def test_a_retired_bastion_host_key_is_refused_by_the_client(lab):
    """What the portal adds to every bundle's known_hosts once a gateway is re-enrolled (its old host key
    ``@revoked`` for the gateway's name, ``services.retired_host_key_lines``) makes ssh refuse a bastion still
    presenting that key with its valid certificate: whoever kept the old key cannot stand in for the gateway."""
    from types import SimpleNamespace

    from access import services
    from access.models import RetiredHostKey

    user, _ = _user(lab)
    assert user.ssh("node1.c42", "true").returncode == 0
    public = lab.ns.run("ssh-keygen", "-y", "-f", str(lab.bastion.state.root / "host_key")).stdout
    ca_line = next(line for line in (user.dir / "known_hosts").read_text().splitlines() if line.startswith("@cert"))
    until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    RetiredHostKey.objects.create(key=public, names=[BASTION, "bastion"], until=until, gateway="gw")
    lines = services.retired_host_key_lines(SimpleNamespace(address=BASTION), ca_line.split()[1].split(",")[:1])
    assert lines.startswith("@revoked ")
    with open(user.dir / "known_hosts", "a") as known_hosts:
        known_hosts.write(lines)
    r = user.ssh("node1.c42", "true")
    assert r.returncode == 255 and "REVOKED HOST KEY" in r.stderr, r.stderr
