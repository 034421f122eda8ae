"""X.509 for the access service: the VPN CA, client and gateway certificates, CRLs, tls-crypt keys.

Pure functions over ``cryptography`` objects; nothing here touches the database, the disk or Django.
The callers (``access.services``) own serial numbers (from the database), passphrases (from the
environment) and storage.

Design choices, and why:

- EC P-256 by default (fast to generate, ~1 ms; accepted by every OpenVPN 2.x/OpenSSL 1.1+ build),
  Ed25519 as an option (OpenVPN 2.6 with OpenSSL 3 handles it; TLS 1.3 only).
- The CA private key only ever leaves this module encrypted (PKCS#8, ``BestAvailableEncryption``).
- A client certificate may carry the user's RFC 5755 attribute certificate in a private, non-critical
  extension, VOMS-proxy style, so the gateway authorizes offline. The extension OID lives under the
  IANA enterprise number 32473, which RFC 5612 reserves for documentation and examples:
  ``1.3.6.1.4.1.32473.1`` ("VirtCloud AC"). A production operator should replace the arc with their own
  PEN; the constant :data:`AC_EXTENSION_OID` is the one place to change it. The extension value is the
  DER of one ``AttributeCertificate`` (not wrapped further).
- The client's private key is generated in memory and returned as PEM; this module never writes it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import textwrap
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["p256", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

#: Private extension carrying the DER of the holder's attribute certificate (RFC 5612 example arc).
AC_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.32473.1")

#: Certificates are back-dated this much so a gateway whose clock is slightly behind accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)

#: X.509 serials are at most 20 octets and positive (RFC 5280 §4.1.2.2).
MAX_SERIAL = (1 << 159) - 1

#: Reasons used by the portal, by the event that revokes (issue 6).
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key_compromise": x509.ReasonFlags.key_compromise,  # the user lost the laptop
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,  # left the cluster or its group
    "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,  # cluster torn down
    "superseded": x509.ReasonFlags.superseded,  # a newer profile replaced this one
    "privilege_withdrawn": x509.ReasonFlags.privilege_withdrawn,  # admin action
}


class PKIError(ValueError):
    """A permanent error in a PKI request (bad serial, impossible validity, wrong passphrase...)."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A signing certificate and its private key, in memory only."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def name(self) -> x509.Name:
        return self.cert.subject

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, passphrase: bytes) -> bytes:
        """The private key as encrypted PKCS#8 PEM (see :func:`private_key_to_encrypted_pem`)."""
        return private_key_to_encrypted_pem(self.key, passphrase)


@dataclass(frozen=True)
class ClientKey:
    """A freshly generated key pair for a download: the PEM goes into the profile and nowhere else."""

    private_pem: bytes
    public_key: PublicKey

    def __repr__(self) -> str:  # keep the private key out of logs and tracebacks
        return f"ClientKey(public_key={self.public_key!r}, private_pem=<redacted>)"


@dataclass(frozen=True)
class RevokedEntry:
    """One line of a CRL: the serial, when it was revoked, why (a key of :data:`REASONS`)."""

    serial: int
    revoked_at: dt.datetime
    reason: str = "unspecified"


# ---------------------------------------------------------------------------------------------- keys


def generate_private_key(key_type: KeyType = "p256") -> PrivateKey:
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise PKIError(f"unsupported key type {key_type!r} (use 'p256' or 'ed25519')")


def generate_client_key(key_type: KeyType = "p256") -> ClientKey:
    """A client key pair whose private half is returned as unencrypted PKCS#8 PEM, never stored here."""
    key = generate_private_key(key_type)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ClientKey(private_pem=pem, public_key=key.public_key())


