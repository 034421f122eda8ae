"""Install the state document a gateway pulled from the portal, then cut the sessions it says to cut.

The document is what ``access.services.gateway_state`` returns (format 1)::

    {"format": 1, "gateway": "gw1", "gateway_id": 1, "etag": "...", "generated_at": "...", "max_age": 600,
     "vpn": {"ca": PEM, "aa": PEM, "crl": PEM, "vlans": {"c42": 142}, "server_name": "...",
             "revoked_sessions": [{"serial": 17, "common_name": "alice", "revoked_at": "..."}]},
     "ssh": {"account": "virtcloud", "user_ca": "ssh-ed25519 ...", "host_ca": "ssh-ed25519 ...",
             "revoked_sessions": [{"serial": 23, "common_name": "alice", "revoked_at": "..."}],
             "krl": base64, "clusters": {"c42": {"vlan": 142, "principals": ["c42.alice"],
                                               "targets": [["198.18.61.11", 22]], "nodes": [...]}}},
     "config": {"serves_vpn": true, "serves_ssh": true, "vpn_port": 1194, "vpn_proto": "udp", "ssh_port": 22,
                "ssh_port_base": 0, "ssh_user": "virtcloud", "reneg_sec": 600}}

``config``, the portal's settings for the gateway, is rendered with ``local.json`` (the operator's choices) into
``openvpn.conf``, ``sshd_config`` and the systemd units (:mod:`access.gateway.config`), installed with the rest:
a pull that brings changed settings rewrites them, and lists them for the ``--on-change`` hook
(``.config-changed``) until one has run.

Everything is validated before anything is written, so a bad document leaves the last good state in
place (the gateway keeps working while the portal is down or broken, up to the state's ``max_age``). The
files are replaced together: all the new ones are written first, and only then does any replace its old one
(a full disk leaves the old set whole). Standalone: no Django; run it from cron or a systemd timer after
fetching the document::

    python3 -I access/gateway/pull.py --state /var/lib/virtcloud-gateway [--fetched-at EPOCH] < state.json

(``--fetched-at``: when the fetch started, this host's clock; the state is trusted for its ``max_age`` from
then, or from its ``generated_at`` without it.)
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from access.gateway import config as gateway_config  # noqa: E402
from access.gateway import management, sshd, systemd  # noqa: E402
from access.gateway.state import (  # noqa: E402
    CLUSTER_RE,
    OPENVPN_CONFIG,
    SSHD_CONFIG,
    RunAs,
    SshState,
    StateError,
    VpnState,
    check_bastion_address,
    check_fresh,
    check_vlan_entry,
    fresh_until_path,
    fresh_until_text,
    installed_path,
    leg_unusable,
    load_vlan_map,
    revoked_serials,
    vlan_map_json,
    write_all_atomic,
    write_atomic,
)
from access.gateway.vpn import forget_sessions, recorded_serials, session_owner, session_peers  # noqa: E402
from access.gateway.vpn import sessions as vpn_sessions  # noqa: E402

_KRL_MAGIC = b"SSHKRL\n\x00"
#: per service, the configuration files that run it (relative to the state directory): removed once the portal's
#: document no longer carries that service, so that the ``--on-change`` hook (told of them) stops it
SERVICE_CONFIGS = {
    "vpn": (OPENVPN_CONFIG, f"systemd/{systemd.OPENVPN}.service"),
    "ssh": (
        SSHD_CONFIG,
        f"systemd/{systemd.SSHD}.service",
        f"systemd/{systemd.BASTION}.service",
        f"systemd/{systemd.SSH_DROP_IN}",
    ),
}
SERVICE_NAMES = {"vpn": "VPN (OpenVPN)", "ssh": "SSH (the bastion)"}
_NODE_FIELD_RE = re.compile(r"^[A-Za-z0-9._:-]{1,253}\Z")


@dataclass
class InstallReport:
    """What an install changed, for the pull command's log line."""

    written: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)  # configuration files rewritten (relative to the state dir)
    notes: list[str] = field(default_factory=list)  # what the operator should know about them (the pull says it)
    cut: list[int] = field(default_factory=list)  # OpenVPN certificate serials whose sessions were cut
    ssh_cut: list[int] = field(default_factory=list)  # SSH certificate serials whose bastion logins were cut
    cut_errors: list[str] = field(default_factory=list)


