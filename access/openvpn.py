"""OpenVPN 2.6 configuration: the access gateway's server config and users' client profiles.

Pure rendering from plain values (strings, paths, PEM text); no crypto, no database. The gateway design
(DESIGN.md "Access", LAB.md §6): one tap server trunked into the closed clusters' VLANs with
``vlan-tagging``; each client lands untagged on the VLAN that ``client-connect`` chose (``vlan-pvid``).

Client compatibility: tap needs the OpenVPN 2.x client (Linux, macOS Tunnelblick, Windows OpenVPN GUI
2.x). OpenVPN 3 based clients (OpenVPN Connect, Android) do not support tap.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from access.gateway.state import CLUSTER_RE, VpnState

#: TLS 1.2 suites (ECDSA certificates) and TLS 1.3 suites; data channel AEAD ciphers only.
TLS12_CIPHERS = ":".join(
    [
        "TLS-ECDHE-ECDSA-WITH-AES-256-GCM-SHA384",
        "TLS-ECDHE-ECDSA-WITH-CHACHA20-POLY1305-SHA256",
        "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256",
    ]
)
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
DATA_CIPHERS = "AES-256-GCM:CHACHA20-POLY1305:AES-128-GCM"

_DEV_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9.:-]{1,253}$")


class ProfileError(ValueError):
    """A value that cannot go into an OpenVPN config (would break or inject a directive)."""


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    # fullmatch: "$" would let a trailing newline through, and the next line of the config is the value's own
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProfileError(f"invalid {what}: {value!r}")
    return value


def _plain(value: str, what: str) -> str:
    """``value`` if it has no control character (a newline would end the comment or directive it is in)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ProfileError(f"invalid {what}: {value!r} (control characters)")
    return value


def _port(value: int, what: str) -> int:
    if not 0 < int(value) < 65536:
        raise ProfileError(f"invalid {what}: {value!r} (1..65535)")
    return int(value)


#: ``Gateway.vpn_proto`` (one transport for both ends) → OpenVPN's ``proto`` of the server and of the client
_PROTOS = {
    "udp": ("udp", "udp"),
    "udp6": ("udp6", "udp6"),
    "tcp": ("tcp-server", "tcp-client"),
    "tcp6": ("tcp6-server", "tcp6-client"),
}


def _proto(proto: str, side: int) -> str:
    """OpenVPN's ``proto`` for the server (``side`` 0) or the client (1) of a gateway's ``vpn_proto``; the
    side-specific spellings are accepted as they are."""
    for pair in _PROTOS.values():
        if proto == pair[side]:
            return proto
    if proto not in _PROTOS:
        raise ProfileError(f"unsupported proto {proto!r} (one of {', '.join(_PROTOS)})")
    return _PROTOS[proto][side]


def _quoted(value: str) -> str:
    if any(c in value for c in '"\\\n\r'):
        raise ProfileError(f"cannot quote {value!r} in an OpenVPN config")
    return f'"{value}"'


def hook_command(
    verb: str, state_dir: str | Path, *, python: str = sys.executable, code_root: str | Path | None = None
) -> str:
    """The command line OpenVPN runs for a hook (``tls-verify`` or ``client-connect``).

    The hook runs as a script in isolated mode (``-I``: no PYTHONPATH, no user site, no cwd on the
    path); the script adds its own code root. ``code_root`` defaults to this checkout.
    """
    root = Path(code_root) if code_root else Path(__file__).resolve().parents[1]
    script = root / "access" / "gateway" / "vpn.py"
    return f"{python} -I {script} {verb} --state {state_dir}"


