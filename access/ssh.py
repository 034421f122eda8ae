"""OpenSSH certificates for cluster access: user and host CAs, user/host certificates, KRLs, ssh_config.

Built on cryptography's ``SSHCertificateBuilder`` (LAB.md §7). Nothing here touches the database or the
disk. CA keys are cryptography private keys; store them with :func:`ca_key_to_encrypted_pem` (PKCS#8,
``BestAvailableEncryption``; the OpenSSH private-key format would need bcrypt for encryption).

User certificates (issue 7):

- principal per cluster: ``<cluster>.<user>`` (:func:`principal`), which the bastion's principals file
  maps to that cluster's nodes with ``permitopen``;
- key id says who/what/when: ``virtcloud:user=alice:cluster=c42:serial=17:issued=2026-03-01T12:00:00Z``
  (sshd logs it on every login with ``LogLevel VERBOSE``: the audit trail);
- short validity in hours, bounded (refused, not clamped, outside the bounds the caller allows);
- extensions ``permit-pty`` and ``permit-port-forwarding`` only (ProxyJump needs the latter); no agent
  or X11 forwarding, no user rc.

KRL: cryptography has no KRL writer. :func:`build_krl` writes the binary format of OpenSSH's
``PROTOCOL.krl`` itself (certificate section with serial list and key-id subsections, and SHA-256
fingerprints of plain keys) rather than shelling out to ``ssh-keygen -k``: the portal builds it inside a
transaction without temporary files or a subprocess, and the tests check the bytes with ``ssh-keygen -Q``
and with a real sshd's ``RevokedKeys``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from access import pki

CAKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
UserPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey

USER_EXTENSIONS = (b"permit-port-forwarding", b"permit-pty")
CLOCK_SKEW = dt.timedelta(minutes=5)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,62}$")  # as directories have them: jo.doe@example.org
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")  # no '.': the first '.' of a principal ends the label


class SSHKeyRejected(ValueError):
    """A public key the user supplied cannot be certified (weak, unsupported, or not a public key)."""


class SSHCertError(ValueError):
    """A certificate request outside what the portal issues (validity bounds, principals, serial)."""


# ------------------------------------------------------------------------------------------- keys


def generate_ca_key(key_type: str = "ed25519") -> CAKey:
    """A user or host CA key (Ed25519 by default; ``ecdsa`` for P-256)."""
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    raise SSHCertError(f"unsupported SSH CA key type {key_type!r}")


def ca_key_to_encrypted_pem(key: CAKey, passphrase: bytes) -> bytes:
    return pki.private_key_to_encrypted_pem(key, passphrase)


def load_ca_key(pem: bytes, passphrase: bytes) -> CAKey:
    return pki.load_encrypted_private_key(pem, passphrase)


def public_key_line(key: CAKey | UserPublicKey, comment: str = "") -> str:
    """``<type> <base64>[ <comment>]`` as in ``*.pub`` files and ``TrustedUserCAKeys``."""
    pub = key.public_key() if hasattr(key, "private_bytes") else key
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip() if comment else line


def _key_blob(line: str) -> bytes:
    parts = line.strip().split()
    if len(parts) < 2:
        raise SSHKeyRejected("not an OpenSSH public key line")
    try:
        return base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise SSHKeyRejected("the base64 part of the public key is corrupt") from None


def fingerprint(line_or_key: str | UserPublicKey | CAKey) -> str:
    """``SHA256:<base64>`` as ``ssh-keygen -l`` prints it."""
    line = line_or_key if isinstance(line_or_key, str) else public_key_line(line_or_key)
    digest = hashlib.sha256(_key_blob(line)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class ParsedKey:
    """A user's public key, accepted for certification."""

    key: UserPublicKey
    key_type: str
    bits: int
    comment: str

    @property
    def line(self) -> str:
        return public_key_line(self.key)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