def _pem(value: object, kind: str, what: str) -> str:
    """A PEM certificate or CRL as it will be used: parsed, not only its armor looked at — a corrupt one written
    would have refused every connection (tls-verify, OpenVPN's crl-verify) until the next good pull."""
    if not isinstance(value, str) or f"-----BEGIN {kind}-----" not in value:
        raise StateError(f"state document: {what} is not a PEM {kind}")
    from cryptography import x509  # (here: the hooks that need none start faster)

    load = x509.load_pem_x509_crl if kind == "X509 CRL" else x509.load_pem_x509_certificates
    try:
        load(value.encode())
    except ValueError as exc:
        raise StateError(f"state document: {what} is not a valid PEM {kind}: {exc}") from None
    return value if value.endswith("\n") else value + "\n"


def _ssh_key(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value.split()) < 2 or not value.startswith(("ssh-", "ecdsa-")):
        raise StateError(f"state document: {what} is not an OpenSSH public key line")
    return value.strip() + "\n"


def _section(doc: dict, name: str) -> dict:
    value = doc[name]
    if not isinstance(value, dict):
        raise StateError(f"state document: {name} is not a map")
    return value


def _revoked_serials(v: dict, section: str = "vpn") -> set[int]:
    try:
        return {int(r["serial"]) for r in v.get("revoked_sessions", []) if "serial" in r}
    except (TypeError, ValueError, OverflowError):
        raise StateError(f"state document: {section}.revoked_sessions is not a list of {{serial: ...}}") from None


def _freshness(doc: dict) -> tuple[str, int, float]:
    """(etag, max_age, generated_at as seconds since the epoch) of a state document."""
    max_age = doc.get("max_age")
    if not isinstance(max_age, int) or isinstance(max_age, bool) or not 0 < max_age <= 366 * 24 * 3600:
        raise StateError("state document: max_age is not a number of seconds")
    try:
        generated = dt.datetime.fromisoformat(str(doc.get("generated_at", "")))
    except ValueError:
        raise StateError("state document: generated_at is not an ISO 8601 time") from None
    if generated.tzinfo is None:
        raise StateError("state document: generated_at has no time zone")
    return str(doc.get("etag", "")), max_age, generated.timestamp()


