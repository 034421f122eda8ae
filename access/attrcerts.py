"""The portal as an RFC 5755 Attribute Authority: issue and verify attribute certificates (ACs).

An AC says which cluster networks its holder may enter, as FQAN-like strings
``/virtcloud/<cluster>/Role=<role>``. It is bound to the holder's X.509 client certificate by that
certificate's issuer and serial (``Holder.baseCertificateID``) and travels inside it (see
:data:`access.pki.AC_EXTENSION_OID`), so a gateway can authorize a TLS peer offline with only the pinned
AA certificate.

Encoding (what a third-party decoder sees):

- ``AttributeCertificate`` v2 (RFC 5755 §4.1), built with ``asn1crypto.cms.AttributeCertificateV2`` and
  signed with ``cryptography`` (ECDSA P-256 with SHA-256 by default; Ed25519 accepted).
- ``issuer``: ``v2Form`` with ``issuerName`` = the AA certificate's subject as one directoryName.
- ``holder``: ``baseCertificateID`` = (issuer of the client certificate, its serial).
- One attribute of type **``id-aca-group`` (1.3.6.1.5.5.7.10.4)**, the RFC 5755 §4.4.4 Group attribute, whose
  syntax ``IetfAttrSyntax`` is exactly what VOMS uses for its FQANs: ``policyAuthority`` = the AA name,
  ``values`` = one ``UTF8String`` per FQAN. We use the standard OID rather than VOMS' private one
  (1.3.6.1.4.1.8005.100.100.4) so that any RFC 5755 decoder understands it.
- Extensions: ``authorityKeyIdentifier`` and ``noRevAvail`` (RFC 5755 §4.3.6: ACs are short-lived and
  revoked through the CRL of the certificate that carries them), both non-critical.

The verifier (:func:`verify_ac`) checks what no library checks for us; every failure raises
:class:`ACInvalid` with a reason fit for a gateway log line.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from asn1crypto import cms
from asn1crypto import core as asn1core
from asn1crypto import x509 as asn1x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

GROUP_ATTRIBUTE_OID = "1.3.6.1.5.5.7.10.4"  # id-aca-group
NO_REV_AVAIL_OID = "2.5.29.56"
AUTHORITY_KEY_ID_OID = "2.5.29.35"

#: Extensions we understand. None is processed as critical, so any *critical* extension is refused.
_KNOWN_EXTENSIONS = {NO_REV_AVAIL_OID, AUTHORITY_KEY_ID_OID}

#: Signature algorithms accepted, by asn1crypto name.
_ALGORITHMS = {"sha256_ecdsa", "ed25519"}

FQAN_RE = re.compile(
    r"^/virtcloud/(?P<cluster>[A-Za-z0-9][A-Za-z0-9._-]{0,62})/Role=(?P<role>[A-Za-z][A-Za-z0-9_-]{0,31})$"
)

#: Tolerated clock difference between the portal and a gateway when checking validity windows.
CLOCK_SKEW = dt.timedelta(minutes=5)


class ACError(ValueError):
    """The portal was asked to issue an AC it must not issue (bad FQAN, validity beyond the holder's...)."""


class ACInvalid(Exception):
    """An attribute certificate failed verification; ``reason`` says which check."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Holder:
    """What binds an AC to a client certificate: its issuer, serial and validity."""

    issuer: x509.Name
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def from_cert(cls, cert: x509.Certificate) -> Holder:
        return cls(cert.issuer, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc)


@dataclass(frozen=True)
class VerifiedAC:
    """What a verified AC grants: FQANs, and the window and serial for the gateway's cache."""

    fqans: list[str]
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def clusters(self) -> dict[str, str]:
        """cluster -> role."""
        return clusters_of(self.fqans)


def fqan(cluster: str, role: str = "member") -> str:
    """``/virtcloud/<cluster>/Role=<role>``, validated."""
    value = f"/virtcloud/{cluster}/Role={role}"
    if not FQAN_RE.match(value):
        raise ACError(f"cluster {cluster!r} / role {role!r} do not make a valid FQAN")
    return value


def clusters_of(fqans: Sequence[str]) -> dict[str, str]:
    """Map cluster -> role for the well-formed FQANs in ``fqans`` (others are ignored)."""
    out: dict[str, str] = {}
    for value in fqans:
        m = FQAN_RE.match(value)
        if m:
            out.setdefault(m["cluster"], m["role"])
    return out


# ----------------------------------------------------------------------------------------- helpers


def _directory_names(name: x509.Name) -> asn1x509.GeneralNames:
    return asn1x509.GeneralNames([asn1x509.GeneralName("directory_name", asn1x509.Name.load(name.public_bytes()))])


def _algorithm_for(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ACError(f"AA key curve {key.curve.name} is not supported (use P-256)")
        return "sha256_ecdsa"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ACError(f"unsupported AA key type {type(key).__name__}")


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data)


def _gtime(value: dt.datetime) -> dt.datetime:
    # GeneralizedTime in DER has no fractional seconds here; keep it comparable with what we parse back.
    return value.astimezone(dt.UTC).replace(microsecond=0)


def _info(
    aa_cert: x509.Certificate,
    holder_issuer: x509.Name,
    algorithm: str,
    extra_extensions: Sequence[tuple[str, bool, bytes]] = (),
) -> cms.AttributeCertificateInfoV2:
    """An AC body with every field an AC of this AA for holders of this CA shares; the holder's serial, the
    AC serial, validity and FQANs are placeholders that :func:`issue_ac` sets."""
    aa_name = _directory_names(aa_cert.subject)
    try:
        ski = aa_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        ski = x509.SubjectKeyIdentifier.from_public_key(aa_cert.public_key()).digest
    extensions = [
        {"extn_id": AUTHORITY_KEY_ID_OID, "critical": False, "extn_value": {"key_identifier": ski}},
        {
            "extn_id": NO_REV_AVAIL_OID,
            "critical": False,
            "extn_value": asn1core.ParsableOctetString(asn1core.Null().dump()),
        },
    ]
    for oid, critical, der in extra_extensions:
        extensions.append({"extn_id": oid, "critical": critical, "extn_value": asn1core.ParsableOctetString(der)})
    epoch = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    return cms.AttributeCertificateInfoV2(
        {
            "version": "v2",
            "holder": {"base_certificate_id": {"issuer": _directory_names(holder_issuer), "serial": 1}},
            "issuer": cms.AttCertIssuer(name="v2_form", value={"issuer_name": aa_name}),
            "signature": cms.SignedDigestAlgorithm({"algorithm": algorithm}),
            "serial_number": 1,
            "att_cert_validity_period": {"not_before_time": epoch, "not_after_time": epoch},
            "attributes": [
                {
                    "type": "group",
                    "values": [
                        {
                            "policy_authority": aa_name,
                            "values": [cms.IetfAttrValue(name="string", value="/virtcloud/x/Role=member")],
                        }
                    ],
                }
            ],
            "extensions": extensions,
        }
    )


# ------------------------------------------------------------------------------------------- issue


def issue_ac(
    *,
    aa_key: PrivateKey,
    aa_cert: x509.Certificate,
    holder: Holder,
    serial: int,
    fqans: Sequence[str],
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    extra_extensions: Sequence[tuple[str, bool, bytes]] = (),
) -> bytes:
    """Issue an AC (DER) for ``holder`` granting ``fqans``.

    The validity defaults to the holder certificate's and may not exceed it. ``serial`` is the AA's own
    serial (from the caller's database); it must be unique per AA. ``extra_extensions`` is
    ``(dotted_oid, critical, der_value)``, for interoperability tests only.
    """
    if not fqans:
        raise ACError("an AC without attributes grants nothing; refusing to issue it")
    for value in fqans:
        if not FQAN_RE.match(value):
            raise ACError(f"invalid FQAN {value!r} (want /virtcloud/<cluster>/Role=<role>)")
    if not 0 < serial < (1 << 159):
        raise ACError(f"AC serial {serial} is out of range")
    start = _gtime(not_before or holder.not_before)
    end = _gtime(not_after or holder.not_after)
    if start < _gtime(holder.not_before) or end > _gtime(holder.not_after):
        raise ACError(
            f"AC validity {start.isoformat()}..{end.isoformat()} exceeds the holder certificate's "
            f"{holder.not_before.isoformat()}..{holder.not_after.isoformat()} (serial {holder.serial})"
        )
    if end <= start:
        raise ACError("AC not_after must be after not_before")

    algorithm_name = _algorithm_for(aa_key)
    if extra_extensions:  # interoperability tests only: the general build
        info = _info(aa_cert, holder.issuer, algorithm_name, extra_extensions)
        info["holder"]["base_certificate_id"]["serial"] = holder.serial
        info["serial_number"] = serial
        info["att_cert_validity_period"] = {"not_before_time": start, "not_after_time": end}
        info["attributes"][0]["values"][0]["values"] = [cms.IetfAttrValue(name="string", value=v) for v in fqans]
        tbs = info.dump()
    else:
        tbs = _Template.of(aa_cert, holder.issuer, algorithm_name).tbs(holder.serial, serial, start, end, fqans)
    signature = asn1core.OctetBitString(_sign(aa_key, tbs)).dump()
    return _der(0x30, tbs + _template_algorithm(algorithm_name) + signature)


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV with a one-byte tag."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + content


@functools.lru_cache(maxsize=4)
def _template_algorithm(algorithm: str) -> bytes:
    return cms.SignedDigestAlgorithm({"algorithm": algorithm}).dump()


@dataclass(frozen=True)
class _Template:
    """The DER of every part of an AC body that is the same for all ACs of one AA, holder CA and algorithm
    (names, algorithm, extensions), cut from one AC built with asn1crypto (:func:`_info`). Building those
    with asn1crypto is most of the cost of an AC, and a profile is issued per request; the variable parts
    (serials, validity, FQANs) are encoded here around them. ``test_attrcerts_fast`` checks that the result
    is byte-identical to the general build."""

    version: bytes  # AttCertVersion v2
    holder_issuer: bytes  # GeneralNames of the holder certificate's issuer
    issuer: bytes  # AttCertIssuer (v2Form, the AA's name)
    signature: bytes  # AlgorithmIdentifier
    group_type: bytes  # the attribute type OID (id-aca-group)
    policy_authority: bytes  # [0] IMPLICIT GeneralNames: the AA's name
    extensions: bytes

    @classmethod
    @functools.lru_cache(maxsize=16)
    def of(cls, aa_cert: x509.Certificate, holder_issuer: x509.Name, algorithm: str) -> _Template:
        # Keyed by the AA certificate itself: a new AA misses the cache.
        info = _info(aa_cert, holder_issuer, algorithm)
        group = info["attributes"][0]
        return cls(
            version=info["version"].dump(),
            holder_issuer=info["holder"]["base_certificate_id"]["issuer"].dump(),
            issuer=info["issuer"].dump(),
            signature=info["signature"].dump(),
            group_type=group["type"].dump(),
            policy_authority=group["values"][0]["policy_authority"].dump(),
            extensions=info["extensions"].dump(),
        )

    def tbs(self, holder_serial: int, serial: int, start: dt.datetime, end: dt.datetime, fqans: Sequence[str]) -> bytes:
        # Holder ::= SEQUENCE { baseCertificateID [0] IMPLICIT IssuerSerial }   (RFC 5755 §4.1)
        holder = _der(0x30, _der(0xA0, self.holder_issuer + asn1core.Integer(holder_serial).dump()))
        validity = _der(0x30, asn1core.GeneralizedTime(start).dump() + asn1core.GeneralizedTime(end).dump())
        # Attribute { id-aca-group, SET { IetfAttrSyntax { policyAuthority, SEQUENCE OF UTF8String } } }
        values = _der(0x30, b"".join(asn1core.UTF8String(v).dump() for v in fqans))
        attribute = _der(0x30, self.group_type + _der(0x31, _der(0x30, self.policy_authority + values)))
        return _der(
            0x30,
            self.version
            + holder
            + self.issuer
            + self.signature
            + asn1core.Integer(serial).dump()
            + validity
            + _der(0x30, attribute)
            + self.extensions,
        )


# ------------------------------------------------------------------------------------------ verify


def _single_directory_name(names: asn1x509.GeneralNames, what: str) -> bytes:
    if len(names) != 1 or names[0].name != "directory_name":
        raise ACInvalid(f"{what} must be exactly one directoryName")
    return names[0].chosen.untag().dump(force=True)


def _name_der(name: x509.Name) -> bytes:
    # Compare names in one canonical DER encoding produced by the same library on both sides.
    return asn1x509.Name.load(name.public_bytes()).dump(force=True)


def _verify_signature(aa_cert: x509.Certificate, algorithm: str, signature: bytes, data: bytes) -> None:
    public_key = aa_cert.public_key()
    try:
        if algorithm == "sha256_ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif algorithm == "ed25519" and isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            raise ACInvalid(f"signature algorithm {algorithm} does not fit the AA key {type(public_key).__name__}")
    except InvalidSignature:
        raise ACInvalid("bad signature: the AC was not signed by the pinned AA key, or was altered") from None


def _check_aa_cert(aa_cert: x509.Certificate, now: dt.datetime) -> None:
    if not aa_cert.not_valid_before_utc - CLOCK_SKEW <= now <= aa_cert.not_valid_after_utc + CLOCK_SKEW:
        raise ACInvalid("the pinned AA certificate is not valid now")
    try:
        if aa_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ACInvalid("the pinned AA certificate is a CA certificate (RFC 5755 §4.5 forbids it)")
    except x509.ExtensionNotFound:
        pass


def verify_ac_full(
    ac_der: bytes, *, aa_cert: x509.Certificate, holder_cert: x509.Certificate, now: dt.datetime | None = None
) -> VerifiedAC:
    """Verify an AC presented together with ``holder_cert``; see :func:`verify_ac`. Returns details."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        ac = cms.AttributeCertificateV2.load(ac_der, strict=True)
        info = ac["ac_info"]
        # Force a full parse now so malformed inner fields fail here, and insist on DER (one encoding only).
        if ac.dump(force=True) != ac_der:
            raise ACInvalid("not DER-encoded (re-encoding differs)")
        version = info["version"].native
        outer_alg = ac["signature_algorithm"]
        inner_alg = info["signature"]
        signature = ac["signature"].native
        tbs = info.dump()
    except ACInvalid:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ACInvalid(f"malformed attribute certificate: {exc}") from None

    if version != "v2":
        raise ACInvalid(f"unsupported AC version {version!r} (want v2)")
    if outer_alg.dump(force=True) != inner_alg.dump(force=True):
        raise ACInvalid(
            f"signature algorithm mismatch: outer {outer_alg['algorithm'].dotted} "
            f"vs body {inner_alg['algorithm'].dotted}"
        )
    algorithm = outer_alg["algorithm"].native
    if algorithm not in _ALGORITHMS:
        raise ACInvalid(f"signature algorithm {outer_alg['algorithm'].dotted} is not accepted")
    if outer_alg["parameters"].native is not None:
        raise ACInvalid("signature algorithm parameters must be absent")

    # Issuer: v2Form with only issuerName, equal to the pinned AA certificate's subject.
    issuer = info["issuer"]
    if issuer.name != "v2_form":
        raise ACInvalid("issuer must use v2Form (RFC 5755 §4.2.3)")
    v2 = issuer.chosen
    if v2["base_certificate_id"].native is not None or v2["object_digest_info"].native is not None:
        raise ACInvalid("issuer v2Form must contain only issuerName")
    if _single_directory_name(v2["issuer_name"], "issuer name") != _name_der(aa_cert.subject):
        raise ACInvalid("issuer name does not match the pinned AA certificate")

    _check_aa_cert(aa_cert, now)
    _verify_signature(aa_cert, algorithm, signature, tbs)

    # Holder: baseCertificateID only, equal to the presented certificate's issuer and serial.
    holder = info["holder"]
    if holder["entity_name"].native is not None or holder["object_digest_info"].native is not None:
        raise ACInvalid("holder must be identified by baseCertificateID only")
    base = holder["base_certificate_id"]
    if base.native is None:
        raise ACInvalid("holder has no baseCertificateID")
    if base["issuer_uid"].native is not None:
        raise ACInvalid("holder issuerUID is not supported")
    if _single_directory_name(base["issuer"], "holder issuer") != _name_der(holder_cert.issuer):
        raise ACInvalid("wrong holder: AC is bound to a certificate from another issuer")
    if base["serial"].native != holder_cert.serial_number:
        raise ACInvalid(
            f"wrong holder: AC is bound to serial {base['serial'].native}, presented certificate has "
            f"{holder_cert.serial_number}"
        )

    # Validity, and never beyond the holder certificate's.
    period = info["att_cert_validity_period"]
    not_before = period["not_before_time"].native
    not_after = period["not_after_time"].native
    if now < not_before - CLOCK_SKEW:
        raise ACInvalid(f"AC not yet valid (valid from {not_before.isoformat()})")
    if now > not_after + CLOCK_SKEW:
        raise ACInvalid(f"AC expired at {not_after.isoformat()}")
    if not_after > holder_cert.not_valid_after_utc or not_before < holder_cert.not_valid_before_utc:
        raise ACInvalid("AC validity exceeds the holder certificate's")

    if info["issuer_unique_id"].native is not None:
        raise ACInvalid("issuerUniqueID is not supported")

    for ext in info["extensions"] if info["extensions"].native is not None else []:
        oid = ext["extn_id"].dotted
        if ext["critical"].native and oid not in _KNOWN_EXTENSIONS:
            raise ACInvalid(f"unknown critical extension {oid}")

    fqans: list[str] = []
    seen_types: set[str] = set()
    for attribute in info["attributes"]:
        oid = attribute["type"].dotted
        if oid in seen_types:
            raise ACInvalid(f"attribute {oid} appears twice")
        seen_types.add(oid)
        if oid != GROUP_ATTRIBUTE_OID:
            continue  # an attribute we do not use grants nothing; it is not an error
        try:
            for syntax in attribute["values"]:
                authority = syntax["policy_authority"]
                if authority.native is not None and (
                    _single_directory_name(authority, "policy authority") != _name_der(aa_cert.subject)
                ):
                    raise ACInvalid("group attribute policyAuthority is not the AA")
                for value in syntax["values"]:
                    if value.name != "string":
                        raise ACInvalid("group attribute values must be UTF8String")
                    text = value.native
                    if not FQAN_RE.match(text):
                        raise ACInvalid(f"malformed FQAN {text!r}")
                    fqans.append(text)
        except ACInvalid:
            raise
        except (ValueError, TypeError) as exc:
            raise ACInvalid(f"malformed group attribute: {exc}") from None
    if not fqans:
        raise ACInvalid("AC carries no VirtCloud FQAN")
    return VerifiedAC(fqans=fqans, serial=info["serial_number"].native, not_before=not_before, not_after=not_after)


def verify_ac(
    ac_der: bytes, *, aa_cert: x509.Certificate, holder_cert: x509.Certificate, now: dt.datetime | None = None
) -> list[str]:
    """Verify ``ac_der`` against the pinned ``aa_cert`` for the presented ``holder_cert``; return its FQANs.

    Checks: DER well-formed; version v2; signature algorithm in the body equals the outer one and is
    ECDSA-SHA256 or Ed25519; issuer is v2Form naming the AA certificate's subject; the AA certificate is
    valid now and not a CA; the signature verifies with the AA key; holder is the baseCertificateID
    (issuer + serial) of ``holder_cert``; ``now`` is inside the validity window (±5 min skew), and the
    window is inside the holder certificate's; no unknown critical extension; FQANs are well formed.
    Raises :class:`ACInvalid`. Revocation is *not* checked here: ACs carry ``noRevAvail`` and are
    revoked with their holder certificate (OpenVPN's ``crl-verify``).
    """
    return verify_ac_full(ac_der, aa_cert=aa_cert, holder_cert=holder_cert, now=now).fqans