def parse_public_key(text: str, *, min_rsa_bits: int = 3072) -> ParsedKey:
    """Parse a pasted/uploaded OpenSSH public key and refuse weak or unsupported ones with a clear message.

    Accepted: ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa with at least ``min_rsa_bits`` bits
    (3072 by default: NIST SP 800-57 beyond 2030). Refused: DSA, short RSA, FIDO ``sk-*`` keys (the
    certificate builder cannot sign them), certificates, private keys.
    """
    text = text.strip()
    if looks_private(text):
        raise SSHKeyRejected("this is a PRIVATE key: never share it; paste the .pub file instead")
    text = _from_rfc4716(text) or text
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise SSHKeyRejected("paste exactly one public key line (the content of ~/.ssh/id_ed25519.pub)")
    parts = lines[0].split(None, 2)
    kind = parts[0]
    comment = parts[2] if len(parts) > 2 else ""
    if kind.endswith("-cert-v01@openssh.com"):
        raise SSHKeyRejected("this is a certificate, not a public key; paste the .pub file of your key")
    if kind.startswith("sk-"):
        raise SSHKeyRejected(f"security-key type {kind} is not supported yet; use an ssh-ed25519 key")
    if kind == "ssh-dss":
        raise SSHKeyRejected("DSA keys are weak and disabled in OpenSSH; use an ssh-ed25519 key")
    try:
        key = serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
    except (ValueError, TypeError) as exc:
        raise SSHKeyRejected(f"not a valid OpenSSH public key ({kind}): {exc}") from None
    except Exception:  # unsupported algorithms raise UnsupportedAlgorithm (its text only repeats the type)
        raise SSHKeyRejected(_unsupported(kind, min_rsa_bits)) from None
    if isinstance(key, dsa.DSAPublicKey):
        raise SSHKeyRejected("DSA keys are weak and disabled in OpenSSH; use an ssh-ed25519 key")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < min_rsa_bits:
            raise SSHKeyRejected(
                f"RSA key of {key.key_size} bits is too weak (minimum {min_rsa_bits}); use an ssh-ed25519 key"
            )
        return ParsedKey(key, kind, key.key_size, comment)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return ParsedKey(key, kind, key.curve.key_size, comment)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return ParsedKey(key, kind, 256, comment)
    raise SSHKeyRejected(_unsupported(kind, min_rsa_bits))


# what a private key file holds and a public one never does: PEM/OpenSSH ("-----BEGIN OPENSSH PRIVATE KEY-----"),
# PuTTY's .ppk ("PuTTY-User-Key-File-3: ssh-ed25519", "Private-Lines: 1", "Private-MAC: …")
_PRIVATE_MARKS = ("PRIVATE KEY", "PuTTY-User-Key-File", "Private-Lines:", "Private-MAC:")
_RFC4716_BEGIN, _RFC4716_END = "---- BEGIN SSH2 PUBLIC KEY ----", "---- END SSH2 PUBLIC KEY ----"


def looks_private(text: str) -> bool:
    """Whether ``text`` holds a private key (any format a user may paste by mistake): never shown back."""
    return any(mark in text for mark in _PRIVATE_MARKS)