def render_server_config(
    *,
    state_dir: str | Path,
    dev: str,
    port: int = 1194,
    proto: str = "udp",
    local: str | None = None,
    python: str = sys.executable,
    code_root: str | Path | None = None,
    max_clients: int = 1024,
    keepalive: tuple[int, int] = (10, 60),
    reneg_sec: int = 3600,
    user: str | None = None,
    group: str | None = None,
    verb: int = 3,
) -> str:
    """The gateway's ``server.conf``.

    ``dev`` is a persistent tap (``ip tuntap add dev <dev> mode tap``) already plugged into the trunk
    bridge or switch port that carries the clusters' VLANs: OpenVPN writes each client's frames to it
    tagged with that client's ``vlan-pvid`` and only accepts tagged frames back. ``state_dir`` is the
    gateway state directory (:mod:`access.gateway.state`). With ``user``/``group`` OpenVPN drops
    privileges after start; the state's ``vpn/run`` directory must then belong to that user. Every
    ``reneg_sec`` each session renegotiates its keys and ``tls-verify`` runs again: a session ends there once
    its AC has expired or the gateway's state has (``GATEWAY_STATE_MAX_AGE``, which ``gateway config`` passes).
    """
    _check(_DEV_RE, dev, "tap device name")
    proto = _proto(proto, 0)
    _plain(str(state_dir), "state directory")
    st = VpnState.at(state_dir)
    lines = [
        "# VirtCloud access gateway: generated by the portal; local edits are overwritten on the next pull.",
        "mode server",
        "tls-server",
        f"dev {dev}",
        "dev-type tap",
        f"proto {proto}",
        f"port {_port(port, 'port')}",
    ]
    if local:
        lines.append(f"local {_check(_HOST_RE, local, 'listen address')}")
    lines += [
        "disable-dco",  # DCO does not do tap; say so instead of letting OpenVPN warn
        "",
        "# One trunk for every closed cluster: frames to/from the tap carry the client's VLAN tag.",
        "vlan-tagging",
        "vlan-accept tagged",
        "",
        f"ca {st.ca}",
        f"cert {st.server_cert}",
        f"key {st.server_key}",
        "dh none",
        f"tls-crypt {st.tls_crypt}",
        f"crl-verify {st.crl}",
        "verify-client-cert require",
        "remote-cert-tls client",
        "tls-version-min 1.2",
        f"tls-cipher {TLS12_CIPHERS}",
        f"tls-ciphersuites {TLS13_CIPHERSUITES}",
        f"data-ciphers {DATA_CIPHERS}",
        "",
        "# Authorization: tls-verify checks the attribute certificate, client-connect chooses the VLAN.",
        "script-security 2",
        f"tls-export-cert {st.peer_certs}",
        *(
            f"{hook} {_quoted(hook_command(hook, state_dir, python=python, code_root=code_root))}"
            # client-disconnect forgets the session's peer: the records hold the sessions that are up
            for hook in ("tls-verify", "client-connect", "client-disconnect")
        ),
        "# A user in two clusters holds two profiles with the same CN at once.",
        "duplicate-cn",
        f"max-clients {int(max_clients)}",
        "",
        f"management {st.management} unix",
        f"status {st.status} 10",
        "status-version 3",
        f"keepalive {int(keepalive[0])} {int(keepalive[1])}",
        f"reneg-sec {int(reneg_sec)}",  # tls-verify again: an expired AC or gateway state ends the session
        *(["explicit-exit-notify 1"] if proto.startswith("udp") else []),  # clients reconnect at once on restart
        "persist-key",
        "persist-tun",
        f"verb {int(verb)}",
    ]
    if user:
        lines.append(f"user {_check(_DEV_RE, user, 'user')}")
    if group:
        lines.append(f"group {_check(_DEV_RE, group, 'group')}")
    return "\n".join(lines) + "\n"


def _inline(tag: str, pem: str | bytes) -> list[str]:
    text = pem.decode() if isinstance(pem, bytes) else pem
    if f"</{tag}>" in text:
        raise ProfileError(f"inline {tag} contains its own closing tag")
    return [f"<{tag}>", text.strip(), f"</{tag}>"]


def render_client_profile(
    *,
    cluster: str,
    remote: Sequence[tuple[str, int]] | tuple[str, int],
    server_name: str,
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
) -> str:
    """A self-contained ``.ovpn`` for ``cluster`` (everything inline: CA, cert with AC, key, tls-crypt).

    ``remote`` is ``(host, port)`` or a list of them (tried in order). ``server_name`` is the gateway
    certificate's CN, pinned with ``verify-x509-name``. ``publish=True`` renders the long-lived variant
    for a user's router that bridges the cluster into the user's LAN (paper §2.2): a fixed tap name,
    ``persist-tun`` and endless retries; the router owner adds the tap to their LAN bridge.
    The result contains the private key: hand it to the user, never store or log it.
    """
    _check(CLUSTER_RE, cluster, "cluster name")
    proto = _proto(proto, 1)
    for value, what in ((user, "user name"), (expires, "expiry")):
        if value:
            _plain(value, what)
    remotes = [remote] if isinstance(remote, tuple) else list(remote)
    if not remotes:
        raise ProfileError("a profile needs at least one remote")
    dev = dev or (f"vc-{cluster}"[:15] if publish else "tap")
    _check(_DEV_RE, dev, "tap device name")
    _check(re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}"), server_name, "server name")

    head = [
        f"# VirtCloud: layer-2 access to cluster {cluster}" + (f" for {user}" if user else ""),
    ]
    if expires:
        head.append(f"# Certificate valid until {expires}; download a new profile after that.")
    head += [
        "# Needs the OpenVPN 2.x client (tap). OpenVPN 3 / OpenVPN Connect / Android do not support tap.",
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
        f"proto {proto}",
        *[f"remote {_check(_HOST_RE, h, 'remote host')} {_port(p, 'remote port')}" for h, p in remotes],
        "nobind",
        "resolv-retry infinite",
        "persist-key",
        "remote-cert-tls server",
        f"verify-x509-name {_quoted(server_name)} name",
        "tls-version-min 1.2",
        f"data-ciphers {DATA_CIPHERS}",
        "# Which cluster network to enter; the gateway checks it against the attribute certificate.",
        "push-peer-info",
        f"setenv UV_VCLUSTER {cluster}",
        "auth-nocache",
        *(["explicit-exit-notify 1"] if proto.startswith("udp") else []),  # free the gateway slot on exit
        f"verb {int(verb)}",
    ]
    if publish:
        lines += ["persist-tun", "keepalive 10 60", "connect-retry 5 300"]
    lines += _inline("ca", ca_pem) + _inline("cert", cert_pem) + _inline("key", key_pem)
    lines += _inline("tls-crypt", tls_crypt_key)
    return "\n".join(lines) + "\n"
