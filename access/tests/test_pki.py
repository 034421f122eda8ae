"""The VPN PKI: CA at rest, client/server/AA certificates, CRL, tls-crypt key — checked with openssl too."""

import datetime as dt
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from access import pki

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def ca():
    return pki.create_ca("VirtCloud VPN CA")


def test_ca_key_encrypted_at_rest_and_reloads(ca):
    pem = ca.key_pem(b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in pem
    loaded = pki.load_ca(ca.cert_pem(), pem, b"correct horse")
    assert loaded.key.public_key() == ca.key.public_key()
    with pytest.raises(pki.PKIError, match="wrong passphrase"):
        pki.load_ca(ca.cert_pem(), pem, b"wrong")
    with pytest.raises(pki.PKIError, match="without a passphrase"):
        ca.key_pem(b"")


def test_ca_key_must_match_certificate(ca):
    other = pki.create_ca("Other")
    with pytest.raises(pki.PKIError, match="does not match"):
        pki.load_ca(ca.cert_pem(), other.key_pem(b"pw"), b"pw")


def test_client_cert_fields(ca):
    key = pki.generate_client_key()
    assert key.private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert b"BEGIN" not in repr(key).encode()
    cert = pki.issue_client_cert(
        ca, public_key=key.public_key, user="alice", serial=4242, email="alice@example.org", ac_der=b"\x30\x00"
    )
    assert cert.serial_number == 4242
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    assert cert.issuer == ca.name
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.RFC822Name) == ["alice@example.org"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:virtcloud:user:alice"]
    ext = cert.extensions.get_extension_for_oid(pki.AC_EXTENSION_OID)
    assert ext.critical is False
    assert pki.embedded_ac(cert) == b"\x30\x00"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3) <= lifetime <= dt.timedelta(days=3, minutes=11)


@pytest.mark.parametrize(
    ("user", "email", "uri", "mailbox"),
    [
        ("jörg", "jorg@example.org", "urn:virtcloud:user:j%C3%B6rg", ["jorg@example.org"]),
        ("eve", "eve@bücher.de", "urn:virtcloud:user:eve", ["eve@xn--bcher-kva.de"]),
        ("zoë", "zoë@example.org", "urn:virtcloud:user:zo%C3%AB", []),  # no ASCII form: left out
    ],
)
def test_client_cert_of_a_non_ascii_user(ca, user, email, uri, mailbox):
    """A URI and an rfc822Name are ASCII: the user name is percent-encoded, the domain IDNA-encoded; the
    subject's CN keeps the name as it is (UTF8String)."""
    key = pki.generate_client_key()
    cert = pki.issue_client_cert(ca, public_key=key.public_key, user=user, serial=4243, email=email)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert san.get_values_for_type(x509.RFC822Name) == mailbox
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == user


def test_client_cert_without_ac(ca):
    key = pki.generate_client_key("ed25519")
    cert = pki.issue_client_cert(ca, public_key=key.public_key, user="bob", serial=7)
    assert pki.embedded_ac(cert) is None


@pytest.mark.parametrize("serial", [0, -1, 1 << 159])
def test_serial_out_of_range_refused(ca, serial):
    key = pki.generate_client_key()
    with pytest.raises(pki.PKIError, match="out of range"):
        pki.issue_client_cert(ca, public_key=key.public_key, user="alice", serial=serial)


def test_validity_beyond_ca_refused(ca):
    key = pki.generate_client_key()
    with pytest.raises(pki.PKIError, match="after the CA"):
        pki.issue_client_cert(ca, public_key=key.public_key, user="alice", serial=5, lifetime=dt.timedelta(days=9000))
    with pytest.raises(pki.PKIError, match="not after"):
        pki.issue_client_cert(ca, public_key=key.public_key, user="alice", serial=5, not_before=NOW, not_after=NOW)


def test_bad_user_name_refused(ca):
    key = pki.generate_client_key()
    with pytest.raises(pki.PKIError, match="invalid user name"):
        pki.issue_client_cert(ca, public_key=key.public_key, user="a,b", serial=5)


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")