def _from_rfc4716(text: str) -> str | None:
    """An RFC 4716 public key — what PuTTYgen's "Save public key" and ``ssh-keygen -e`` write — as the one OpenSSH
    line it stands for (its ``Comment`` header as the comment); None when ``text`` is not one."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if not lines or lines[0] != _RFC4716_BEGIN:
        return None
    if _RFC4716_END not in lines:
        raise SSHKeyRejected(f"an SSH2 public key without its '{_RFC4716_END}' line: paste the whole file")
    headers, body, continued = [], [], False
    for line in lines[1 : lines.index(_RFC4716_END)]:
        if continued:  # (a header's value goes on after a line ending in a backslash)
            headers[-1] += line
        elif ":" in line:
            headers.append(line)
        else:
            body.append(line)
        continued = (continued or ":" in line) and line.endswith("\\")
        if continued:
            headers[-1] = headers[-1][:-1]
    try:
        blob = base64.b64decode("".join(body), validate=True)
        size = int.from_bytes(blob[:4], "big")
        kind = blob[4 : 4 + size].decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise SSHKeyRejected("not a valid SSH2 public key: its body is not base64 of a key") from None
    comment = next((h.split(":", 1)[1].strip().strip('"') for h in headers if h.lower().startswith("comment:")), "")
    return " ".join(part for part in (kind, base64.b64encode(blob).decode(), comment) if part)


def _unsupported(kind: str, min_rsa_bits: int) -> str:
    return (
        f"unsupported key type {kind} (use ssh-ed25519, ecdsa-sha2-nistp256/384/521, "
        f"or ssh-rsa of {min_rsa_bits} bits or more)"
    )


@dataclass(frozen=True)
class UserKeyPair:
    """A fresh key pair for download: the private half goes to the user and nowhere else."""

    private_openssh: bytes
    public_line: str

    def __repr__(self) -> str:
        return f"UserKeyPair(public_line={self.public_line!r}, private_openssh=<redacted>)"


def generate_user_key(comment: str = "") -> UserKeyPair:
    """An Ed25519 key pair in OpenSSH format (unencrypted: the download is the only copy)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    return UserKeyPair(private_openssh=private, public_line=public_key_line(key, comment))


# ----------------------------------------------------------------------------------- certificates


def principal(cluster: str, user: str) -> str:
    """The principal that admits ``user`` to ``cluster``: ``<cluster>.<user>``. A cluster label has no
    ``.``, so a principal names one (cluster, user) pair only — with ``-`` between them, cluster ``c-17``
    with user ``18-bob`` and cluster ``c-17-18`` with user ``bob`` would share one."""
    if not _LABEL_RE.fullmatch(cluster):
        raise SSHCertError(f"invalid cluster name {cluster!r} for an SSH principal")
    if not _NAME_RE.fullmatch(user):
        raise SSHCertError(f"invalid user name {user!r} for an SSH principal")
    return f"{cluster}.{user}"


def key_id(*, user: str, cluster: str, serial: int, issued: dt.datetime) -> str:
    """``virtcloud:user=<u>:cluster=<c>:serial=<n>:issued=<UTC ISO>`` (logged by sshd on every login)."""
    stamp = issued.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"virtcloud:user={user}:cluster={cluster}:serial={serial}:issued={stamp}"


def _cert_line(cert, comment: str) -> str:
    line = cert.public_bytes().decode()
    return f"{line} {comment}".strip()


def _check_serial(serial: int) -> None:
    if not 0 < serial < (1 << 64):
        raise SSHCertError(f"SSH certificate serial {serial} is out of range (1..2**64-1)")


def issue_user_cert(
    ca_key: CAKey,
    *,
    public_key: str | ParsedKey,
    user: str,
    cluster: str,
    serial: int,
    hours: float = 12,
    min_hours: float = 0.25,
    max_hours: float = 24,
    now: dt.datetime | None = None,
    min_rsa_bits: int = 3072,
) -> str:
    """A user certificate (``*-cert.pub`` line) for ``user`` into ``cluster``.

    ``hours`` outside ``[min_hours, max_hours]`` is refused (:class:`SSHCertError`). The certificate is
    valid from now - 5 min (clock skew) to now + ``hours``; principal :func:`principal`; key id
    :func:`key_id`; extensions ``permit-pty`` and ``permit-port-forwarding`` only.
    """
    parsed = (
        public_key if isinstance(public_key, ParsedKey) else parse_public_key(public_key, min_rsa_bits=min_rsa_bits)
    )
    if not min_hours <= hours <= max_hours:
        raise SSHCertError(f"SSH certificate validity {hours} h is outside the allowed {min_hours}..{max_hours} h")
    _check_serial(serial)
    issued = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    ident = key_id(user=user, cluster=cluster, serial=serial, issued=issued)
    builder = (
        serialization.SSHCertificateBuilder()
        .public_key(parsed.key)
        .serial(serial)
        .type(serialization.SSHCertificateType.USER)
        .key_id(ident.encode())
        .valid_principals([principal(cluster, user).encode()])
        .valid_after(int((issued - CLOCK_SKEW).timestamp()))
        .valid_before(int((issued + dt.timedelta(hours=hours)).timestamp()))
    )
    for name in USER_EXTENSIONS:  # cryptography sorts them as the protocol requires
        builder = builder.add_extension(name, b"")
    return _cert_line(builder.sign(ca_key), ident)


