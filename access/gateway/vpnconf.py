"""The access gateway's OpenVPN 2.6 server configuration (``openvpn.conf``), as a pure function of plain values.

Here, in the gateway's package, because the gateway renders it too: ``gateway config`` does on the portal, and
the agent's pull does again when the portal's settings for the gateway change (:mod:`access.gateway.config`).
Standard library only. The checks shared with users' client profiles (:mod:`access.openvpn`, which re-exports
this module's names) live here as well: every value that goes into a directive is matched against a strict
pattern or quoted, so none can end the line it is in and start a directive of its own.

The design (DESIGN.md "Access", LAB.md §6): one tap server trunked into the closed clusters' VLANs with
``vlan-tagging``; each client lands untagged on the VLAN that ``client-connect`` chose (``vlan-pvid``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from access.gateway.state import VpnState

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
ACCOUNT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}\Z")  # a user or group name (``user``/``group``)


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
    root = Path(code_root) if code_root else Path(__file__).resolve().parents[2]
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
    privileges after start (``gateway config --vpn-user/--vpn-group``): it reads its keys and opens the tap, the
    management socket and the status file as root first, and ``persist-key``/``persist-tun`` keep them across its
    soft restarts; the hooks run as that account, so the state must be installed for it
    (:meth:`access.gateway.state.VpnState.ensure_dirs`, which the pull does). Every
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
        # its socket is made before the drop, as root, but mode 0777 in a directory the group may search: only
        # root's connections (the pull that cuts sessions) are answered, never the unprivileged account's
        *(["management-client-user root"] if user or group else []),
        f"status {st.status} 10",
        "status-version 3",
        f"keepalive {int(keepalive[0])} {int(keepalive[1])}",
        f"reneg-sec {int(reneg_sec)}",  # tls-verify again: an expired AC or gateway state ends the session
        # on a restart or shutdown clients reconnect at once, going on to their profile's next gateway (failover)
        *(["explicit-exit-notify 2"] if proto.startswith("udp") else []),
        "persist-key",
        "persist-tun",
        f"verb {int(verb)}",
    ]
    if user:
        lines.append(f"user {_check(ACCOUNT_RE, user, 'user')}")
    if group:
        lines.append(f"group {_check(ACCOUNT_RE, group, 'group')}")
    return "\n".join(lines) + "\n"