def _prepare(
    doc: dict, vpn: VpnState, ssh: SshState, *, state_dir: Path, fetched_at: float | None
) -> tuple[dict[Path, tuple], dict | None]:
    """The files of ``doc`` (path -> (content, mode[, group])) and its checked ``config`` section (None: the portal
    sends none); :class:`StateError` when anything in it is malformed."""
    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise StateError("state document has an unknown format (want format 1)")
    etag, max_age, generated = _freshness(doc)
    gateway, gateway_id = doc.get("gateway"), doc.get("gateway_id")
    if gateway is not None and not isinstance(gateway, str):
        raise StateError("state document: gateway is not a name")
    if gateway_id is not None and (not isinstance(gateway_id, int) or isinstance(gateway_id, bool)):
        raise StateError("state document: gateway_id is not a number")
    installed = {"etag": etag, "generated_at": doc["generated_at"], "max_age": max_age}
    installed |= {key: value for key, value in (("gateway", gateway), ("gateway_id", gateway_id)) if value is not None}
    portal = None
    if "config" in doc:
        portal = gateway_config.check_portal(doc["config"], vpn="vpn" in doc, ssh="ssh" in doc)
        installed["config"] = portal  # (the next pull says once that a state directory without local.json ignores it)
    files: dict[Path, tuple] = {
        installed_path(state_dir): (json.dumps(installed).encode(), 0o644),
        # From the start of the pull that fetched it (this host's clock), or from when the portal made it.
        fresh_until_path(state_dir): (fresh_until_text((fetched_at or generated) + max_age).encode(), 0o644),
    }
    if "vpn" in doc:
        v = _section(doc, "vpn")
        vlans = v.get("vlans")
        if not isinstance(vlans, dict):
            raise StateError("state document: vpn.vlans is not a map")
        # all read by OpenVPN (the CRL) or its hooks after OpenVPN has dropped its privileges
        files[vpn.ca] = (_pem(v.get("ca"), "CERTIFICATE", "vpn.ca").encode(), *vpn.readable)
        files[vpn.aa] = (_pem(v.get("aa"), "CERTIFICATE", "vpn.aa").encode(), *vpn.readable)
        files[vpn.crl] = (_pem(v.get("crl"), "X509 CRL", "vpn.crl").encode(), *vpn.readable)
        stamp = str(doc.get("generated_at", ""))
        files[vpn.vlans] = (vlan_map_json(vlans, generated_at=stamp).encode(), *vpn.readable)
        files[vpn.revoked] = (json.dumps(sorted(_revoked_serials(v))).encode(), *vpn.readable)
    if "ssh" in doc:
        s = _section(doc, "ssh")
        try:
            krl = base64.b64decode(s.get("krl", ""), validate=True)
        except (TypeError, ValueError):
            raise StateError("state document: ssh.krl is not base64") from None
        if not krl.startswith(_KRL_MAGIC):
            raise StateError("state document: ssh.krl is not an OpenSSH KRL")
        clusters = s.get("clusters")
        if not isinstance(clusters, dict):
            raise StateError("state document: ssh.clusters is not a map")
        grants = []
        try:
            for entry in clusters.values():
                targets = [(str(h), int(p)) for h, p in entry.get("targets", [])]
                grants += [sshd.PrincipalGrant(p, targets) for p in entry.get("principals", [])]
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise StateError("state document: ssh.clusters entries need principals and [host, port] targets") from None
        legs = _legs(clusters)
        for label, entry in clusters.items():
            _check_targets(label, entry.get("targets", []), legs[label])
        try:
            principals = sshd.render_principals_file(grants)
            account = sshd.check_account(s.get("account"))
        except sshd.SshdConfigError as exc:
            raise StateError(f"state document: ssh section: {exc}") from None
        except (TypeError, ValueError):  # a principal or an account that is not a string
            raise StateError("state document: ssh section: principals and the account must be strings") from None
        files[ssh.user_ca] = (_ssh_key(s.get("user_ca"), "ssh.user_ca").encode(), 0o644)
        files[ssh.root / "host_ca.pub"] = (_ssh_key(s.get("host_ca"), "ssh.host_ca").encode(), 0o644)
        files[ssh.krl] = (krl, 0o644)
        files[ssh.revoked] = (json.dumps(sorted(_revoked_serials(s, "ssh"))).encode(), 0o644)
        files[ssh.principals(account)] = (principals.encode(), 0o644)
        # the bastion's account renamed in the portal: the old account's file (which the sshd still running as it,
        # until restarted, reads) is emptied — kept, its last grants stayed valid with every pull renewing the
        # state's freshness, ended clusters' and revoked grants included
        with contextlib.suppress(FileNotFoundError):
            for path in ssh.principals_dir.iterdir():
                if path.name != account and not path.name.startswith(".") and path.is_file() and not path.is_symlink():
                    if path.stat().st_size:
                        files[path] = (b"", 0o644)
        files[ssh.principals_command] = (sshd.render_principals_command(state_dir).encode(), 0o755)
        stamp = str(doc.get("generated_at", ""))
        files[ssh.clusters] = (
            json.dumps({"format": 1, "generated_at": stamp, "clusters": legs}, indent=1, sort_keys=True).encode(),
            0o644,
        )
    return files, portal


def _configs(
    state_dir: Path, portal: dict | None, previous: dict | None
) -> tuple[dict[Path, tuple[bytes, int]], list[str]]:
    """The configuration files rendered from the pulled settings and ``local.json`` (compared with the files on
    disk by the caller: only those that differ are written), and what to tell the operator. Without
    ``local.json`` nothing is rendered, and that is said once per change of the settings (``previous``: the
    installed state's record)."""
    if portal is None:  # a portal that sends no settings: the files stay as gateway config wrote them
        return {}, []
    try:
        local = gateway_config.load_local(state_dir)
    except gateway_config.LocalConfigError as exc:
        return {}, [f"the configuration files stay as they are: {exc}"]
    if local is None:
        if previous is not None and previous.get("config") == portal:
            return {}, []
        return {}, [
            f"no {gateway_config.LOCAL} in {state_dir} (it was set up by an older `gateway config`): openvpn.conf, "
            "sshd_config and the units stay as they are and do not follow the portal's settings; run "
            "`manage.py gateway config NAME --dir` once to have the pulls keep them current"
        ]
    try:
        texts = gateway_config.render(portal, local)
    except ValueError as exc:  # a value of local.json's (the pulled ones are checked)
        return {}, [f"the configuration files stay as they are: cannot render them from {gateway_config.LOCAL}: {exc}"]
    notes = []
    vpn, ssh = VpnState.at(state_dir), SshState.at(state_dir)
    if portal["serves_vpn"] and not vpn.server_key.exists():
        notes.append("the portal has this gateway serve VPN, but it has no TLS key: enrol it (gateway config --dir)")
    if portal["serves_ssh"] and not ssh.host_key.exists():
        notes.append("the portal has this gateway serve SSH, but it has no host key: enrol it (gateway config --dir)")
    return {state_dir / name: (text.encode(), 0o644) for name, text in texts.items()}, notes


