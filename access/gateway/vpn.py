"""OpenVPN hooks of the access gateway: ``tls-verify`` checks the AC, ``client-connect`` picks the VLAN.

Run by OpenVPN (see :func:`access.gateway.vpnconf.render_server_config`)::

    tls-verify     "<python> -I <code>/access/gateway/vpn.py tls-verify --state <dir>"   + depth subject
    client-connect "<python> -I <code>/access/gateway/vpn.py client-connect --state <dir>"  + config-file
    client-disconnect "<python> -I <code>/access/gateway/vpn.py client-disconnect --state <dir>"

``tls-verify`` (depth 0 only) reads the peer certificate that ``tls-export-cert`` wrote (env
``peer_cert``), extracts the attribute certificate from its private extension, verifies it offline
against the pinned AA certificate (:func:`access.attrcerts.verify_ac_full`) and caches the FQANs under the
certificate's SHA-256 fingerprint. It grants nothing by itself: OpenVPN checks the CRL after it, and
only ``client-connect`` assigns a VLAN.

``client-connect`` looks the cache up by the fingerprint OpenVPN gives it (``tls_digest_sha256_0``),
reads the cluster the client asks for (``UV_VCLUSTER``, sent with ``push-peer-info``; client-chosen, so it
only selects among the clusters the AC grants), intersects with the current cluster->VLAN map, and writes
``vlan-pvid <vid>`` into the file OpenVPN named; or exits 1, which OpenVPN turns into AUTH_FAILED.

Both refuse everyone once the pulled state has expired (:func:`access.gateway.state.check_fresh`: no
successful pull for the state's ``max_age``); ``tls-verify`` runs again at each renegotiation
(``reneg-sec``), so a live session ends there too.

They run as the account OpenVPN dropped its privileges to (``user``/``group``, ``gateway config --vpn-user``): they
read the state as its group and write only their records, ``vpn/run/ac-cache`` and ``vpn/run/sessions``, which
are that account's (:meth:`access.gateway.state.VpnState.ensure_dirs`); OpenVPN's ``client-connect`` file is in its
own temporary directory.

Every decision is one line on stderr (OpenVPN's log): ``virtcloud-vpn: ACCEPT|REFUSE ...``.
Run as a script (not ``-m``) so it needs no PYTHONPATH: it puts its own code root on ``sys.path``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - exercised by OpenVPN
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from access.gateway.state import (  # noqa: E402
    CLUSTER_RE,
    StateError,
    VpnState,
    check_fresh,
    load_vlan_map,
    read_record,
    revoked_serials,
    write_atomic,
)

#: How long a tls-verify result may wait for its client-connect.
CACHE_TTL = 600


class Refused(Exception):
    """The connection is refused; the message is logged."""


def _log(verdict: str, message: str) -> None:
    print(f"virtcloud-vpn: {verdict} {message}", file=sys.stderr, flush=True)


def _fingerprint_from_env(env: dict[str, str]) -> str:
    value = env.get("tls_digest_sha256_0", "")
    fp = value.replace(":", "").lower()
    if len(fp) != 64:
        raise Refused("no tls_digest_sha256_0 from OpenVPN (is this OpenVPN 2.4+ in server mode?)")
    return fp


def _cache_path(state: VpnState, fingerprint: str) -> Path:
    return state.ac_cache / f"{fingerprint}.json"


def _prune_cache(state: VpnState, now: float) -> None:
    try:
        entries = list(os.scandir(state.ac_cache))
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime > CACHE_TTL:
                os.unlink(entry.path)
        except FileNotFoundError:
            pass


def tls_verify(state: VpnState, depth: int, subject: str, env: dict[str, str]) -> None:
    """Verify the AC of the depth-0 certificate and cache its FQANs; raise :class:`Refused`."""
    if depth != 0:
        return  # the CA chain itself is OpenVPN's job (``ca``); the AC rides on the leaf only
    _check_fresh(state, f"subject={subject!r}")  # also at each renegotiation: an expired state ends the session

    # Imported here so client-connect, which needs no cryptography, starts faster.
    from access import attrcerts, pki

    path = env.get("peer_cert")
    if not path:
        raise Refused(f"subject={subject!r}: no peer_cert (tls-export-cert is not configured)")
    try:
        cert = pki.load_cert_pem(Path(path).read_bytes())
        aa_cert = pki.load_cert_pem(state.aa.read_bytes())
    except FileNotFoundError as exc:
        raise Refused(f"subject={subject!r}: missing {exc.filename}") from None
    except ValueError as exc:
        raise Refused(f"subject={subject!r}: unreadable certificate: {exc}") from None
    who = f"subject={subject!r} serial={cert.serial_number}"
    ac_der = pki.embedded_ac(cert)
    if ac_der is None:
        raise Refused(f"{who}: certificate carries no attribute certificate")
    try:
        verified = attrcerts.verify_ac_full(ac_der, aa_cert=aa_cert, holder_cert=cert)
    except attrcerts.ACInvalid as exc:
        raise Refused(f"{who}: AC invalid: {exc.reason}") from None

    fingerprint = pki.cert_fingerprint(cert)
    state.ac_cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    entry = {
        "serial": cert.serial_number,
        "subject": subject,
        "ac_serial": verified.serial,
        "fqans": verified.fqans,
        "clusters": verified.clusters,
        "not_after": verified.not_after.timestamp(),
    }
    write_atomic(_cache_path(state, fingerprint), json.dumps(entry))
    _prune_cache(state, time.time())
    _log("VERIFIED", f"{who}: AC {verified.serial} grants {','.join(sorted(verified.clusters))}")


def client_connect(state: VpnState, config_file: str, env: dict[str, str]) -> int:
    """Choose the VLAN for this client; write ``vlan-pvid`` into ``config_file``; return the VLAN id."""
    cn = env.get("common_name", "?")
    fingerprint = _fingerprint_from_env(env)
    try:
        entry = json.loads(read_record(_cache_path(state, fingerprint)))
    except FileNotFoundError:
        raise Refused(f"cn={cn}: no verified AC for this certificate (tls-verify did not pass it)") from None
    who = f"cn={cn} serial={entry['serial']}"
    _check_fresh(state, who)
    if entry["serial"] in revoked_lately(state):  # passed the CRL before the pull that revoked it
        raise Refused(f"{who}: certificate revoked")
    if time.time() > entry["not_after"]:
        raise Refused(f"{who}: AC expired at {dt.datetime.fromtimestamp(entry['not_after'], dt.UTC).isoformat()}")

    granted: dict[str, str] = entry["clusters"]  # computed by tls-verify: no cryptography import here
    try:
        vlans = load_vlan_map(state.vlans)
    except StateError as exc:
        raise Refused(f"{who}: {exc}") from None

    asked = env.get("UV_VCLUSTER", "").strip()
    if asked:
        if not CLUSTER_RE.match(asked):
            raise Refused(f"{who}: malformed UV_VCLUSTER {asked[:64]!r}")
        if asked not in granted:
            raise Refused(f"{who}: cluster {asked} is not in the AC (grants: {', '.join(sorted(granted)) or 'none'})")
        cluster = asked
    else:
        # No choice sent (a client without push-peer-info): unambiguous only with exactly one open cluster.
        usable = sorted(c for c in granted if c in vlans)
        if len(usable) != 1:
            raise Refused(f"{who}: no UV_VCLUSTER and the AC grants {len(usable)} reachable clusters; choose one")
        cluster = usable[0]
    vid = vlans.get(cluster)
    if vid is None:
        raise Refused(f"{who}: cluster {cluster} has no VLAN on this gateway (not READY or torn down)")
    Path(config_file).write_text(f"vlan-pvid {vid}\n")
    _record_session(state, entry["serial"], cn, env, cluster=cluster, vlan=vid)
    _log("ACCEPT", f"{who}: cluster {cluster} -> vlan-pvid {vid}")
    return vid


def _check_fresh(state: VpnState, who: str) -> None:
    try:
        check_fresh(state.root.parent)
    except StateError as exc:
        raise Refused(f"{who}: {exc}") from None


def revoked_lately(state: VpnState) -> set[int]:
    """Serials the portal revoked lately (``revoked.json``, written by the pull before it cuts sessions)."""
    return revoked_serials(state.revoked)


def _record_session(
    state: VpnState, serial: int, cn: str, env: dict[str, str], *, cluster: str = "", vlan: int | None = None
) -> None:
    """Remember the peer (address, port) of this session of ``serial`` — every one: the same profile may be
    connected from several places at once — so that a revocation cuts exactly that certificate's sessions.
    (OpenVPN runs client-connect hooks one at a time: no two of them update the record together.)"""
    ip = env.get("trusted_ip") or env.get("trusted_ip6") or ""
    port = env.get("trusted_port", "")
    if not ip:
        return
    state.sessions.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = _session_record(state, serial)
    peers = [peer for peer in _record_peers(old) if peer != (ip, port)] + [(ip, port)]
    # each peer's own connect time and cluster (one profile may be up from two laptops, on two clusters)
    known = _peer_info(old)
    if old and not known:  # written by the release before: its peers keep the record's time and cluster
        known = {
            f"{a} {b}": {"since": old.get("since"), "cluster": old.get("cluster", "")} for a, b in _record_peers(old)
        }
    info = {k: v for k, v in known.items() if tuple(k.split(" ", 1)) in peers}
    info[f"{ip} {port}"] = {"since": time.time(), "cluster": cluster, "vlan": vlan}
    record = {"serial": serial, "common_name": cn, "peers": [list(peer) for peer in peers], "peer_info": info}
    write_atomic(state.sessions / f"{serial}.json", json.dumps(record))


def _peer_info(record: dict | None) -> dict:
    info = record.get("peer_info") if isinstance(record, dict) else None
    return (
        {k: v for k, v in info.items() if isinstance(k, str) and isinstance(v, dict)} if isinstance(info, dict) else {}
    )


def recorded_serials(state: VpnState) -> set[int]:
    """Certificates with sessions up (as client-connect and client-disconnect recorded them)."""
    return {int(p.stem) for p in state.sessions.glob("*.json") if p.stem.isascii() and p.stem.isdigit()}


def _session_record(state: VpnState, serial: int) -> dict | None:
    try:
        record = json.loads(read_record(state.sessions / f"{int(serial)}.json"))  # (the hooks' account writes them)
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _record_peers(record: dict | None) -> list[tuple[str, str]]:
    if not record:
        return []
    if "address" in record:  # written by an earlier version: one "ip:port"
        ip, _, port = str(record["address"]).rpartition(":")
        return [(ip, port)] if ip else []
    return [(str(ip), str(port)) for ip, port in record.get("peers", [])]


def session_peers(state: VpnState, serial: int) -> list[tuple[str, str]]:
    """The (address, port) pairs sessions of certificate ``serial`` connected from."""
    return _record_peers(_session_record(state, serial))


def sessions(state: VpnState) -> list[dict]:
    """The sessions up, one entry per peer: ``serial``, ``peer`` ([address, port]), ``since`` (its connect, epoch
    seconds; None when unknown), the ``cluster`` it landed on and its ``vlan`` (None: recorded by an earlier
    release) as client-connect recorded them. A record it cannot read (the hooks' account writes them) is
    skipped."""
    out = []
    for serial in sorted(recorded_serials(state)):
        try:
            record = _session_record(state, serial)
            info = _peer_info(record)
            for ip, port in _record_peers(record):
                peer = info.get(f"{ip} {port}", {})
                since, cluster = peer.get("since", record.get("since")), peer.get("cluster", record.get("cluster"))
                vlan = peer.get("vlan")
                out.append(
                    {
                        "serial": serial,
                        "peer": [ip, port],
                        "since": since if isinstance(since, (int, float)) else None,
                        "cluster": cluster if isinstance(cluster, str) else "",
                        "vlan": vlan if isinstance(vlan, int) and not isinstance(vlan, bool) else None,
                    }
                )
        except (ValueError, TypeError, AttributeError):
            continue
    return out


def session_owner(state: VpnState, serial: int) -> str | None:
    """The common name client-connect recorded for certificate ``serial``'s sessions (None: no record, or one
    written by an earlier version)."""
    record = _session_record(state, serial)
    name = record.get("common_name") if isinstance(record, dict) else None
    return name if isinstance(name, str) and name and name != "?" else None


def client_disconnect(state: VpnState, env: dict[str, str]) -> None:
    """A session ended: drop its peer from its certificate's record (the whole record with the last one), so
    the records hold the sessions that are up — what a revocation or an expired state cuts, what ``gateway
    status`` counts — and do not pile up. The certificate is ``tls_serial_0`` (decimal, set by OpenVPN), or the
    one tls-verify cached for the session's fingerprint."""
    serial = env.get("tls_serial_0", "")
    if not serial.isdigit():
        try:
            serial = str(json.loads(read_record(_cache_path(state, _fingerprint_from_env(env))))["serial"])
        except (Refused, FileNotFoundError, ValueError, KeyError, TypeError):
            return  # never recorded (refused before client-connect), or already forgotten
    ip = env.get("trusted_ip") or env.get("trusted_ip6") or ""
    port = env.get("trusted_port", "")
    forget_peers(state, int(serial), [(ip, port)])
    _log("DISCONNECT", f"cn={env.get('common_name', '?')} serial={serial}: {ip} port {port}")


