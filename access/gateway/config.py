"""The gateway's own configuration — ``openvpn.conf``, ``sshd_config`` and the systemd units — from two halves.

- What the portal decides: the ``config`` section of the pulled state (``access.services.gateway_state``) —
  which services the gateway runs, OpenVPN's port and transport, the bastion's port, account and port base, and
  ``reneg_sec`` (the portal's ``GATEWAY_STATE_MAX_AGE``). An admin may change these at any time.
- What only the operator knows: ``local.json`` in the state directory — the tap on the trunk, the listen
  addresses, the Python and code that run on the gateway, the portal's URL, the token file, the trunk, the
  account OpenVPN and its hooks run as after start (``vpn_user``/``vpn_group``), and the state directory's path as
  the configs name it. ``manage.py gateway config NAME --dir D`` writes it.

``manage.py gateway config`` and the agent's pull render with the one function here (:func:`render`), so a pull
that brings changed settings rewrites the files exactly as ``gateway config`` would have (installed with the rest
of the state, see :func:`access.gateway.pull.install_state`), and the operator's ``--on-change`` hook restarts
or reloads what uses them. A state directory without ``local.json`` (made by an older ``gateway config``) keeps
its files as they are.

Pulled values are checked strictly before anything is rendered (:func:`check_portal`): numbers are ints in
range, the transport is one of four words, the account a POSIX user name — a compromised or broken portal
cannot put a newline or a quote, hence a directive of its choosing, into a file root runs. Standalone, like
the rest of :mod:`access.gateway`: standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from access.gateway import sshd, systemd, vpnconf
from access.gateway.state import OPENVPN_CONFIG, SSHD_CONFIG, RunAs, StateError

LOCAL = "local.json"  # in the state directory: the operator's half (gateway config --dir writes it)
#: in the state directory: the configuration files pulls changed that no ``--on-change`` hook has acted on yet
CONFIG_CHANGED = ".config-changed"
PROTOS = ("udp", "tcp", "udp6", "tcp6")  # access.models.VpnProto
#: the portal's half: name -> (lowest, highest) for the numbers; the rest are checked one by one
_NUMBERS = {"vpn_port": (1, 65535), "ssh_port": (1, 65535), "ssh_port_base": (0, 65535 - 4094)}
_NUMBERS["reneg_sec"] = (60, 7 * 24 * 3600)  # GATEWAY_STATE_MAX_AGE's range in the portal's settings
PORTAL_FIELDS = ("serves_vpn", "serves_ssh", "vpn_proto", "ssh_user", *_NUMBERS)
#: the operator's half: those that may be null (None: OpenVPN listens on every address; <state>/token; no trunk;
#: OpenVPN and its hooks stay root — also what a local.json written before they existed means)
_OPTIONAL = ("vpn_local", "token_file", "trunk", "vpn_user", "vpn_group")
LOCAL_FIELDS = ("state_dir", "dev", "ssh_listen", "python", "code_root", "portal_url", *_OPTIONAL)


class LocalConfigError(ValueError):
    """``local.json`` is unreadable or holds a value no config can take (the gateway's own doing, not the
    portal's: the state is installed anyway, the configuration files stay as they are)."""


def check_portal(section: object, *, vpn: bool, ssh: bool) -> dict:
    """The pulled ``config`` section, checked whole; :class:`StateError` for anything else. ``vpn``/``ssh``: whether
    the document has that section (the services it names must be the ones it carries the state of). Unknown
    keys are left out (a newer portal's); a missing or malformed one refuses the document."""
    if not isinstance(section, dict):
        raise StateError("state document: config is not a map")
    out: dict = {}
    for key, (lowest, highest) in _NUMBERS.items():
        value = section.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not lowest <= value <= highest:
            raise StateError(f"state document: config.{key} is not a number from {lowest} to {highest}: {value!r:.80}")
        out[key] = value
    for key, has in (("serves_vpn", vpn), ("serves_ssh", ssh)):
        if section.get(key) is not has:
            raise StateError(f"state document: config.{key} is not {has} (the document's sections say so)")
        out[key] = has
    proto = section.get("vpn_proto")
    if proto not in PROTOS:
        raise StateError(f"state document: config.vpn_proto is not one of {', '.join(PROTOS)}: {proto!r:.80}")
    out["vpn_proto"] = proto
    try:
        out["ssh_user"] = sshd.check_account(section.get("ssh_user"))
    except sshd.SshdConfigError as exc:
        raise StateError(f"state document: config.ssh_user: {str(exc):.120}") from None
    return out


def check_local(doc: object) -> dict:
    """``local.json``'s content, checked; :class:`LocalConfigError` otherwise. (The renderers check each value
    against what its directive takes as well.)"""
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise LocalConfigError("not a format-1 map")
    out = {}
    for key in LOCAL_FIELDS:
        value = doc.get(key)
        if value is None and key in _OPTIONAL:
            out[key] = None
            continue
        if not isinstance(value, str) or not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise LocalConfigError(f"{key} is not a line of text: {value!r:.80}")
        out[key] = value
    if (out["vpn_user"] is None) != (out["vpn_group"] is None):
        raise LocalConfigError("vpn_user and vpn_group are given together (or neither: OpenVPN stays root)")
    for key in ("vpn_user", "vpn_group"):
        if out[key] is not None and not vpnconf.ACCOUNT_RE.match(out[key]):
            raise LocalConfigError(f"{key} is not a user or group name: {out[key]!r:.80}")
    return out


def run_as(local: dict | None) -> RunAs | None:
    """Who OpenVPN and its hooks run as after start, by ``local.json`` (None: root throughout);
    :class:`LookupError` when this host has no such user or group."""
    if not local or not local["vpn_user"]:
        return None
    return RunAs.lookup(local["vpn_user"], local["vpn_group"])


def local_json(local: dict) -> str:
    """``local.json``'s text for the operator's choices (as :func:`check_local` reads it back)."""
    return json.dumps({"format": 1, **check_local({"format": 1, **local})}, indent=1, sort_keys=True) + "\n"


def local_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / LOCAL


def load_local(state_dir: str | os.PathLike[str]) -> dict | None:
    """The operator's half from the state directory; None without ``local.json`` (a directory made by an older
    ``gateway config``); :class:`LocalConfigError` when it is unreadable or malformed."""
    path = local_path(state_dir)
    try:
        return check_local(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # (LocalConfigError is a ValueError)
        raise LocalConfigError(f"{path}: {exc}") from None


def render(portal: dict, local: dict) -> dict[str, str]:
    """File name (relative to the state directory) -> text of the gateway's configuration: ``openvpn.conf`` when it
    serves VPN, ``sshd_config`` when it serves SSH, and its systemd units under ``systemd/``. ``ValueError``
    (the renderers') for a value a directive cannot take."""
    state_dir = Path(local["state_dir"])
    configs = {}
    if portal["serves_vpn"]:
        configs[OPENVPN_CONFIG] = vpnconf.render_server_config(
            state_dir=state_dir,
            dev=local["dev"],
            port=portal["vpn_port"],
            proto=portal["vpn_proto"],
            local=local["vpn_local"],
            python=local["python"],
            code_root=local["code_root"],
            reneg_sec=portal["reneg_sec"],
            user=local["vpn_user"],
            group=local["vpn_group"],
        )
    if portal["serves_ssh"]:
        configs[SSHD_CONFIG] = sshd.render_sshd_config(
            state_dir=state_dir,
            listen=[(local["ssh_listen"], portal["ssh_port"])],
            account=portal["ssh_user"],
            pid_file=state_dir / "ssh" / "sshd.pid",
            # a bastion per cluster: bastion.py adds each cluster's own command (exactly one per sshd)
            principals_command=not portal["ssh_port_base"],
        )
    units = systemd.render_units(
        state_dir=state_dir,
        code_root=local["code_root"],
        python=local["python"],
        portal_url=local["portal_url"],
        token_file=local["token_file"],
        serves_vpn=portal["serves_vpn"],
        serves_ssh=portal["serves_ssh"],
        ssh_port_base=portal["ssh_port_base"],
        ssh_listen=local["ssh_listen"],
        trunk=local["trunk"],
        tap=local["dev"],
    )
    configs.update({f"systemd/{name}": text for name, text in units.items()})
    return configs


def pending(state_dir: str | os.PathLike[str]) -> list[str]:
    """The configuration files that pulls changed and no ``--on-change`` hook has acted on yet."""
    try:
        return (Path(state_dir) / CONFIG_CHANGED).read_text().split()
    except FileNotFoundError:
        return []