def _run_as(state_dir: Path) -> tuple[RunAs | None, dict | None, list[str], bool]:
    """Who OpenVPN and its hooks run as after start, by ``local.json`` (None: root throughout, also without it),
    ``local.json``, what to tell the operator, and whether to leave the VPN state's owners and modes as they are.

    A ``local.json`` that cannot be used — malformed (which :func:`_configs` says too), or naming a user or group
    this host lacks — does not hand the VPN state to root: ``openvpn.conf`` still has OpenVPN drop to the account
    it names, which could then no longer read the CRL (every client refused). The account the state is set up for
    (:meth:`VpnState.current_run_as`, its owners on disk) is kept, and its owners and modes are left alone."""
    try:
        local = gateway_config.load_local(state_dir)
    except gateway_config.LocalConfigError as exc:
        local, problem = None, f"{exc}"
    else:
        try:
            return gateway_config.run_as(local), local, [], False
        except LookupError as exc:
            problem = f"OpenVPN cannot run as {local['vpn_user']}:{local['vpn_group']} ({exc})"
    vpn = VpnState.at(state_dir)
    if not vpn.root.is_dir():  # nothing set up yet to keep
        return None, local, [f"{problem}: the VPN state is root's only"], False
    kept = vpn.current_run_as()
    return (
        kept,
        local,
        [
            f"{problem}: the VPN state stays set up for {kept or 'root'} (its owners and modes as they are) "
            f"until {gateway_config.LOCAL} can be used"
        ],
        True,
    )


def _unreachable(vpn: VpnState, local: dict) -> list[str]:
    """What OpenVPN's hooks, once they run as ``vpn.run_as``, cannot reach — the state, their script, their Python
    (every client would be refused) — for the operator."""
    hook = Path(local["code_root"]) / "access" / "gateway" / "vpn.py"
    notes = []
    for path, what, bits in ((vpn.crl, "the state", 4), (hook, "their script", 4), (local["python"], "Python", 1)):
        problem = vpn.run_as.cannot_reach(path, bits)
        if problem:
            notes.append(f"OpenVPN's hooks run as {vpn.run_as}, who cannot reach {what} ({problem}): all are refused")
    return notes


@dataclass
class _Dropped:
    """What a pull does for the services the portal no longer has the gateway serve (its document lacks their
    section): their authorization state emptied, their configuration files removed."""

    services: list[str] = field(default_factory=list)  # "vpn", "ssh": not in the document
    files: dict[Path, tuple] = field(default_factory=dict)  # the emptied state (written with the rest)
    removed: dict[str, list[Path]] = field(default_factory=dict)  # per service, its configuration files (removed
    # after the writes)


def _dropped(doc: dict, state_dir: Path, vpn: VpnState, ssh: SshState) -> _Dropped:
    """Fail closed, per service, for a service the document no longer carries (an admin switched the gateway from
    both to one of them): its hooks would otherwise keep going by the last state it had, renewed by every pull — a
    VLAN map naming clusters that ended (their VLANs may be another cluster's now), principals of ended grants. So
    the VPN's VLAN map is emptied (client-connect refuses everyone), the bastion's principals files and cluster map
    too (no login, no leg), and the files that run the service go (the caller cuts the sessions it recorded)."""
    out = _Dropped()
    stamp = str(doc.get("generated_at", ""))
    if "vpn" not in doc:
        out.services.append("vpn")
        if _has_clusters(vpn.vlans, load_vlan_map):
            out.files[vpn.vlans] = (vlan_map_json({}, generated_at=stamp).encode(), *vpn.readable)
    if "ssh" not in doc:
        out.services.append("ssh")
        try:
            principals = [p for p in ssh.principals_dir.iterdir() if not p.name.startswith(".")]
        except FileNotFoundError:
            principals = []
        for path in principals:
            if path.is_file() and not path.is_symlink() and path.stat().st_size:
                out.files[path] = (b"", 0o644)
        if _has_clusters(ssh.clusters, lambda path: json.loads(path.read_bytes()).get("clusters")):
            empty = {"format": 1, "generated_at": stamp, "clusters": {}}
            out.files[ssh.clusters] = (json.dumps(empty, indent=1, sort_keys=True).encode(), 0o644)
    for service in out.services:
        out.removed[service] = [state_dir / name for name in SERVICE_CONFIGS[service] if (state_dir / name).is_file()]
    return out


