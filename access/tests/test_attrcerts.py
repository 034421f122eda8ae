"""Attribute certificates: the verifier's test vectors, and an independent decode with pyasn1-modules."""

import datetime as dt

import pytest
from asn1crypto import cms
from pyasn1.codec.der.decoder import decode as der_decode
from pyasn1_modules import rfc5280, rfc5755

from access import attrcerts, pki
from access.attrcerts import ACInvalid
from access.tests.fixtures import certificates_start_at_module_now  # noqa: F401 (autouse)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)

FQANS = [attrcerts.fqan("c42"), attrcerts.fqan("c43", "owner")]


@pytest.fixture(scope="module")
def pkiset():
    ca = pki.create_ca("VirtCloud VPN CA")
    aa_key = pki.generate_private_key()
    aa_cert = pki.issue_aa_cert(ca, public_key=aa_key.public_key(), serial=2)
    return ca, aa_key, aa_cert


def _client(ca, serial, *, lifetime=dt.timedelta(days=3), not_before=None):
    key = pki.generate_client_key()
    return pki.issue_client_cert(
        ca, public_key=key.public_key, user="alice", serial=serial, lifetime=lifetime, not_before=not_before
    )


def _issue(pkiset, holder_cert, **kw):
    _, aa_key, aa_cert = pkiset
    kw.setdefault("fqans", FQANS)
    kw.setdefault("serial", 17)
    return attrcerts.issue_ac(aa_key=aa_key, aa_cert=aa_cert, holder=attrcerts.Holder.from_cert(holder_cert), **kw)


def _verify(pkiset, ac, holder_cert, now=None):
    return attrcerts.verify_ac(ac, aa_cert=pkiset[2], holder_cert=holder_cert, now=now or NOW)


def test_valid(pkiset):
    holder = _client(pkiset[0], 100)
    ac = _issue(pkiset, holder)
    assert _verify(pkiset, ac, holder) == FQANS
    full = attrcerts.verify_ac_full(ac, aa_cert=pkiset[2], holder_cert=holder, now=NOW)
    assert full.serial == 17
    assert full.clusters == {"c42": "member", "c43": "owner"}
    assert full.not_after == holder.not_valid_after_utc


def test_valid_when_embedded_in_the_holder_cert(pkiset):
    """The AC is issued first for (issuer, serial, validity) and then carried by the cert it binds to."""
    ca = pkiset[0]
    key = pki.generate_client_key()
    start = NOW - pki.CLOCK_SKEW
    end = NOW + dt.timedelta(days=2)
    holder = attrcerts.Holder(issuer=ca.name, serial=101, not_before=start, not_after=end)
    ac = attrcerts.issue_ac(aa_key=pkiset[1], aa_cert=pkiset[2], holder=holder, serial=18, fqans=FQANS[:1])
    cert = pki.issue_client_cert(
        ca, public_key=key.public_key, user="alice", serial=101, not_before=start, not_after=end, ac_der=ac
    )
    assert _verify(pkiset, pki.embedded_ac(cert), cert) == FQANS[:1]


def test_tampered_attribute_byte(pkiset):
    holder = _client(pkiset[0], 102)
    ac = bytearray(_issue(pkiset, holder))
    at = bytes(ac).index(b"/virtcloud/c42")
    ac[at + len("/virtcloud/c")] = ord("9")  # c42 -> c92: still well-formed, no longer signed
    with pytest.raises(ACInvalid, match="bad signature"):
        _verify(pkiset, bytes(ac), holder)


def test_forged_by_another_key(pkiset):
    ca, _, aa_cert = pkiset
    holder = _client(ca, 103)
    rogue_key = pki.generate_private_key()
    # Same issuer name as the real AA: only the key differs.
    forged = attrcerts.issue_ac(
        aa_key=rogue_key, aa_cert=aa_cert, holder=attrcerts.Holder.from_cert(holder), serial=1, fqans=FQANS
    )
    with pytest.raises(ACInvalid, match="bad signature"):
        _verify(pkiset, forged, holder)