def private_key_to_encrypted_pem(key: PrivateKey, passphrase: bytes) -> bytes:
    """Encrypted PKCS#8 PEM (cryptography's best available scheme: AES-256-CBC + scrypt/PBKDF2)."""
    if not passphrase:
        raise PKIError("refusing to serialize a CA key without a passphrase")
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def load_encrypted_private_key(pem: bytes, passphrase: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot decrypt the CA key (wrong passphrase or not an encrypted PEM key): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PKIError(f"unsupported CA key type {type(key).__name__}")
    return key


def load_ca(cert_pem: bytes, key_pem: bytes, passphrase: bytes) -> CertificateAuthority:
    """Load a CA saved with :meth:`CertificateAuthority.cert_pem` / :meth:`CertificateAuthority.key_pem`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = load_encrypted_private_key(key_pem, passphrase)
    if cert.public_key() != key.public_key():
        raise PKIError(f"the CA key does not match the certificate {cert.subject.rfc4514_string()}")
    return CertificateAuthority(cert=cert, key=key)


# ------------------------------------------------------------------------------------------ helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _sign_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    # Ed25519 signs the message itself; cryptography wants None there.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _check_serial(serial: int) -> None:
    if not 0 < serial <= MAX_SERIAL:
        raise PKIError(f"certificate serial {serial} is out of range (1..2**159-1)")


MAX_COMMON_NAME = 64  # X.509's upper bound (ub-common-name), which cryptography counts in bytes of UTF-8


def common_name_too_long(common_name: str) -> bool:
    """Whether ``common_name`` is longer than a certificate's name may be: ``MAX_COMMON_NAME`` bytes of UTF-8
    (a name of accented letters reaches it with fewer characters)."""
    return len(common_name.encode("utf-8", "surrogatepass")) > MAX_COMMON_NAME


def _name(common_name: str, organization: str | None) -> x509.Name:
    try:
        attrs = []
        if organization:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    except ValueError as exc:  # (cryptography's own checks: an empty or too long name)
        raise PKIError(f"cannot name a certificate {common_name[:20]!r}: {exc}") from None
    return x509.Name(attrs)


def _validity(
    ca: CertificateAuthority | None,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
    lifetime: dt.timedelta,
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before or (_now() - CLOCK_SKEW)
    end = not_after or (start + CLOCK_SKEW + lifetime)
    if start.tzinfo is None or end.tzinfo is None:
        raise PKIError("validity bounds must be timezone-aware datetimes")
    if end <= start:
        raise PKIError(f"not_after {end.isoformat()} is not after not_before {start.isoformat()}")
    if ca is not None and end > ca.cert.not_valid_after_utc:
        raise PKIError(
            f"requested validity ends {end.isoformat()}, after the CA {ca.name.rfc4514_string()} "
            f"expires ({ca.cert.not_valid_after_utc.isoformat()})"
        )
    return start, end


def _base_builder(
    ca: CertificateAuthority,
    subject: x509.Name,
    public_key: PublicKey,
    serial: int,
    start: dt.datetime,
    end: dt.datetime,
) -> x509.CertificateBuilder:
    _check_serial(serial)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )


def _key_usage(digital_signature: bool = True) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


# ------------------------------------------------------------------------------------- certificates


def create_ca(
    common_name: str,
    *,
    organization: str | None = "VirtCloud",
    key_type: KeyType = "p256",
    lifetime: dt.timedelta = dt.timedelta(days=3650),
    now: dt.datetime | None = None,
) -> CertificateAuthority:
    """A self-signed CA (path length 0: it signs end-entity certificates and CRLs only)."""
    key = generate_private_key(key_type)
    start = (now or _now()) - CLOCK_SKEW
    name = _name(common_name, organization)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _sign_hash(key))
    )
    return CertificateAuthority(cert=cert, key=key)


def issue_client_cert(
    ca: CertificateAuthority,
    *,
    public_key: PublicKey,
    user: str,
    serial: int,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    lifetime: dt.timedelta = dt.timedelta(days=3),
    email: str | None = None,
    ac_der: bytes | None = None,
    organization: str | None = "VirtCloud",
) -> x509.Certificate:
    """A TLS client certificate for ``user`` (subject CN), EKU clientAuth, optionally carrying an AC.

    ``serial`` comes from the caller's database. The validity defaults to now-5min .. now+``lifetime``;
    explicit bounds win. The AC (``ac_der``, from :func:`access.attrcerts.issue_ac`) must have been
    issued for this issuer and serial beforehand: both are known before signing, which is what lets the
    AC sit inside the certificate it is bound to.
    """
    if not user or "/" in user or "," in user:
        raise PKIError(f"invalid user name for a certificate subject: {user!r}")
    start, end = _validity(ca, not_before, not_after, lifetime)
    # A URI and an rfc822Name are ASCII (RFC 5280 §4.2.1.6): a user name is percent-encoded, an e-mail
    # domain IDNA-encoded, and an address whose local part is not ASCII is left out (the CN carries UTF-8).
    san: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"urn:virtcloud:user:{urllib.parse.quote(user, safe='@.+-_')}")
    ]
    mailbox = _ascii_email(email) if email else None
    if mailbox:
        san.append(x509.RFC822Name(mailbox))
    builder = (
        _base_builder(ca, _name(user, organization), public_key, serial, start, end)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
    )
    if ac_der is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(AC_EXTENSION_OID, ac_der), critical=False)
    return builder.sign(ca.key, _sign_hash(ca.key))


# A plain RFC 5322 addr-spec: a dot-atom local part, a domain of LDH labels (after IDNA). What a directory's
# ``mail`` may hold beyond that — a display name (``Alice <alice@x.org>``), a comment (``al(ice)@x.org``), a
# quoted local part, spaces — cryptography's RFC822Name refuses with a ValueError, which failed the download.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LOCAL_PART_RE = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*")


def _ascii_email(email: str) -> str | None:
    """``email`` as an rfc822Name can hold it (ASCII, the domain in IDNA), or None when it cannot: anything but
    a plain ``local@domain`` (a display name, a comment, a quoted or non-ASCII local part) is left out of the
    certificate — the e-mail is a courtesy there, the CN and the URI name the user."""
    local, _, domain = email.rpartition("@")
    if not local or not domain or not local.isascii() or not _LOCAL_PART_RE.fullmatch(local):
        return None
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    if len(local) > 64 or not _DOMAIN_RE.fullmatch(ascii_domain) or len(ascii_domain) > 253:
        return None
    mailbox = f"{local}@{ascii_domain}"
    try:
        x509.RFC822Name(mailbox)  # what issue_client_cert builds: never a 500 on a value it refuses
    except ValueError:
        return None
    return mailbox


def issue_server_cert(
    ca: CertificateAuthority,
    *,
    public_key: PublicKey,
    common_name: str,
    serial: int,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    lifetime: dt.timedelta = dt.timedelta(days=365),
    organization: str | None = "VirtCloud",
) -> x509.Certificate:
    """A TLS server certificate (EKU serverAuth) for a gateway; clients pin ``common_name``."""
    start, end = _validity(ca, None, None, lifetime)
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in (dns_names or [common_name])]
    san += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    return (
        _base_builder(ca, _name(common_name, organization), public_key, serial, start, end)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(ca.key, _sign_hash(ca.key))
    )


def issue_aa_cert(
    ca: CertificateAuthority,
    *,
    public_key: PublicKey,
    common_name: str = "VirtCloud Attribute Authority",
    serial: int,
    lifetime: dt.timedelta = dt.timedelta(days=1825),
    organization: str | None = "VirtCloud",
) -> x509.Certificate:
    """The Attribute Authority's certificate: an end entity (RFC 5755 §4.5: an AC issuer is not a CA).

    Gateways pin this certificate; its subject is the AC issuer name.
    """
    start, end = _validity(ca, None, None, lifetime)
    return (
        _base_builder(ca, _name(common_name, organization), public_key, serial, start, end)
        .add_extension(_key_usage(), critical=True)
        .sign(ca.key, _sign_hash(ca.key))
    )


def embedded_ac(cert: x509.Certificate) -> bytes | None:
    """The DER of the attribute certificate carried in ``cert`` (see :data:`AC_EXTENSION_OID`), or None."""
    try:
        ext = cert.extensions.get_extension_for_oid(AC_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - cryptography knows no such OID
        raise PKIError(f"unexpected parsed value for extension {AC_EXTENSION_OID.dotted_string}")
    return value.value


# --------------------------------------------------------------------------------------------- CRL


def build_crl(
    ca: CertificateAuthority,
    revoked: Iterable[RevokedEntry | tuple[int, dt.datetime, str]],
    *,
    crl_number: int,
    next_update: dt.datetime | None = None,
    validity: dt.timedelta = dt.timedelta(days=7),
    this_update: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A CRL of ``revoked`` (entries or ``(serial, revoked_at, reason)`` tuples), signed by ``ca``.

    ``crl_number`` must grow with every CRL the CA publishes (RFC 5280 §5.2.3); OpenVPN refuses every
    client once ``next_update`` has passed, so the portal must republish well before it. ``this_update``
    (default: now) is back-dated by ``CLOCK_SKEW``, as certificates are: OpenVPN refuses every client while its
    CRL is "not yet valid" on a gateway whose clock is behind the portal's.
    """
    start = (this_update or _now()) - CLOCK_SKEW
    end = next_update or (start + validity)
    if end <= start:
        raise PKIError("CRL next_update must be after this_update")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.name)
        .last_update(start)
        .next_update(end)
        .add_extension(x509.CRLNumber(crl_number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    seen: set[int] = set()
    for item in revoked:
        entry = item if isinstance(item, RevokedEntry) else RevokedEntry(*item)
        _check_serial(entry.serial)
        if entry.serial in seen:
            continue
        seen.add(entry.serial)
        try:
            reason = REASONS[entry.reason]
        except KeyError:
            raise PKIError(f"unknown revocation reason {entry.reason!r} for serial {entry.serial}") from None
        rb = x509.RevokedCertificateBuilder().serial_number(entry.serial).revocation_date(entry.revoked_at)
        if reason is not x509.ReasonFlags.unspecified:  # RFC 5280: omit the reason code rather than say unspecified
            rb = rb.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(rb.build())
    return builder.sign(ca.key, _sign_hash(ca.key))


# ----------------------------------------------------------------------------------- serialization


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_to_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def load_cert_pem(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def load_crl_pem(pem: bytes) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(pem)


def cert_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex without colons (OpenVPN's ``tls_digest_sha256_0``)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def pem_fingerprint(pem: str) -> str:
    """``cert_fingerprint`` of a PEM certificate; ValueError when it is not one."""
    return cert_fingerprint(load_cert_pem(pem.encode()))


def public_key_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_tls_crypt_key() -> str:
    """A ``tls-crypt`` key: 256 random bytes in OpenVPN's ``Static key V1`` text format (as ``--genkey``)."""
    hexed = os.urandom(256).hex()
    body = "\n".join(textwrap.wrap(hexed, 32))
    return f"-----BEGIN OpenVPN Static key V1-----\n{body}\n-----END OpenVPN Static key V1-----\n"