def forget_peers(state: VpnState, serial: int, gone: list[tuple[str, str]]) -> None:
    """Drop these peers from ``serial``'s record (the whole record with the last one)."""
    record = _session_record(state, serial)
    if record is None:
        return
    peers = [peer for peer in _record_peers(record) if peer not in gone]
    if not peers:
        forget_sessions(state, serial)
    else:
        info = {k: v for k, v in _peer_info(record).items() if tuple(k.split(" ", 1)) in peers}
        kept = {**record, "peers": [list(p) for p in peers], "peer_info": info}
        write_atomic(state.sessions / f"{serial}.json", json.dumps(kept))


def forget_sessions(state: VpnState, serial: int) -> None:
    """Drop the record of ``serial``'s sessions (they were cut)."""
    (state.sessions / f"{int(serial)}.json").unlink(missing_ok=True)


def _parse(argv: list[str]) -> tuple[str, VpnState, list[str]]:
    if len(argv) < 3 or argv[1] != "--state":
        raise SystemExit("usage: vpn.py tls-verify|client-connect|client-disconnect --state DIR [openvpn args...]")
    return argv[0], VpnState.at(argv[2]), argv[3:]


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    verb, state, rest = _parse(list(sys.argv[1:] if argv is None else argv))
    env = dict(os.environ if env is None else env)
    try:
        if verb == "tls-verify":
            if len(rest) < 2:
                raise Refused("tls-verify expects: depth subject")
            tls_verify(state, int(rest[0]), rest[1], env)
        elif verb == "client-disconnect":
            client_disconnect(state, env)
        elif verb == "client-connect":
            if len(rest) < 1:
                raise Refused("client-connect expects the config file path")
            client_connect(state, rest[0], env)
        else:
            raise SystemExit(f"unknown hook {verb!r}")
    except Refused as exc:
        _log("REFUSE", f"{verb}: {exc}")
        return 1
    except Exception as exc:  # a broken hook must fail closed, and say why
        _log("REFUSE", f"{verb}: internal error {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