def _has_clusters(path: Path, load) -> bool:
    """Whether the cluster map at ``path`` grants anything (an unreadable one counts: it is replaced)."""
    if not os.path.lexists(path):
        return False
    try:
        return bool(load(path))
    except (OSError, StateError, ValueError, AttributeError):
        return True


def _legs(clusters: dict) -> dict[str, dict]:
    """``ssh/clusters.json``'s clusters: per cluster its VLAN (when the portal says), the bastion's address in
    it (``bastion_address``, "" when the scheduler gave none) and nodes (name, alias and the address the
    bastion forwards to) — what a hook needs to give the bastion a leg in each cluster and
    to resolve the node aliases. Validated like everything else: a hook run as root reads it."""
    out = {}
    for label, entry in clusters.items():
        vlan = entry.get("vlan")
        if vlan is not None:
            check_vlan_entry(label, vlan, "ssh/clusters.json")
        elif not isinstance(label, str) or not CLUSTER_RE.match(label):
            raise StateError(f"state document: invalid cluster name {label!r}")
        nodes = []
        for node in entry.get("nodes", []):
            fields = [node.get(k) if isinstance(node, dict) else None for k in ("name", "alias", "address")]
            if not all(isinstance(f, str) and _NODE_FIELD_RE.match(f) for f in fields):
                raise StateError(f"state document: ssh.clusters.{label}.nodes: a node needs name, alias and address")
            nodes.append(dict(zip(("name", "alias", "address"), fields, strict=True)))
        bastion = check_bastion_address(label, entry.get("bastion_address") or "")
        out[label] = {"vlan": vlan, "bastion_address": bastion, "nodes": nodes}
    return out


def _check_targets(label: str, targets: list, leg: dict) -> None:
    """The bastion forwards only through its leg into the cluster: a target is an address in the network of
    the leg's address (none without a leg), or one of the cluster's node aliases (the operator's resolver maps
    them into that network). Any other address would be reached through the gateway's other routes — its own
    services, another network — so it is refused whatever the portal sent (:class:`StateError`). Nor the leg's own
    address (a forwarding to it reaches the gateway's own services over loopback), nor an IPv4 network's network
    or broadcast address."""
    bastion = leg["bastion_address"]
    aliases = {node["alias"] for node in leg["nodes"]}
    network = ipaddress.ip_interface(bastion).network if bastion else None
    unusable = leg_unusable(bastion) if bastion else set()
    for host, _port in targets:
        if not isinstance(host, str):
            raise StateError(f"state document: ssh.clusters.{label}: a target host is not a string")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            inside = host in aliases
        else:
            if address in unusable:
                raise StateError(
                    f"state document: ssh.clusters.{label}: target {host} is the bastion leg's own address, or "
                    f"{network}'s network or broadcast address"
                )
            inside = network is not None and address in network
        if not inside:
            where = f"in {network}" if network else "an address (the cluster has no bastion address)"
            raise StateError(f"state document: ssh.clusters.{label}: target {host} is neither {where} nor a node alias")