def test_other_aa_name_rejected(pkiset):
    ca = pkiset[0]
    holder = _client(ca, 104)
    other_key = pki.generate_private_key()
    other = pki.issue_aa_cert(ca, public_key=other_key.public_key(), common_name="Other AA", serial=3)
    ac = attrcerts.issue_ac(
        aa_key=other_key, aa_cert=other, holder=attrcerts.Holder.from_cert(holder), serial=1, fqans=FQANS
    )
    with pytest.raises(ACInvalid, match="issuer name does not match"):
        _verify(pkiset, ac, holder)


def test_expired(pkiset):
    holder = _client(pkiset[0], 105)
    ac = _issue(pkiset, holder, not_after=NOW + dt.timedelta(hours=1))
    assert _verify(pkiset, ac, holder, now=NOW + dt.timedelta(minutes=59)) == FQANS
    with pytest.raises(ACInvalid, match="expired"):
        _verify(pkiset, ac, holder, now=NOW + dt.timedelta(hours=2))


def test_not_yet_valid(pkiset):
    holder = _client(pkiset[0], 106)
    ac = _issue(pkiset, holder, not_before=NOW + dt.timedelta(hours=1))
    with pytest.raises(ACInvalid, match="not yet valid"):
        _verify(pkiset, ac, holder)


def test_wrong_holder_serial(pkiset):
    holder = _client(pkiset[0], 107)
    other = _client(pkiset[0], 108)
    ac = _issue(pkiset, holder)
    with pytest.raises(ACInvalid, match="wrong holder: AC is bound to serial 107"):
        _verify(pkiset, ac, other)


def test_wrong_holder_issuer(pkiset):
    holder = _client(pkiset[0], 109)
    other_ca = pki.create_ca("Another CA")
    same_serial_elsewhere = _client(other_ca, 109)
    ac = _issue(pkiset, holder)
    with pytest.raises(ACInvalid, match="wrong holder: AC is bound to a certificate from another issuer"):
        _verify(pkiset, ac, same_serial_elsewhere)


def test_unknown_critical_extension(pkiset):
    holder = _client(pkiset[0], 110)
    ac = _issue(pkiset, holder, extra_extensions=[("1.3.6.1.4.1.32473.99", True, b"\x05\x00")])
    with pytest.raises(ACInvalid, match=r"unknown critical extension 1\.3\.6\.1\.4\.1\.32473\.99"):
        _verify(pkiset, ac, holder)
    # The same extension, non-critical, is ignored as RFC 5280 says.
    ok = _issue(pkiset, holder, extra_extensions=[("1.3.6.1.4.1.32473.99", False, b"\x05\x00")])
    assert _verify(pkiset, ok, holder) == FQANS


def test_algorithm_mismatch(pkiset):
    holder = _client(pkiset[0], 111)
    ac = cms.AttributeCertificateV2.load(_issue(pkiset, holder))
    # The signature stays valid over the body; only the outer algorithm identifier changes.
    ac["signature_algorithm"] = cms.SignedDigestAlgorithm({"algorithm": "sha384_ecdsa"})
    with pytest.raises(ACInvalid, match="signature algorithm mismatch"):
        _verify(pkiset, ac.dump(force=True), holder)


def test_wrong_version(pkiset):
    holder = _client(pkiset[0], 112)
    ac = cms.AttributeCertificateV2.load(_issue(pkiset, holder))
    ac["ac_info"]["version"] = "v1"
    with pytest.raises(ACInvalid, match="version"):
        _verify(pkiset, ac.dump(force=True), holder)


def test_garbage_and_trailing_bytes(pkiset):
    holder = _client(pkiset[0], 113)
    with pytest.raises(ACInvalid, match="malformed"):
        _verify(pkiset, b"\x30\x03\x02\x01\x01", holder)
    with pytest.raises(ACInvalid):
        _verify(pkiset, _issue(pkiset, holder) + b"\x00", holder)