def issue_host_cert(
    ca_key: CAKey,
    *,
    public_key: str | ParsedKey,
    principals: Sequence[str],
    serial: int,
    days: float = 365,
    until: dt.datetime | None = None,
    now: dt.datetime | None = None,
) -> str:
    """A host certificate for a bastion or node: ``principals`` are the names and addresses clients use.
    Valid from now - 5 min (clock skew) for ``days``, or until ``until`` when given."""
    if not principals:
        raise SSHCertError("a host certificate needs at least one principal (hostname or address)")
    _check_serial(serial)
    if isinstance(public_key, ParsedKey):
        key = public_key.key
    else:
        key = serialization.load_ssh_public_key(" ".join(public_key.split()[:2]).encode())
    issued = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    end = until if until is not None else issued + dt.timedelta(days=days)
    if end <= issued:
        raise SSHCertError(f"a host certificate valid until {end.isoformat()} would have ended already")
    ident = host_key_id(principals[0], serial)
    cert = (
        serialization.SSHCertificateBuilder()
        .public_key(key)
        .serial(serial)
        .type(serialization.SSHCertificateType.HOST)
        .key_id(ident.encode())
        .valid_principals([p.encode() for p in principals])
        .valid_after(int((issued - CLOCK_SKEW).timestamp()))
        .valid_before(int(end.timestamp()))
        .sign(ca_key)
    )
    return _cert_line(cert, ident)


def host_key_id(first_principal: str, serial: int) -> str:
    """``virtcloud-host:<first principal>:serial=<n>``: the key id of a host certificate."""
    return f"virtcloud-host:{first_principal}:serial={serial}"


def load_cert(line: str) -> serialization.SSHCertificate:
    return serialization.load_ssh_public_identity(line.strip().encode())


# --------------------------------------------------------------------------------------------- KRL

_KRL_MAGIC = b"SSHKRL\n\x00"
_KRL_FORMAT_VERSION = 1
_SECTION_CERTIFICATES = 1
_SECTION_FINGERPRINT_SHA256 = 5
_CERT_SERIAL_LIST = 0x20
_CERT_SERIAL_RANGE = 0x21
_CERT_KEY_ID = 0x23


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _serial_runs(serials: Iterable[int]) -> tuple[list[int], list[tuple[int, int]]]:
    """Split sorted unique serials into singles and ranges (runs of 3+), as ssh-keygen does to stay small."""
    singles: list[int] = []
    ranges: list[tuple[int, int]] = []
    ordered = sorted(set(serials))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        if j - i >= 2:
            ranges.append((ordered[i], ordered[j]))
        else:
            singles.extend(ordered[i : j + 1])
        i = j + 1
    return singles, ranges


