"""The SSH CA API: key checks, certificate contents, bounds, and the KRL writer checked by ssh-keygen."""

import datetime as dt
import re
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from access import ssh

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca():
    return ssh.generate_ca_key()


def _pub(key) -> str:
    return ssh.public_key_line(key, "user@laptop")


def test_ca_key_encrypted_at_rest(ca):
    pem = ssh.ca_key_to_encrypted_pem(ca, b"s3cret")
    assert b"ENCRYPTED" in pem
    assert ssh.public_key_line(ssh.load_ca_key(pem, b"s3cret")) == ssh.public_key_line(ca)
    with pytest.raises(ValueError, match="wrong passphrase"):
        ssh.load_ca_key(pem, b"nope")


def test_user_cert_contents(ca):
    user_key = ed25519.Ed25519PrivateKey.generate()
    line = ssh.issue_user_cert(ca, public_key=_pub(user_key), user="alice", cluster="c42", serial=17, hours=8, now=NOW)
    assert line.startswith("ssh-ed25519-cert-v01@openssh.com ")
    cert = ssh.load_cert(line)
    cert.verify_cert_signature()
    assert (
        cert.signature_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        == ssh.public_key_line(ca).encode()
    )
    assert cert.type == serialization.SSHCertificateType.USER
    assert cert.serial == 17
    assert cert.valid_principals == [b"c42.alice"]
    assert cert.key_id == f"virtcloud:user=alice:cluster=c42:serial=17:issued={NOW:%Y-%m-%dT%H:%M:%SZ}".encode()
    assert re.fullmatch(
        rb"virtcloud:user=alice:cluster=c42:serial=17:issued=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cert.key_id
    )
    assert cert.valid_after == int((NOW - ssh.CLOCK_SKEW).timestamp())
    assert cert.valid_before == int((NOW + dt.timedelta(hours=8)).timestamp())
    assert set(cert.extensions) == {b"permit-pty", b"permit-port-forwarding"}
    for absent in (b"permit-agent-forwarding", b"permit-X11-forwarding", b"permit-user-rc"):
        assert absent not in cert.extensions
    assert cert.critical_options == {}


@pytest.mark.parametrize("hours", [0.1, 25, 0])
def test_validity_bounds_refused(ca, hours):
    user_key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ssh.SSHCertError, match="outside the allowed"):
        ssh.issue_user_cert(ca, public_key=_pub(user_key), user="alice", cluster="c42", serial=1, hours=hours)


def test_bounds_are_configurable(ca):
    user_key = ed25519.Ed25519PrivateKey.generate()
    line = ssh.issue_user_cert(
        ca, public_key=_pub(user_key), user="alice", cluster="c42", serial=2, hours=48, max_hours=72, now=NOW
    )
    cert = ssh.load_cert(line)
    assert cert.valid_before - cert.valid_after == 48 * 3600 + 300


def test_accepted_key_types():
    assert ssh.parse_public_key(_pub(ed25519.Ed25519PrivateKey.generate())).key_type == "ssh-ed25519"
    parsed = ssh.parse_public_key(_pub(ec.generate_private_key(ec.SECP384R1())))
    assert (parsed.key_type, parsed.bits) == ("ecdsa-sha2-nistp384", 384)
    assert parsed.comment == "user@laptop"
    assert ssh.parse_public_key(_pub(rsa.generate_private_key(65537, 3072))).bits == 3072


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ssh-dss AAAAB3NzaC1kc3MAAACBAP== x", "DSA keys are weak"),
        ("sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t x", "security-key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----", "PRIVATE key"),
        ("ssh-ed25519-cert-v01@openssh.com AAAA x", "certificate, not a public key"),
        ("ssh-ed25519 not-base64!!", "not a valid OpenSSH public key"),
        ("", "exactly one public key"),
    ],
)
def test_rejected_keys(text, reason):
    with pytest.raises(ssh.SSHKeyRejected, match=reason):
        ssh.parse_public_key(text)


def test_an_unsupported_key_type_says_which_ones_are():
    with pytest.raises(ssh.SSHKeyRejected) as info:
        ssh.parse_public_key("ssh-ed448 AAAA x")
    assert str(info.value) == (
        "unsupported key type ssh-ed448 (use ssh-ed25519, ecdsa-sha2-nistp256/384/521, or ssh-rsa of 3072 bits or more)"
    )


def test_short_rsa_rejected():
    with pytest.raises(ssh.SSHKeyRejected, match="2048 bits is too weak"):
        ssh.parse_public_key(_pub(rsa.generate_private_key(65537, 2048)))
    assert ssh.parse_public_key(_pub(rsa.generate_private_key(65537, 2048)), min_rsa_bits=2048).bits == 2048