@contextlib.contextmanager
def _serialized(state_dir: Path):
    """One install (or refresh, or cut) of ``state_dir`` at a time, across processes: the agent's pull and the
    portal's own install after a revocation (a gateway on the portal's host) never interleave their files."""
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    # (read-only, world-readable: the agent as root and the portal as its own account lock the same file)
    fd = os.open(state_dir / ".install.lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # (the lock goes with it)


def _installed_generated(state_dir: Path) -> tuple[float, str] | None:
    """When the installed state was made (its ``generated_at``: seconds, and as written), or None."""
    try:
        text = str(json.loads(installed_path(state_dir).read_bytes())["generated_at"])
        return dt.datetime.fromisoformat(text).timestamp(), text
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None


def install_state(
    state_dir: str | Path, doc: dict, *, cut_sessions: bool = True, fetched_at: float | None = None
) -> InstallReport:
    """Validate ``doc`` fully, then write its files; then cut live sessions of revoked certificates.

    The state is trusted until ``max_age`` after ``fetched_at`` (when the pull that got it started, this host's
    clock) or, without it, after the document's ``generated_at`` (the portal's clock): ``fresh-until``.

    The CRL and the list of revoked serials are installed *before* sessions are cut: the client's reconnect
    meets the new CRL, and a client that passed the old CRL just before is refused by ``client-connect``.
    Every session of a revoked certificate is cut (the same profile may be up in several places), once:
    their record is dropped after; an unreachable management socket is reported, not fatal (the next pull
    tries again). A malformed document is a :class:`StateError`, and nothing is written.

    With ``local.json`` in ``state_dir``, the configuration files rendered from the document's ``config`` and it
    belong to the set (those that differ from the files on disk: ``report.configs``), and ``.config-changed``
    lists them until an ``--on-change`` hook has run (:mod:`access.gateway.agent`).

    A service the document no longer carries (``vpn`` or ``ssh`` missing: the gateway no longer serves it) fails
    closed by itself: its cluster maps are emptied, the sessions it recorded cut, and its configuration files
    (``openvpn.conf``, ``sshd_config`` and their units) removed and listed in ``report.configs`` like a change,
    so that the hook stops what ran them (:func:`_dropped`).

    One install at a time (a lock in ``state_dir``), and never an older document over a newer one (the agent's
    pull fetched before a revocation, installed after the portal's own install of the revocation): it is left
    out, said in ``report.notes`` — the CRL, the revoked serials and the VLAN map never go back in time.
    """
    state_dir = Path(state_dir)
    with _serialized(state_dir):
        return _install_state(state_dir, doc, cut_sessions=cut_sessions, fetched_at=fetched_at)


def _install_state(state_dir: Path, doc: dict, *, cut_sessions: bool, fetched_at: float | None) -> InstallReport:
    run_as, local, notes, keep_owners = _run_as(state_dir)
    vpn, ssh = VpnState.at(state_dir, run_as), SshState.at(state_dir)
    try:
        files, portal = _prepare(doc, vpn, ssh, state_dir=state_dir, fetched_at=fetched_at)
        configs, config_notes = _configs(state_dir, portal, installed(state_dir))
        notes += config_notes
        files.update(configs)
        revoked = _revoked_serials(doc["vpn"]) if "vpn" in doc else set()
        ssh_revoked = _revoked_serials(doc["ssh"], "ssh") if "ssh" in doc else set()
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as exc:
        raise StateError(f"state document is malformed ({type(exc).__name__}: {exc})") from None
    had = installed(state_dir)
    if (
        had is not None
        and None not in (had.get("gateway_id"), doc.get("gateway_id"))
        and (had["gateway_id"] != doc["gateway_id"])
    ):
        # another gateway's token (two set up together): its VLAN map is for its trunk and site, where the same id
        # may be another cluster's — a user of one of its clusters would be put on that VLAN here (by id: a
        # gateway renamed in the portal is still this one)
        raise StateError(
            f"state document: it is gateway {doc.get('gateway')}'s, and this state directory is gateway "
            f"{had.get('gateway')}'s (the token is another gateway's)"
        )
    newest = _installed_generated(state_dir)
    if newest is not None and _freshness(doc)[2] < newest[0]:
        return InstallReport(
            notes=[f"a newer state ({newest[1]}) is installed already: this one ({doc['generated_at']}) is left out"]
        )
    dropped = _dropped(doc, state_dir, vpn, ssh)
    files.update(dropped.files)
    report = InstallReport(notes=notes)
    state_dir.mkdir(mode=0o755, parents=True, exist_ok=True)  # (fresh-until lives at its top)
    if "vpn" in doc and not keep_owners:
        report.notes += vpn.ensure_dirs()
    if "ssh" in doc:
        ssh.ensure_dirs()
        sshd.prepare_sessions_dir(ssh, doc["ssh"]["account"])
        sshd.prune_sessions(ssh)
    changed = {}
    for path, entry in files.items():  # (data, mode[, group]): ensure_dirs gave the others theirs
        try:
            unchanged = path.read_bytes() == entry[0]
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            changed[path] = entry
    report.configs = sorted(
        {str(path.relative_to(state_dir)) for path in changed if path in configs}
        | {str(path.relative_to(state_dir)) for paths in dropped.removed.values() for path in paths}
    )
    if report.configs:  # until a hook has acted on them (restarted what reads them), with the rest of the set
        waiting = sorted(set(gateway_config.pending(state_dir)) | set(report.configs))
        changed[state_dir / gateway_config.CONFIG_CHANGED] = ("\n".join(waiting).encode() + b"\n", 0o644)
        for path in configs:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)  # (systemd/)
    # the record of what is installed and its freshness replace theirs last: a rename that fails half-way (a file
    # made immutable, a bind mount) leaves the old record, and the state goes on ageing towards refusing everyone
    # (renamed first, they made a half-installed state fresh again at every pull, and the portal counted it)
    record = (installed_path(state_dir), fresh_until_path(state_dir))
    changed = {path: entry for path, entry in changed.items() if path not in record} | {
        path: changed[path] for path in record if path in changed
    }
    write_all_atomic(changed)
    report.written += [str(path) for path in changed]
    for path in (path for paths in dropped.removed.values() for path in paths):
        path.unlink(missing_ok=True)  # (after the emptied state is in place: what restarts meanwhile admits nobody)
    if vpn.run_as and local and "vpn" in doc:
        report.notes += _unreachable(vpn, local)
    if cut_sessions and "vpn" in doc:
        _cut(vpn, revoked, report)
        _cut_unmapped(vpn, report)
    if cut_sessions and "ssh" in doc:
        _cut_ssh(ssh, ssh_revoked, report)
    for service in dropped.services:
        cut_before = len(report.cut) + len(report.ssh_cut)
        if cut_sessions:
            _cut_all(vpn if service == "vpn" else ssh, report)
        emptied = [path for path in dropped.files if path.is_relative_to(state_dir / service)]
        cut = len(report.cut) + len(report.ssh_cut) - cut_before
        removed = [str(path.relative_to(state_dir)) for path in dropped.removed[service]]
        if emptied or cut or removed:
            report.notes.append(
                f"the portal no longer has this gateway serve {SERVICE_NAMES[service]}: it refuses everyone there "
                f"(emptied {', '.join(str(p.relative_to(state_dir)) for p in emptied) or 'nothing more'}; "
                f"cut {cut} certificate(s)' sessions)"
                + (f"; removed {', '.join(removed)}: stop what ran them" if removed else "")
            )
    return report