def build_krl(
    *,
    ca_public_key: str,
    serials: Iterable[int] = (),
    key_ids: Iterable[str] = (),
    revoked_keys: Iterable[str] = (),
    version: int,
    comment: str = "",
    generated_at: dt.datetime | None = None,
) -> bytes:
    """A KRL in OpenSSH's binary format (``PROTOCOL.krl``), for sshd's ``RevokedKeys``.

    Revokes certificates signed by ``ca_public_key`` (its ``*.pub`` line) by ``serials`` and by
    ``key_ids``, and plain public keys (``revoked_keys``, ``*.pub`` lines) by SHA-256 fingerprint.
    ``version`` must grow with each KRL the portal publishes. An empty KRL (nothing revoked) is valid
    and is what a new gateway gets: sshd refuses every login if ``RevokedKeys`` names a missing file.
    """
    serial_list = list(serials)
    for s in serial_list:
        _check_serial(s)
    generated = int((generated_at or dt.datetime.now(dt.UTC)).timestamp())
    out = bytearray()
    out += _KRL_MAGIC
    out += struct.pack(">IQQQ", _KRL_FORMAT_VERSION, version, generated, 0)
    out += _string(b"")  # reserved
    out += _string(comment.encode())

    singles, ranges = _serial_runs(serial_list)
    ids = sorted(set(key_ids))
    if singles or ranges or ids:
        cert_section = bytearray(_string(_key_blob(ca_public_key)) + _string(b""))
        if singles:
            cert_section += bytes([_CERT_SERIAL_LIST]) + _string(b"".join(struct.pack(">Q", s) for s in singles))
        for low, high in ranges:
            cert_section += bytes([_CERT_SERIAL_RANGE]) + _string(struct.pack(">QQ", low, high))
        if ids:
            cert_section += bytes([_CERT_KEY_ID]) + _string(b"".join(_string(k.encode()) for k in ids))
        out += bytes([_SECTION_CERTIFICATES]) + _string(bytes(cert_section))

    hashes = sorted({hashlib.sha256(_key_blob(line)).digest() for line in revoked_keys})
    if hashes:
        out += bytes([_SECTION_FINGERPRINT_SHA256]) + _string(b"".join(_string(h) for h in hashes))
    return bytes(out)


# ------------------------------------------------------------------------------------- ssh_config


#: The account users log in as on a cluster's nodes (``User`` in the ssh_config); its principals file on the node
#: is :func:`render_authorized_principals`.
NODE_USER = "root"


def render_authorized_principals(cluster: str, principals: Iterable[str]) -> str:
    """The ``AuthorizedPrincipalsFile`` of :data:`NODE_USER` on a node of ``cluster``: the principals of the
    people who may enter it (``<cluster>.<user>``, :func:`principal`), one a line; the node's sshd trusts the
    portal's user CA (``TrustedUserCAKeys``) for them. Fetch it again when the cluster's group changes."""
    lines = [f"# VirtCloud: who may log in to the nodes of cluster {cluster} (from the portal)."]
    for name in principals:
        label, _, user = name.partition(".")
        lines.append(principal(label, user))  # (refuses what could not be one line of the file)
    return "\n".join(lines) + "\n"


def node_alias(cluster: str, name: str) -> str:
    """``<node>.<cluster>``: the ``Host`` a user types (``ssh <node>.<cluster>``), and the node's name in the
    gateway's state and its host certificate. Unique among all clusters' nodes: neither a cluster's label
    (``<name>-<id>``) nor a node's name holds a dot, where ``<cluster>-<node>`` made cluster ``a`` (id 1) with node
    ``b-2-x`` and cluster ``a-1-b`` (id 2) with node ``x`` one name — one's host certificate good for the other."""
    return f"{name}.{cluster}"


def node_host_names(cluster: str, name: str) -> list[str]:
    """The names a node's host certificate vouches for, and its ``known_hosts`` patterns: its alias only. The
    ssh_config checks the node's host key as ``HostKeyAlias <alias>``, never as its address (``HostName``): an
    owner picks the address, which may be anyone's — the gateway's, another cluster's node's — and a host
    certificate naming it would let that owner's node pass for them."""
    return [node_alias(cluster, name)]