def test_generated_user_key_is_only_returned(ca):
    pair = ssh.generate_user_key("alice@virtcloud")
    assert pair.private_openssh.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert "PRIVATE" not in repr(pair)
    key = serialization.load_ssh_private_key(pair.private_openssh, None)
    assert ssh.public_key_line(key) == " ".join(pair.public_line.split()[:2])
    assert ssh.issue_user_cert(ca, public_key=pair.public_line, user="alice", cluster="c42", serial=3)


def test_host_cert(ca):
    host_key = ed25519.Ed25519PrivateKey.generate()
    cert = ssh.load_cert(
        ssh.issue_host_cert(ca, public_key=_pub(host_key), principals=["gw1", "198.18.60.1"], serial=9)
    )
    assert cert.type == serialization.SSHCertificateType.HOST
    assert cert.valid_principals == [b"gw1", b"198.18.60.1"]
    assert cert.extensions == {}


def test_principal_and_bad_names():
    assert ssh.principal("c42", "alice") == "c42.alice"
    assert ssh.principal("c42", "jo.doe+hpc@example.org") == "c42.jo.doe+hpc@example.org"  # as directories name
    with pytest.raises(ssh.SSHCertError):
        ssh.principal("c42", "al ice")
    with pytest.raises(ssh.SSHCertError, match="invalid cluster name"):
        ssh.principal("c.42", "alice")  # a label with '.' would make the split ambiguous


def test_a_principal_names_one_cluster_and_user():
    """With ``-`` between them, cluster ``c-17`` + user ``18-bob`` and cluster ``c-17-18`` + user ``bob``
    shared a principal, and the bastion applied the first line (one cluster's targets) to both."""
    assert ssh.principal("c-17", "18-bob") != ssh.principal("c-17-18", "bob")
    pairs = [(c, u) for c in ("c-1", "c-1-2", "c-1-2-3") for u in ("2-3-bob", "3-bob", "bob", "2.bob", "x.y")]
    assert len({ssh.principal(c, u) for c, u in pairs}) == len(pairs)


def test_the_bastion_refuses_a_principal_granted_twice():
    from access.gateway import sshd

    grants = [
        sshd.PrincipalGrant("c-1.bob", [("198.18.61.11", 22)]),
        sshd.PrincipalGrant("c-1.bob", [("198.18.61.12", 22)]),
    ]
    with pytest.raises(sshd.SshdConfigError, match="granted twice"):
        sshd.render_principals_file(grants)


def test_serial_runs():
    singles, ranges = ssh._serial_runs([5, 1, 2, 3, 9, 10, 3])
    assert singles == [5, 9, 10] and ranges == [(1, 3)]


needs_keygen = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None, reason="ssh-keygen (openssh-client) not installed"
)