def installed(state_dir: str | Path) -> dict | None:
    """etag, generated_at and max_age of the installed state, or None (none installed, or by an older version:
    the next pull fetches the whole state)."""
    try:
        record = json.loads(installed_path(state_dir).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("max_age"), int) or not record.get("etag"):
        return None
    return record


def refresh(state_dir: str | Path, *, fetched_at: float) -> None:
    """The portal answered that the installed state is current (304): trust it for its ``max_age`` from the
    start of that pull."""
    with _serialized(Path(state_dir)):
        record = installed(state_dir)
        if record is None:
            raise StateError(f"no record of the installed state in {state_dir}: pull it whole")
        write_atomic(fresh_until_path(state_dir), fresh_until_text(fetched_at + record["max_age"]), 0o644)


def fail_closed(state_dir: str | Path, *, now: float | None = None) -> InstallReport | None:
    """When the installed state has expired (no successful pull for its ``max_age``): cut every live OpenVPN
    session and bastion login this gateway recorded — a cluster may have ended and its VLAN gone to another
    one since — and return what was cut; None while the state is still fresh. (New connections and logins are
    refused by the hooks themselves, see :func:`access.gateway.state.check_fresh`.)"""
    with _serialized(Path(state_dir)):
        return _fail_closed(state_dir, now)


def _fail_closed(state_dir: str | Path, now: float | None) -> InstallReport | None:
    try:
        check_fresh(state_dir, now)
    except StateError:
        pass
    else:
        return None
    report = InstallReport()
    _cut_all(VpnState.at(state_dir), report)
    _cut_all(SshState.at(state_dir), report)
    return report


def _cut_all(state: VpnState | SshState, report: InstallReport) -> None:
    """Cut every live session of one service this gateway recorded (its state no longer admits anyone). An
    OpenVPN client is told to reconnect (``RESTART``), not to exit: nothing says its user lost the access — this
    gateway's state went stale, or it no longer serves the VPN — so a failover profile moves on to its next
    gateway and a router's profile keeps trying until this one admits it again."""
    try:
        if isinstance(state, VpnState):
            _cut(state, recorded_serials(state), report, message="RESTART")
        else:
            _cut_ssh(state, sshd.recorded_serials(state), report)
    except OSError as exc:
        report.cut_errors.append(f"cannot cut the sessions recorded in {state.sessions}: {exc}")


def cut_revoked(state_dir: str | Path) -> InstallReport:
    """Cut the live sessions of the certificates the installed state lists as revoked lately, and those on a
    cluster its VLAN map no longer holds, without a new document: a pull that finds the state unchanged (304)
    still retries a cut that failed (the management socket did not answer) and reaches a session recorded after
    the cut (its client-connect had passed the old list just before the pull)."""
    with _serialized(Path(state_dir)):
        return _cut_revoked(state_dir)