def render_ssh_config(
    *,
    cluster: str,
    nodes: Sequence[tuple[str, str]],
    gateway_host: str,
    gateway_port: int = 22,
    gateway_user: str,
    identity_file: str,
    certificate_file: str,
    known_hosts_file: str,
    node_user: str = NODE_USER,
    withheld: Sequence[tuple[str, str, str]] = (),
) -> str:
    """An ``ssh_config`` snippet for one cluster: ``ssh <node>.<cluster>`` jumps through the gateway.

    ``nodes`` are ``(name, address)``; each becomes ``Host <name>.<cluster>``. ``withheld`` nodes (name,
    address, why), which the bastion does not relay to, are named in a comment only, with why. The ``known_hosts_file``
    must hold :func:`known_hosts_line` for :func:`known_hosts_patterns` of the same arguments, so no host-key
    prompt appears (host certificates). On the nodes, ``node_user``'s principals file is
    :func:`render_authorized_principals`.
    """
    if not _NAME_RE.fullmatch(cluster):
        raise SSHCertError(f"invalid cluster name {cluster!r}")
    # Every value below ends up as one token of an ssh_config line: a space would add an argument, a newline a
    # directive (ProxyCommand ...). Refused here too, whatever the callers checked.
    _config_token(gateway_host, "gateway host", _CONFIG_HOST_RE)
    _config_token(gateway_user, "gateway user", _CONFIG_USER_RE)
    _config_token(node_user, "node user", _CONFIG_USER_RE)
    for value, what in (
        (identity_file, "identity file"),
        (certificate_file, "certificate file"),
        (known_hosts_file, "known_hosts file"),
    ):
        _config_token(value, what)
    if not 0 < int(gateway_port) < 65536:
        raise SSHCertError(f"invalid gateway port {gateway_port!r} (1..65535)")
    jump = f"virtcloud-gw-{cluster}"
    common = [
        f"  IdentityFile {identity_file}",
        f"  CertificateFile {certificate_file}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {known_hosts_file}",
        "  StrictHostKeyChecking yes",
        "  ForwardAgent no",
        "  ForwardX11 no",
    ]
    lines = [
        f"# VirtCloud: SSH into cluster {cluster} through the access gateway.",
        f"# Usage: ssh -F <this file> <node>.{cluster}   (or Include it from ~/.ssh/config)",
        f"Host {jump}",
        f"  HostName {gateway_host}",
        f"  Port {int(gateway_port)}",
        f"  User {gateway_user}",
        *common,
        "",
    ]
    for name, address in nodes:
        if not _NAME_RE.fullmatch(name):
            raise SSHCertError(f"invalid node name {name!r}")
        _config_token(address, f"address of node {name}", _CONFIG_HOST_RE)
        alias = node_alias(cluster, name)
        lines += [f"Host {alias}", f"  HostName {address}", f"  HostKeyAlias {alias}", ""]
    if withheld:
        lines.append("# Not reachable through this gateway's SSH bastion (use the cluster's VPN profile):")
        for name, address, why in withheld:
            known_by_name = address == node_alias(cluster, name)  # a node without an address
            if not _NAME_RE.fullmatch(name) or not (_is_address(address) or known_by_name) or "\n" in why:
                raise SSHCertError(f"invalid withheld node {name!r} {address!r}")
            lines.append(f"#   {node_alias(cluster, name)} ({address}): {why}")
        lines.append("")
    lines += [
        f"Host *.{cluster}",
        f"  ProxyJump {jump}",
        f"  User {node_user}",
        *common,
    ]
    return "\n".join(lines) + "\n"


_CONFIG_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}")  # a host name or an address (no IPv6 zone)
_CONFIG_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,63}")