@needs_keygen
def test_krl_checked_by_ssh_keygen(ca, tmp_path):
    (tmp_path / "ca.pub").write_text(ssh.public_key_line(ca) + "\n")
    certs = {}
    for serial in (7, 20, 21, 22, 23, 40, 41):
        user_key = ed25519.Ed25519PrivateKey.generate()
        certs[serial] = ssh.issue_user_cert(ca, public_key=_pub(user_key), user="u", cluster="c42", serial=serial)
        (tmp_path / f"{serial}-cert.pub").write_text(certs[serial] + "\n")
    by_id_key = ed25519.Ed25519PrivateKey.generate()
    by_id = ssh.issue_user_cert(ca, public_key=_pub(by_id_key), user="mallory", cluster="c42", serial=99, now=NOW)
    (tmp_path / "99-cert.pub").write_text(by_id + "\n")
    plain = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "plain.pub").write_text(_pub(plain) + "\n")
    other_ca = ssh.generate_ca_key()
    foreign = ssh.issue_user_cert(other_ca, public_key=_pub(plain), user="u", cluster="c42", serial=7)
    (tmp_path / "foreign-cert.pub").write_text(foreign + "\n")

    krl = ssh.build_krl(
        ca_public_key=ssh.public_key_line(ca),
        serials=[7, 20, 21, 22, 23],
        key_ids=[ssh.key_id(user="mallory", cluster="c42", serial=99, issued=NOW)],
        revoked_keys=[_pub(plain)],
        version=3,
        comment="virtcloud test",
    )
    (tmp_path / "krl").write_bytes(krl)

    def query(name):
        r = subprocess.run(["ssh-keygen", "-Q", "-f", "krl", name], cwd=tmp_path, capture_output=True, text=True)
        assert "REVOKED" in r.stdout or r.returncode == 0, r.stdout + r.stderr
        return "REVOKED" in r.stdout

    for serial in (7, 20, 21, 22, 23):
        assert query(f"{serial}-cert.pub"), serial
    assert not query("40-cert.pub")
    assert not query("41-cert.pub")
    assert query("99-cert.pub")  # by key id
    assert query("plain.pub")  # by SHA-256 fingerprint
    assert query("foreign-cert.pub")  # its key is the revoked plain key, whoever signed it

    listing = subprocess.run(["ssh-keygen", "-Q", "-l", "-f", "krl"], cwd=tmp_path, capture_output=True, text=True)
    for expected in (
        "# KRL version 3",
        "# Comment: virtcloud test",
        "serial: 7\n",
        "serial: 20-23\n",
        "id: virtcloud:user=mallory",
    ):
        assert expected in listing.stdout, listing.stdout

    # An empty KRL is valid (what a brand-new gateway gets).
    (tmp_path / "empty").write_bytes(ssh.build_krl(ca_public_key=ssh.public_key_line(ca), version=1))
    r = subprocess.run(["ssh-keygen", "-Q", "-f", "empty", "7-cert.pub"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout


SSH_CONFIG = dict(
    cluster="c42",
    nodes=[("node1", "10.0.0.1")],
    gateway_host="gw.example.org",
    gateway_port=22,
    gateway_user="virtcloud",
    identity_file="~/.ssh/id_ed25519",
    certificate_file="id_virtcloud-cert.pub",
    known_hosts_file="known_hosts",
)


@pytest.mark.parametrize(
    "bad",
    [
        {"gateway_user": "root\nProxyCommand touch /tmp/x"},
        {"gateway_user": "root ProxyCommand"},
        {"gateway_host": "gw.example.org\nProxyCommand x"},
        {"gateway_host": "gw.example.org\n"},
        {"gateway_port": 0},
        {"gateway_port": 65536},
        {"nodes": [("node1", "10.0.0.1\nProxyCommand x")]},
        {"nodes": [("node1\n", "10.0.0.1")]},
        {"identity_file": "id key"},
        {"known_hosts_file": "known_hosts\x00"},
        {"cluster": "c42\n"},
    ],
)
def test_ssh_config_refuses_what_would_add_a_directive(bad):
    with pytest.raises(ssh.SSHCertError):
        ssh.render_ssh_config(**{**SSH_CONFIG, **bad})


def test_ssh_config_of_sound_values():
    config = ssh.render_ssh_config(**SSH_CONFIG)
    assert "\n  HostName gw.example.org\n  Port 22\n  User virtcloud\n" in config
    assert "Host node1.c42\n  HostName 10.0.0.1\n" in config
    assert "ProxyCommand" not in config


def test_known_hosts_names_the_profiles_hosts_as_ssh_looks_them_up(ca):
    """The @cert-authority line's patterns are the hosts the ssh_config connects to — the gateway (``[host]:port``
    off port 22, as ssh looks up such a host) and each node's alias (its HostKeyAlias; never its address) — never
    a wildcard: merged into a user's ~/.ssh/known_hosts, the portal's host CA vouches for nothing else."""
    args = {k: SSH_CONFIG[k] for k in ("cluster", "nodes", "gateway_host", "gateway_port")}
    assert ssh.known_hosts_patterns(**args) == ["gw.example.org", "node1.c42"]
    on_its_port = ssh.known_hosts_patterns(**{**args, "gateway_port": 30100, "nodes": [("n2", "n2.c42")]})
    assert on_its_port == ["[gw.example.org]:30100", "n2.c42"]
    line = ssh.known_hosts_line(ssh.public_key_line(ca, "comment"), on_its_port)
    assert line == f"@cert-authority [gw.example.org]:30100,n2.c42 {ssh.public_key_line(ca)}\n"
    for bad in ([], ["*"], ["10.0.0.*"], ["!evil"], ["a,b"], ["a b"]):
        with pytest.raises(ssh.SSHCertError):
            ssh.known_hosts_line(ssh.public_key_line(ca), bad)
    host = ssh.public_key_line(ed25519.Ed25519PrivateKey.generate())
    line = ssh.known_hosts_revoked_line(host + " root@node1", ["node1.c42", "10.0.0.1"])
    assert line == f"@revoked node1.c42,10.0.0.1 {host}\n"
    for bad in ([], ["*"], ["a,b"]):
        with pytest.raises(ssh.SSHCertError):
            ssh.known_hosts_revoked_line(host, bad)


def test_a_nodes_host_certificate_names_how_the_ssh_config_reaches_it(ca):
    # the alias only, never the address, which the cluster's owner picks (the gateway's, another cluster's)
    assert ssh.node_host_names("c42", "node1") == ["node1.c42"]
    # two clusters' nodes never share an alias (a host certificate of one would be good for the other): cluster
    # a (id 1) with node b-2-x, cluster a-1-b (id 2) with node x
    assert ssh.node_alias("a-1", "b-2-x") != ssh.node_alias("a-1-b-2", "x")
    config = ssh.render_ssh_config(**SSH_CONFIG)
    for name, address in SSH_CONFIG["nodes"]:
        (alias,) = ssh.node_host_names(SSH_CONFIG["cluster"], name)
        assert f"Host {alias}\n  HostName {address}\n  HostKeyAlias {alias}\n" in config
    until = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=3)
    key = _pub(ed25519.Ed25519PrivateKey.generate())
    line = ssh.issue_host_cert(ca, public_key=key, principals=["x"], serial=3, until=until)
    assert ssh.load_cert(line).valid_before == int(until.timestamp())
    with pytest.raises(ssh.SSHCertError, match="ended already"):
        ssh.issue_host_cert(ca, public_key=key, principals=["x"], serial=4, until=until - dt.timedelta(hours=4))
    text = ssh.render_authorized_principals("c42", ["c42.alice", "c42.jo.doe@example.org"])
    assert text.splitlines()[1:] == ["c42.alice", "c42.jo.doe@example.org"] and text.startswith("# ")
    with pytest.raises(ssh.SSHCertError):
        ssh.render_authorized_principals("c42", ["c42.alice\nc43.bob"])


# PuTTYgen's private key file (format 3), as a Windows user may paste it: no "PRIVATE KEY" in it
PPK = """PuTTY-User-Key-File-3: ssh-ed25519
Encryption: none
Comment: eddsa-key-20261207
Public-Lines: 2
AAAAC3NzaC1lZDI1NTE5AAAAIDk1Xnq0xZ2iWQvTt3bP0K8e0m5m8KQm3gq5Q8w0
2Qyd
Private-Lines: 1
AAAAIF3c9mS1Jk1V0p8b3d4w8h2xC7v0m9bS5KcB2n6o7pQ1
Private-MAC: 4f0d7f6c0b1a2e3d4c5b6a79887766554433221100ffeeddccbbaa9988776655
"""


def test_a_putty_private_key_is_refused_as_a_private_key():
    assert ssh.looks_private(PPK)
    with pytest.raises(ssh.SSHKeyRejected, match="this is a PRIVATE key"):
        ssh.parse_public_key(PPK)


def test_an_ssh2_public_key_from_puttygen_or_ssh_keygen_e_is_taken_as_its_openssh_line(tmp_path):
    """PuTTYgen's "Save public key" (and ``ssh-keygen -e``) writes RFC 4716: it stands for one OpenSSH line."""
    import subprocess

    key = ed25519.Ed25519PrivateKey.generate()
    line = _pub(key)
    (tmp_path / "id.pub").write_text(line + "\n")
    exported = subprocess.run(
        ["ssh-keygen", "-e", "-f", str(tmp_path / "id.pub")], capture_output=True, text=True, check=True
    ).stdout
    assert exported.startswith("---- BEGIN SSH2 PUBLIC KEY ----")
    parsed = ssh.parse_public_key(exported)
    assert parsed.key_type == "ssh-ed25519" and ssh.fingerprint(parsed.key) == ssh.fingerprint(key.public_key())
    # PuTTYgen's own: a quoted comment that goes on past a backslash, the body wrapped at 64 columns
    blob = line.split()[1]
    puttygen = (
        "---- BEGIN SSH2 PUBLIC KEY ----\n"
        'Comment: "eddsa-key-20261207 on the \\\n'
        'desk"\n' + "\n".join(blob[i : i + 64] for i in range(0, len(blob), 64)) + "\n---- END SSH2 PUBLIC KEY ----\n"
    )
    parsed = ssh.parse_public_key(puttygen)
    assert parsed.comment == "eddsa-key-20261207 on the desk"
    assert ssh.fingerprint(parsed.key) == ssh.fingerprint(key.public_key())
    with pytest.raises(ssh.SSHKeyRejected, match="without its '---- END SSH2 PUBLIC KEY ----' line"):
        ssh.parse_public_key(puttygen.split("---- END")[0])
    with pytest.raises(ssh.SSHKeyRejected, match="not a valid SSH2 public key"):
        ssh.parse_public_key("---- BEGIN SSH2 PUBLIC KEY ----\n!!!\n---- END SSH2 PUBLIC KEY ----")