@needs_openssl
def test_a_fresh_crl_is_valid_on_a_gateway_whose_clock_is_behind(tmp_path, ca):
    """OpenVPN (OpenSSL) refuses every client while its CRL is not yet valid: a CRL signed just now, like a
    certificate, is back-dated by CLOCK_SKEW for a gateway whose clock is behind the portal's."""
    cert = pki.issue_client_cert(ca, public_key=pki.generate_client_key().public_key, user="alice", serial=20)
    crl = pki.build_crl(ca, [], crl_number=1)
    assert crl.last_update_utc <= pki._now() - pki.CLOCK_SKEW + dt.timedelta(seconds=1)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "crl.pem").write_bytes(pki.crl_to_pem(crl))
    (tmp_path / "alice.pem").write_bytes(pki.cert_to_pem(cert))
    behind = int((pki._now() - dt.timedelta(minutes=2)).timestamp())
    cmd = ["openssl", "verify", "-CAfile", "ca.pem", "-crl_check", "-CRLfile", "crl.pem", "-attime", str(behind)]
    checked = subprocess.run([*cmd, "alice.pem"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.django_db
def test_the_portals_crl_is_back_dated_too():
    from access import services

    crl = x509.load_pem_x509_crl(services.crl_current().encode())
    assert crl.last_update_utc <= pki._now() - pki.CLOCK_SKEW + dt.timedelta(seconds=1)


@needs_openssl
@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
def test_openssl_verifies_chain_purpose_and_crl(tmp_path, key_type):
    ca = pki.create_ca("VirtCloud VPN CA", key_type=key_type)
    good = pki.issue_client_cert(ca, public_key=pki.generate_client_key().public_key, user="alice", serial=10)
    bad = pki.issue_client_cert(ca, public_key=pki.generate_client_key().public_key, user="alice", serial=11)
    server = pki.issue_server_cert(
        ca, public_key=pki.generate_client_key().public_key, common_name="gw1.virtcloud.test", serial=12
    )
    crl = pki.build_crl(ca, [(11, NOW, "key_compromise"), pki.RevokedEntry(99, NOW)], crl_number=3)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    (tmp_path / "crl.pem").write_bytes(pki.crl_to_pem(crl))
    for name, cert in {"good": good, "bad": bad, "server": server}.items():
        (tmp_path / f"{name}.pem").write_bytes(pki.cert_to_pem(cert))

    def verify(name, purpose, crl_check=False):
        cmd = ["openssl", "verify", "-CAfile", "ca.pem", "-purpose", purpose]
        if crl_check:
            cmd += ["-crl_check", "-CRLfile", "crl.pem"]
        return subprocess.run([*cmd, f"{name}.pem"], cwd=tmp_path, capture_output=True, text=True)

    assert verify("good", "sslclient").returncode == 0
    assert verify("good", "sslserver").returncode != 0  # clientAuth only
    assert verify("server", "sslserver").returncode == 0
    assert verify("good", "sslclient", crl_check=True).returncode == 0
    revoked = verify("bad", "sslclient", crl_check=True)
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr

    # The gateway's AC cache is keyed by this fingerprint; OpenVPN computes it as openssl does.
    fp = subprocess.run(
        ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", "good.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert pki.cert_fingerprint(good) == fp.split("=", 1)[1].strip().replace(":", "").lower()

    loaded = pki.load_crl_pem(pki.crl_to_pem(crl))
    assert loaded.is_signature_valid(ca.key.public_key())
    entry = loaded.get_revoked_certificate_by_serial_number(11)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    assert loaded.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 3


def test_crl_rejects_unknown_reason(ca):
    with pytest.raises(pki.PKIError, match="unknown revocation reason"):
        pki.build_crl(ca, [(5, NOW, "bored")], crl_number=1)


def test_aa_cert_is_not_a_ca(ca):
    aa_key = pki.generate_private_key()
    cert = pki.issue_aa_cert(ca, public_key=aa_key.public_key(), serial=2)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_tls_crypt_key_format():
    text = pki.generate_tls_crypt_key()
    lines = text.strip().splitlines()
    assert lines[0] == "-----BEGIN OpenVPN Static key V1-----"
    assert lines[-1] == "-----END OpenVPN Static key V1-----"
    body = lines[1:-1]
    assert len(body) == 16 and all(len(line) == 32 for line in body)
    assert len(bytes.fromhex("".join(body))) == 256
    assert pki.generate_tls_crypt_key() != text
