"""Read an issued ``.ovpn`` back the way a gateway and a client would, for the tests."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from access import attrcerts, pki


@dataclass
class ParsedProfile:
    directives: dict[str, list[str]]
    ca: x509.Certificate
    cert: x509.Certificate
    key_pem: bytes
    tls_crypt: str
    fqans: list[str]
    #: a failover profile's gateways in order: (``remote`` line, tls-crypt key) of each ``<connection>`` block
    connections: list[tuple[str, str]]
    #: the gateway certificates the profile accepts (``peer-fingerprint``), as ``pki.cert_fingerprint`` gives them
    pinned: set[str]


def inline_blocks(text: str) -> dict[str, str]:
    return {m["tag"]: m["body"] for m in re.finditer(r"<(?P<tag>[a-z-]+)>\n(?P<body>.*?)\n</(?P=tag)>", text, re.S)}


def parse_profile(text: str, *, aa_pem: str | bytes) -> ParsedProfile:
    """Parse, and check what makes it a valid profile: the cert is signed by the inline CA, its embedded
    AC verifies against the AA for this very certificate, the key matches the certificate."""
    blocks = inline_blocks(text)
    outside = re.sub(r"<([a-z-]+)>\n.*?\n</\1>", "", text, flags=re.S)
    directives: dict[str, list[str]] = {}
    for line in outside.splitlines():
        if line and not line.startswith("#"):
            line = line.removeprefix("setenv opt ")  # OpenVPN takes the rest as a directive (if it knows it)
            word, _, rest = line.partition(" ")
            directives.setdefault(word, []).append(rest)
    ca = x509.load_pem_x509_certificate(blocks["ca"].encode())
    cert = x509.load_pem_x509_certificate(blocks["cert"].encode())
    cert.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(blocks["key"].encode(), password=None)
    assert key.public_key() == cert.public_key(), "the inline key does not match the certificate"
    ac = pki.embedded_ac(cert)
    assert ac is not None, "the certificate carries no attribute certificate"
    aa = x509.load_pem_x509_certificate(aa_pem.encode() if isinstance(aa_pem, str) else aa_pem)
    fqans = attrcerts.verify_ac(ac, aa_cert=aa, holder_cert=cert)
    connections = [
        (re.search(r"^remote (.*)$", body, re.M)[1], inline_blocks(body)["tls-crypt"])
        for body in re.findall(r"<connection>\n(.*?)\n</connection>", text, re.S)
    ]
    tls_crypt = connections[0][1] if connections else blocks["tls-crypt"]
    pinned = {fp.replace(":", "") for fp in directives.get("peer-fingerprint", [])}
    return ParsedProfile(directives, ca, cert, blocks["key"].encode(), tls_crypt, fqans, connections, pinned)