def _config_token(value: str, what: str, pattern: re.Pattern[str] | None = None) -> str:
    """``value`` if it can be one token of an ``ssh_config`` line: no whitespace, quote or control character
    (and matching ``pattern``, when given), else :class:`SSHCertError`."""
    if (
        not isinstance(value, str)
        or not value
        or any(c.isspace() or c in "\"'\\" or ord(c) < 32 or ord(c) == 127 for c in value)
        or (pattern is not None and not pattern.fullmatch(value))
    ):
        raise SSHCertError(f"invalid {what} {value!r} for an ssh_config")
    return value


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def known_hosts_patterns(
    *, cluster: str, nodes: Sequence[tuple[str, str]], gateway_host: str, gateway_port: int = 22
) -> list[str]:
    """The host patterns of a profile's ``known_hosts``: the gateway as ssh looks it up (``host``, or
    ``[host]:port`` off port 22) and each node's alias (:func:`node_host_names`; the ssh_config's
    ``HostKeyAlias``), nothing else — so that the portal's host CA, merged into a user's own
    ``~/.ssh/known_hosts``, vouches for these hosts only."""
    _config_token(gateway_host, "gateway host", _CONFIG_HOST_RE)
    if not 0 < int(gateway_port) < 65536:
        raise SSHCertError(f"invalid gateway port {gateway_port!r} (1..65535)")
    patterns = [gateway_host if int(gateway_port) == 22 else f"[{gateway_host}]:{int(gateway_port)}"]
    for name, address in nodes:
        if not _NAME_RE.fullmatch(name):
            raise SSHCertError(f"invalid node name {name!r}")
        _config_token(address, f"address of node {name}", _CONFIG_HOST_RE)
        patterns += node_host_names(cluster, name)
    return list(dict.fromkeys(patterns))


def known_hosts_line(host_ca_public_key: str, patterns: Sequence[str]) -> str:
    """``@cert-authority <patterns> <host CA key>``: trust host certificates from the portal's host CA for the
    hosts ``patterns`` name (see :func:`known_hosts_patterns`; never ``*``, which would trust it for every
    host the user connects to once the line is merged into their own ``known_hosts``)."""
    key = " ".join(host_ca_public_key.split()[:2])
    return f"@cert-authority {_host_patterns(patterns, 'a @cert-authority line')} {key}\n"


def known_hosts_revoked_line(public_key: str, patterns: Sequence[str]) -> str:
    """``@revoked <patterns> <key>``: ssh refuses this host key, and every certificate of it, for the hosts
    ``patterns`` name — those the revoked node certificate was for, never ``*`` (whoever asked for it chose the
    key: with ``*`` they could have any host's key refused by every user of the portal)."""
    return f"@revoked {_host_patterns(patterns, 'a @revoked line')} {' '.join(public_key.split()[:2])}\n"


def _host_patterns(patterns: Sequence[str], what: str) -> str:
    """``patterns`` as a known_hosts marker line lists them: each one host (no wildcard, negation or list),
    at least one."""
    if not patterns:
        raise SSHCertError(f"{what} needs the hosts it is for")
    for pattern in patterns:
        if not _KNOWN_HOST_RE.fullmatch(pattern):
            raise SSHCertError(f"invalid known_hosts host pattern {pattern!r}")
    return ",".join(patterns)


def certificate_key_fingerprint(certificate: str) -> str | None:
    """The fingerprint of the key an OpenSSH certificate (one line) certifies; None when it is not one."""
    try:
        cert = serialization.load_ssh_public_identity(certificate.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        return None
    key = cert.public_key() if hasattr(cert, "public_key") else cert
    return fingerprint(public_key_line(key))


def certified_key(certificate: str) -> tuple[str, list[str], dt.datetime] | None:
    """(the key line an OpenSSH certificate certifies, its principals, when it ends); None when it is not one."""
    try:
        cert = serialization.load_ssh_public_identity(certificate.strip().encode())
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not hasattr(cert, "valid_before"):
        return None
    names = [p.decode(errors="replace") for p in cert.valid_principals]
    return public_key_line(cert.public_key()), names, dt.datetime.fromtimestamp(min(cert.valid_before, 2**33), dt.UTC)


# a host name or address, or [host]:port — no wildcard, negation or list: each pattern names one host
_KNOWN_HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}|\[[A-Za-z0-9_][A-Za-z0-9_.:-]{0,252}\]:[0-9]{1,5}")