def _cut_revoked(state_dir: str | Path) -> InstallReport:
    vpn, ssh = VpnState.at(state_dir), SshState.at(state_dir)
    report = InstallReport()
    for state, cut in ((vpn, _cut), (ssh, _cut_ssh)):
        try:
            revoked = revoked_serials(state.revoked)
        except ValueError as exc:  # (written by install_state: not expected)
            report.cut_errors.append(f"unreadable {state.revoked}: {exc}")
            continue
        cut(state, revoked, report)
    if vpn.vlans.exists():
        _cut_unmapped(vpn, report)  # (one whose cut failed, or that connected just before the map changed)
    return report


def _kill(
    vpn: VpnState, serial: int, peers: list[tuple[str, str]], report: InstallReport, *, message: str = "HALT"
) -> bool:
    """Kill these sessions of certificate ``serial`` through the management interface (recorded in ``report``),
    the client told ``message`` (``HALT``: exit, ``RESTART``: reconnect); whether the interface answered."""
    try:
        owner = session_owner(vpn, serial)
        if management.kill_peers(vpn.management, peers, common_name=owner, message=message):
            report.cut.append(serial)
    except management.ManagementError as exc:
        report.cut_errors.append(f"serial {serial}: {exc}")
        return False
    return True


def _cut(vpn: VpnState, revoked: set[int], report: InstallReport, *, message: str = "HALT") -> None:
    """Cut the sessions of the certificates ``revoked``: their clients exit (``HALT``: a revoked certificate has
    nothing to come back for), unless ``message`` says otherwise."""
    for serial in sorted(revoked):
        peers = session_peers(vpn, serial)
        if not peers:
            continue  # not connected through this gateway (or already cut)
        # forgotten only when no session was recorded since the peers were read (a client-connect that passed the
        # old revoked list just before): that one's record stays, for the next pull's cut
        if _kill(vpn, serial, peers, report, message=message) and set(peers) == set(session_peers(vpn, serial)):
            forget_sessions(vpn, serial)


def _cut_unmapped(vpn: VpnState, report: InstallReport) -> None:
    """Cut the sessions on a cluster the installed VLAN map no longer holds, or holds on another VLAN: the cluster
    ended (its VLAN goes to another cluster after the hold-down) — a revocation that did not reach this gateway,
    or a cut that failed, must not leave a user on the VLAN. OpenVPN checks the map at connect only. The clients
    are told to reconnect (``RESTART``): the map may have dropped the cluster for a while only (two clusters of
    different cores on one VLAN id, on a gateway of no site), or moved it to another VLAN, and the reconnection
    meets the map as it is now (refused while the cluster is not in it)."""
    try:
        vlans = load_vlan_map(vpn.vlans)
    except StateError as exc:
        report.cut_errors.append(f"VLAN map: {exc}")
        return
    stale: dict[int, list[tuple[str, str]]] = {}
    for session in vpn_sessions(vpn):
        cluster, vlan = session["cluster"], session["vlan"]
        if cluster and (cluster not in vlans or (vlan is not None and vlans[cluster] != vlan)):
            stale.setdefault(session["serial"], []).append(tuple(session["peer"]))
    for serial, peers in sorted(stale.items()):
        if _kill(vpn, serial, peers, report, message="RESTART") and set(peers) == set(session_peers(vpn, serial)):
            forget_sessions(vpn, serial)  # (else OpenVPN's client-disconnect drops those peers: the hooks' file)


def _cut_ssh(ssh: SshState, revoked: set[int], report: InstallReport) -> None:
    for serial in sorted(revoked):
        try:
            if sshd.cut_sessions(ssh, serial):
                report.ssh_cut.append(serial)
        except OSError as exc:
            report.cut_errors.append(f"SSH serial {serial}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pull.py", description="install a state document read from stdin")
    parser.add_argument("--state", required=True, help="the gateway's state directory")
    parser.add_argument("--fetched-at", type=float, help="when the fetch started (seconds since the epoch)")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # (argparse printed the usage)
        return int(exc.code or 0)
    try:
        report = install_state(args.state, json.load(sys.stdin), fetched_at=args.fetched_at)
    except (StateError, ValueError) as exc:
        print(f"virtcloud-pull: kept the previous state: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only directory: the old files are still whole
        print(f"virtcloud-pull: kept the previous state: cannot write it: {exc}", file=sys.stderr)
        return 1
    print(
        f"virtcloud-pull: wrote {len(report.written)} file(s), cut {len(report.cut)} VPN and "
        f"{len(report.ssh_cut)} SSH certificate(s)' sessions"
        + (f", configuration changed: {', '.join(report.configs)}" if report.configs else "")
        + (f", errors: {'; '.join(report.cut_errors)}" if report.cut_errors else "")
        + "".join(f"; {note}" for note in report.notes),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
