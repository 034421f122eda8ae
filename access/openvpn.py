"""OpenVPN 2.6 configuration: users' client profiles, and the access gateway's server config (rendered by
:mod:`access.gateway.vpnconf`, re-exported here).

Pure rendering from plain values (strings, paths, PEM text); no crypto, no database. The gateway design
(DESIGN.md "Access", LAB.md §6): one tap server trunked into the closed clusters' VLANs with
``vlan-tagging``; each client lands untagged on the VLAN that ``client-connect`` chose (``vlan-pvid``).

Client compatibility: tap needs the OpenVPN 2.x client (Linux, macOS Tunnelblick, Windows OpenVPN GUI
2.x). OpenVPN 3 based clients (OpenVPN Connect, Android) do not support tap.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from access.gateway.state import CLUSTER_RE

# The gateway's own configuration is rendered in the gateway's package (its agent renders it again on a change),
# and the checks the client profiles below share with it come from there too.
from access.gateway.vpnconf import (  # noqa: F401 - re-exported: access.openvpn.render_server_config, ...
    _DEV_RE,
    _HOST_RE,
    DATA_CIPHERS,
    TLS12_CIPHERS,
    TLS13_CIPHERSUITES,
    ProfileError,
    _check,
    _plain,
    _port,
    _proto,
    _quoted,
    hook_command,
    render_server_config,
)


def _inline(tag: str, pem: str | bytes) -> list[str]:
    text = pem.decode() if isinstance(pem, bytes) else pem
    if f"</{tag}>" in text:
        raise ProfileError(f"inline {tag} contains its own closing tag")
    return [f"<{tag}>", text.strip(), f"</{tag}>"]


#: A failover profile pins its gateways by the start their certificates' names share (``verify-x509-name …
#: name-prefix``): at least this long, or the gateways are not put in one profile (``failover_prefix``).
MIN_SHARED_NAME = 8
#: How long a client waits for a gateway of a failover profile before it tries the next one (s).
FAILOVER_POLL_TIMEOUT = 10
_SERVER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Remote:
    """One more gateway a failover profile may connect to: where it listens, its certificate's name and SHA-256
    fingerprint (``pki.cert_fingerprint``) and its own tls-crypt key."""

    host: str
    port: int
    proto: str
    server_name: str
    tls_crypt_key: str | bytes
    fingerprint: str


def failover_prefix(server_names: Sequence[str]) -> str:
    """The start every one of ``server_names`` shares, which a failover profile pins; "" when it is shorter than
    ``MIN_SHARED_NAME`` (the default names, ``virtcloud-gateway-<name>``, share 18 characters)."""
    prefix = os.path.commonprefix(list(server_names))
    return prefix if len(prefix) >= MIN_SHARED_NAME else ""


def publish_device(cluster: str) -> str:
    """The tap device of a publish profile for ``cluster`` (its label, ``<name>-<id>``): ``vc-<label>``, which a
    router's LAN bridge names. A device name has at most 15 characters: a longer label keeps its id whole and
    shortens its name, so that two clusters' devices never share a name (``simulation-run-101`` and
    ``-102`` would both be ``vc-simulation-r``)."""
    dev = f"vc-{cluster}"
    if len(dev) <= 15:
        return dev
    name, _, ident = cluster.rpartition("-")
    if name and ident.isdigit() and len(ident) <= 10:
        return f"vc-{name[: 11 - len(ident)]}-{ident}"
    return "vc-" + hashlib.sha256(cluster.encode()).hexdigest()[:12]


def render_client_profile(
    *,
    cluster: str,
    remote: Sequence[tuple[str, int]] | tuple[str, int],
    server_name: str,
    server_fingerprint: str,
    ca_pem: str | bytes,
    cert_pem: str | bytes,
    key_pem: str | bytes,
    tls_crypt_key: str | bytes,
    proto: str = "udp",
    publish: bool = False,
    dev: str | None = None,
    user: str | None = None,
    expires: str | None = None,
    verb: int = 3,
    fallbacks: Sequence[Remote] = (),
) -> str:
    """A self-contained ``.ovpn`` for ``cluster`` (everything inline: CA, cert with AC, key, tls-crypt).

    ``remote`` is ``(host, port)`` or a list of them (tried in order). ``server_name`` is the gateway
    certificate's CN, pinned with ``verify-x509-name``; ``server_fingerprint`` the SHA-256 of that certificate
    (``pki.cert_fingerprint``), pinned too (``peer-fingerprint``, with the CA check; OpenVPN 2.6 and later, which
    the profile asks for with ``setenv opt`` so that an older client still connects without it): the profile
    accepts the gateways' certificates of the day it was made and no other, so a gateway re-enrolled (a new key)
    cannot be impersonated with its old key, whatever that certificate's name and validity.

    ``publish=True`` renders the long-lived variant
    for a user's router that bridges the cluster into the user's LAN (paper §2.2): a fixed tap name,
    ``persist-tun`` and endless retries; the router owner adds the tap to their LAN bridge.

    ``fallbacks``: more gateways that carry the cluster, tried in turn when the one before does not answer
    within ``FAILOVER_POLL_TIMEOUT`` s or a session to it dies (OpenVPN's ``<connection>`` blocks, each with
    its gateway's address, ``proto`` and tls-crypt key; after the last, the first again). The certificate's
    name is then pinned by the prefix all the gateways' names share (``failover_prefix``; a ProfileError when
    it is too short). The result contains the private key: hand it to the user, never store or log it.
    """
    _check(CLUSTER_RE, cluster, "cluster name")
    proto = _proto(proto, 1)
    for value, what in ((user, "user name"), (expires, "expiry")):
        if value:
            _plain(value, what)
    remotes = [remote] if isinstance(remote, tuple) else list(remote)
    if not remotes:
        raise ProfileError("a profile needs at least one remote")
    dev = dev or (publish_device(cluster) if publish else "tap")
    _check(_DEV_RE, dev, "tap device name")
    for name in (server_name, *(r.server_name for r in fallbacks)):
        _check(_SERVER_NAME_RE, name, "server name")
    pins = [
        _check(_FINGERPRINT_RE, fp, "certificate fingerprint")
        for fp in (server_fingerprint, *(r.fingerprint for r in fallbacks))
    ]
    if fallbacks:
        pinned = failover_prefix([server_name, *(r.server_name for r in fallbacks)])
        if not pinned:
            raise ProfileError("the gateways' certificate names share too short a start to pin them together")
        verify = f"verify-x509-name {_quoted(pinned)} name-prefix"
        connections = [
            *_connection(remotes, proto, tls_crypt_key),
            *(line for r in fallbacks for line in _connection([(r.host, r.port)], _proto(r.proto, 1), r.tls_crypt_key)),
        ]
        where = [f"server-poll-timeout {FAILOVER_POLL_TIMEOUT}"]
    else:
        verify = f"verify-x509-name {_quoted(server_name)} name"
        connections = []
        where = [
            f"proto {proto}",
            *[f"remote {_check(_HOST_RE, h, 'remote host')} {_port(p, 'remote port')}" for h, p in remotes],
        ]

    head = [
        f"# VirtCloud: layer-2 access to cluster {cluster}" + (f" for {user}" if user else ""),
    ]
    if expires:
        head.append(f"# Certificate valid until {expires}; download a new profile after that.")
    head += [
        "# Needs the OpenVPN 2.x client (tap); 2.6 or later also checks the gateway's exact certificate.",
        "# OpenVPN 3 / OpenVPN Connect / Android do not support tap.",
        "# Contains your private key: keep this file private.",
    ]
    if publish:
        head += [
            "# Publish profile: run on your router to bridge the cluster into your LAN, e.g.",
            f"#   openvpn --config this.ovpn --daemon   then   ip link set {dev} master <your-lan-bridge>",
            "# The tunnel is long-lived: it reconnects forever and keeps the tap across reconnects.",
        ]
    lines = [
        *head,
        "client",
        f"dev {dev}",
        "dev-type tap",
        *where,
        "nobind",
        "resolv-retry infinite",
        "persist-key",
        "remote-cert-tls server",
        verify,
        "tls-version-min 1.2",
        f"data-ciphers {DATA_CIPHERS}",
        "# Which cluster network to enter; the gateway checks it against the attribute certificate.",
        "push-peer-info",
        f"setenv UV_VCLUSTER {cluster}",
        "auth-nocache",
        *(["explicit-exit-notify 1"] if proto.startswith("udp") and not fallbacks else []),  # free the slot on exit
        f"verb {int(verb)}",
    ]
    if publish:
        lines += ["persist-tun", "keepalive 10 60", "connect-retry 5 300"]
    lines += _inline("ca", ca_pem) + _inline("cert", cert_pem) + _inline("key", key_pem)
    # "setenv opt": an OpenVPN 2.6 client checks the certificate against these, an older one (no peer-fingerprint)
    # ignores the lines with a warning and still connects on the CA and name checks
    lines += [f"setenv opt peer-fingerprint {fp}" for fp in sorted({_colons(fp) for fp in pins})]
    lines += connections or _inline("tls-crypt", tls_crypt_key)
    return "\n".join(lines) + "\n"


def _colons(fingerprint: str) -> str:
    """OpenVPN's form of a SHA-256 fingerprint: hex pairs joined by colons."""
    return ":".join(fingerprint[i : i + 2] for i in range(0, len(fingerprint), 2))


def _connection(remotes: Sequence[tuple[str, int]], proto: str, tls_crypt_key: str | bytes) -> list[str]:
    """One gateway of a failover profile: a ``<connection>`` block per address (OpenVPN: one ``remote`` each) with
    its proto and the gateway's tls-crypt key; a UDP one tells the gateway when the client leaves, as a
    single-gateway profile does."""
    lines = []
    for host, port in remotes:
        lines += [
            "<connection>",
            f"remote {_check(_HOST_RE, host, 'remote host')} {_port(port, 'remote port')} {proto}",
            *(["explicit-exit-notify 1"] if proto.startswith("udp") else []),
            *_inline("tls-crypt", tls_crypt_key),
            "</connection>",
        ]
    return lines