def test_ed25519_aa(pkiset):
    ca = pkiset[0]
    aa_key = pki.generate_private_key("ed25519")
    aa_cert = pki.issue_aa_cert(ca, public_key=aa_key.public_key(), serial=4)
    holder = _client(ca, 114)
    ac = attrcerts.issue_ac(
        aa_key=aa_key, aa_cert=aa_cert, holder=attrcerts.Holder.from_cert(holder), serial=1, fqans=FQANS
    )
    assert attrcerts.verify_ac(ac, aa_cert=aa_cert, holder_cert=holder, now=NOW) == FQANS
    with pytest.raises(ACInvalid, match="does not fit the AA key"):
        # An Ed25519-signed AC checked against an ECDSA AA certificate of the same name.
        attrcerts.verify_ac(ac, aa_cert=pkiset[2], holder_cert=holder, now=NOW)


def test_issue_refuses_validity_beyond_holder_and_bad_fqans(pkiset):
    holder = _client(pkiset[0], 115)
    with pytest.raises(attrcerts.ACError, match="exceeds the holder"):
        _issue(pkiset, holder, not_after=holder.not_valid_after_utc + dt.timedelta(seconds=1))
    with pytest.raises(attrcerts.ACError, match="invalid FQAN"):
        _issue(pkiset, holder, fqans=["/other/c42/Role=member"])
    with pytest.raises(attrcerts.ACError, match="grants nothing"):
        _issue(pkiset, holder, fqans=[])
    with pytest.raises(attrcerts.ACError):
        attrcerts.fqan("c 42")


def test_independent_decode_with_pyasn1_modules(pkiset):
    ca, _, aa_cert = pkiset
    holder = _client(ca, 116)
    der = _issue(pkiset, holder, serial=4711)
    ac, rest = der_decode(der, asn1Spec=rfc5755.AttributeCertificate())
    assert rest == b""
    info = ac["acinfo"]
    assert int(info["version"]) == 1  # v2
    assert info["signature"]["algorithm"] == rfc5280.univ.ObjectIdentifier("1.2.840.10045.4.3.2")
    assert ac["signatureAlgorithm"] == info["signature"]
    assert int(info["serialNumber"]) == 4711

    base = info["holder"]["baseCertificateID"]
    assert int(base["serial"]) == 116
    holder_issuer = base["issuer"][0]["directoryName"]
    assert _rdn_values(holder_issuer) == ["VirtCloud", "VirtCloud VPN CA"]

    v2 = info["issuer"]["v2Form"]
    assert _rdn_values(v2["issuerName"][0]["directoryName"]) == ["VirtCloud", "VirtCloud Attribute Authority"]
    assert not v2["baseCertificateID"].isValue

    period = info["attrCertValidityPeriod"]
    assert period["notBeforeTime"].asDateTime == holder.not_valid_before_utc
    assert period["notAfterTime"].asDateTime == holder.not_valid_after_utc

    (attribute,) = list(info["attributes"])
    assert attribute["type"] == rfc5755.id_aca_group
    (raw_value,) = list(attribute["values"])
    syntax, _ = der_decode(raw_value, asn1Spec=rfc5755.IetfAttrSyntax())
    assert [str(v["string"]) for v in syntax["values"]] == FQANS

    ext_ids = {str(e["extnID"]): bool(e["critical"]) for e in info["extensions"]}
    assert ext_ids == {"2.5.29.35": False, "2.5.29.56": False}


def _rdn_values(name):
    values = []
    for rdn in name["rdnSequence"]:
        for atv in rdn:
            decoded, _ = der_decode(atv["value"], asn1Spec=rfc5280.DirectoryString())
            values.append(str(decoded.getComponent()))
    return values
