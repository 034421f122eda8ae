"""The fast AC encoding (constant parts cut once per AA from an asn1crypto build) against the general
asn1crypto build: byte for byte the same AC, for one and several FQANs, every supported AA key type, long
and short names; and a new AA never gets another AA's cached parts."""

from __future__ import annotations

import datetime as dt

import pytest
from asn1crypto import cms

from access import attrcerts, pki
from access.tests.fixtures import certificates_start_at_module_now  # noqa: F401 (autouse)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _general(aa_key, aa_cert, holder, serial, fqans) -> bytes:
    """The AC body as asn1crypto builds it field by field (the reference)."""
    info = attrcerts._info(aa_cert, holder.issuer, attrcerts._algorithm_for(aa_key))
    info["holder"]["base_certificate_id"]["serial"] = holder.serial
    info["serial_number"] = serial
    info["att_cert_validity_period"] = {"not_before_time": holder.not_before, "not_after_time": holder.not_after}
    info["attributes"][0]["values"][0]["values"] = [cms.IetfAttrValue(name="string", value=v) for v in fqans]
    return info.dump(force=True)


def _verify(ca, der, aa_cert, holder) -> list[str]:
    key = pki.generate_client_key()
    cert = pki.issue_client_cert(
        ca,
        public_key=key.public_key,
        user="alice",
        serial=holder.serial,
        not_before=holder.not_before,
        not_after=holder.not_after,
        ac_der=der,
    )
    return attrcerts.verify_ac(der, aa_cert=aa_cert, holder_cert=cert, now=NOW + dt.timedelta(minutes=1))


@pytest.mark.parametrize("key_type", ["p256", "ed25519"])
@pytest.mark.parametrize(
    "fqans",
    [
        ["/virtcloud/mpi-7/Role=member"],
        [attrcerts.fqan(f"cluster-with-a-rather-long-name-{i}") for i in range(12)],  # long lengths
    ],
)
def test_fast_encoding_is_the_general_one(key_type, fqans):
    ca = pki.create_ca("VirtCloud VPN CA with a longer common name than usual", now=NOW)
    aa_key = pki.generate_private_key(key_type)
    aa_cert = pki.issue_aa_cert(ca, public_key=aa_key.public_key(), serial=2)
    holder = attrcerts.Holder(ca.cert.subject, 2**70 + 5, NOW, NOW + dt.timedelta(days=3))
    der = attrcerts.issue_ac(aa_key=aa_key, aa_cert=aa_cert, holder=holder, serial=2**70 + 5, fqans=fqans)
    ac = cms.AttributeCertificateV2.load(der)
    assert ac.dump(force=True) == der  # canonical DER all the way down
    assert ac["ac_info"].dump() == _general(aa_key, aa_cert, holder, 2**70 + 5, fqans)
    assert _verify(ca, der, aa_cert, holder) == fqans


def test_a_new_aa_does_not_get_the_old_one_s_parts():
    ca = pki.create_ca("CA", now=NOW)
    holder = attrcerts.Holder(ca.cert.subject, 9, NOW, NOW + dt.timedelta(days=1))
    fqans = [attrcerts.fqan("c42")]
    for name in ("AA one", "AA two"):
        key = pki.generate_private_key()
        cert = pki.issue_aa_cert(ca, public_key=key.public_key(), serial=3, common_name=name)
        der = attrcerts.issue_ac(aa_key=key, aa_cert=cert, holder=holder, serial=9, fqans=fqans)
        assert _verify(ca, der, cert, holder) == fqans
        assert name in str(cms.AttributeCertificateV2.load(der)["ac_info"]["issuer"].native)
