"""``manage.py gateway config NAME`` and ``manage.py gateway pull`` — set up an access gateway and keep its
state current.

``config`` (on the portal): renders the gateway's ``openvpn.conf`` and ``sshd_config``; with ``--dir`` it
also enrols the gateway (new TLS server key and SSH host key with their certificates, written into the
state directory and not kept by the portal), writes the tls-crypt key and a first state.

``pull`` (on the gateway, from cron or a timer, every minute or so): fetches the state with the gateway's
token and ``If-None-Match``, validates all of it, then replaces each file atomically; afterwards it cuts
the live OpenVPN sessions of certificates revoked since the last pull (the new CRL is already in place, so
the clients' reconnect is refused). When the portal cannot be reached the last good state stays as it
is and the command exits 75 (EX_TEMPFAIL): the gateway keeps authorizing from it.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from access.gateway import management as openvpn_management
from access.gateway import sshd
from access.gateway.state import SshState, StateError, VpnState, vlan_map_json, write_atomic

EX_TEMPFAIL = 75
STATE_PATH = "/api/access/gateway/state/"
DEFAULT_STATE_DIR = "/var/lib/virtcloud-gateway"


class PullError(Exception):
    """The portal could not be reached or answered badly (temporary: the gateway keeps its last state)."""


# --- what runs on the gateway (no database) ---------------------------------------------------------------


def fetch_state(url: str, token: str, *, etag: str | None, timeout: float = 20) -> tuple[dict | None, str | None]:
    """(document, etag) from the portal, or (None, etag) when unchanged (304)."""
    if not url.rstrip("/").endswith(STATE_PATH.rstrip("/")):
        url = url.rstrip("/") + STATE_PATH
    if not url.startswith(("https://", "http://")):
        raise PullError(f"the portal URL must be http(s): {url}")
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked above
    if etag:
        request.add_header("If-None-Match", etag)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - scheme checked above
            body = response.read()
            new_etag = response.headers.get("ETag")
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return None, etag
        raise PullError(f"the portal answered {exc.code} for {url}: {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise PullError(f"cannot reach the portal at {url}: {exc}") from None
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise PullError(f"the portal's state is not JSON: {exc}") from None
    return doc, new_etag


def _rendered_files(doc: dict, state_dir: Path) -> list[tuple[Path, bytes | str, int]]:
    """Every file of the state, rendered and validated before any is written."""
    import base64

    if not isinstance(doc, dict) or doc.get("format") != 1:
        raise StateError("the pulled state has an unknown format")
    files: list[tuple[Path, bytes | str, int]] = []
    vpn = doc.get("vpn")
    if vpn is not None:
        st = VpnState.at(state_dir)
        for key in ("ca", "aa", "crl"):
            if "-----BEGIN " not in str(vpn.get(key, "")):
                raise StateError(f"the pulled state has no PEM {key}")
        files += [
            (st.ca, vpn["ca"], 0o644),
            (st.aa, vpn["aa"], 0o644),
            (st.vlans, vlan_map_json(dict(vpn["vlans"]), generated_at=doc.get("generated_at", "")), 0o644),
            (st.crl, vpn["crl"], 0o644),  # last of the VPN files: the CRL revokes what the map may still admit
        ]
    ssh = doc.get("ssh")
    if ssh is not None:
        st = SshState.at(state_dir)
        grants = [
            sshd.PrincipalGrant(principal, [(host, int(port)) for host, port in cluster.get("targets", [])])
            for cluster in ssh["clusters"].values()
            for principal in cluster["principals"]
        ]
        try:
            krl = base64.b64decode(ssh["krl"], validate=True)
        except ValueError:
            raise StateError("the pulled KRL is not base64") from None
        files += [
            (st.user_ca, ssh["user_ca"].strip() + "\n", 0o644),
            (st.root / "host_ca.pub", ssh["host_ca"].strip() + "\n", 0o644),
            (st.principals(ssh["account"]), sshd.render_principals_file(grants), 0o644),
            (st.krl, krl, 0o644),
        ]
    return files


def install_state(doc: dict, state_dir: str | Path) -> list[Path]:
    """Write ``doc`` into ``state_dir`` (each file atomically); returns the files that changed."""
    state_dir = Path(state_dir)
    try:
        files = _rendered_files(doc, state_dir)
    except (KeyError, TypeError, ValueError, sshd.SshdConfigError) as exc:
        raise StateError(f"the pulled state is malformed: {exc}") from None
    if "vpn" in doc:
        VpnState.at(state_dir).ensure_dirs()
    if "ssh" in doc:
        SshState.at(state_dir).ensure_dirs()
    changed = []
    for path, data, mode in files:
        raw = data.encode() if isinstance(data, str) else data
        if path.exists() and path.read_bytes() == raw:
            continue
        write_atomic(path, raw, mode)
        changed.append(path)
    write_atomic(state_dir / "state.json", json.dumps(doc, indent=1, sort_keys=True), 0o600)
    return changed


def cut_revoked_sessions(doc: dict, state_dir: str | Path) -> list[str]:
    """Cut live sessions of certificates revoked since the last pull; remembers which were handled."""
    vpn = doc.get("vpn") or {}
    st = VpnState.at(state_dir)
    done_file = st.run / "cut-serials.json"
    try:
        done = set(json.loads(done_file.read_text()))
    except (FileNotFoundError, ValueError):
        done = set()
    revoked = vpn.get("revoked_sessions", [])
    todo = [r for r in revoked if r["serial"] not in done]
    cut: list[str] = []
    for entry in todo:
        if not st.management.exists():
            done.add(entry["serial"])  # no OpenVPN running here: nothing is up to cut
            continue
        try:
            # RESTART: the client reconnects at once and meets the new CRL; other valid certificates of the
            # same user come back, the revoked one is refused.
            openvpn_management.kill_sessions(st.management, entry["common_name"], message="RESTART")
        except (openvpn_management.ManagementError, ValueError) as exc:
            print(f"gateway: could not cut sessions of {entry['common_name']}: {exc}", file=sys.stderr)
            continue  # retried at the next pull
        done.add(entry["serial"])
        cut.append(entry["common_name"])
    # Keep only serials still listed, so the file does not grow forever.
    listed = {r["serial"] for r in revoked}
    st.run.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(done_file, json.dumps(sorted(done & listed)))
    return cut


def pull(*, url: str, token: str, state_dir: str | Path, timeout: float = 20) -> tuple[bool, list[Path], list[str]]:
    """One pull: (changed?, files written, users whose sessions were cut). Raises PullError/StateError and
    then leaves every file as it was."""
    state_dir = Path(state_dir)
    etag_file = state_dir / ".etag"
    etag = etag_file.read_text().strip() if etag_file.exists() else None
    doc, new_etag = fetch_state(url, token, etag=etag, timeout=timeout)
    if doc is None:
        return False, [], []
    changed = install_state(doc, state_dir)
    cut = cut_revoked_sessions(doc, state_dir)
    if new_etag:
        write_atomic(etag_file, new_etag, 0o600)  # last: a failed install is retried in full
    return True, changed, cut


# --- the command -------------------------------------------------------------------------------------------------


class Command(BaseCommand):
    help = "Access gateway: 'config NAME' renders/enrols a gateway; 'pull' fetches its state (run on the gateway)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        config = sub.add_parser("config", help="render the gateway's configuration; with --dir, enrol and write it")
        config.add_argument("name", help="the gateway's name in the portal")
        config.add_argument("--dir", help="state directory to write (keys, certificates, configs, first state)")
        config.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="state directory path on the gateway")
        config.add_argument("--dev", default="tap-vc", help="persistent tap on the trunk (ip tuntap add mode tap)")
        config.add_argument("--vpn-local", default=None, help="address OpenVPN listens on (default: all)")
        config.add_argument("--ssh-listen", default="0.0.0.0", help="address the bastion sshd listens on")  # noqa: S104
        config.add_argument("--python", default=sys.executable, help="python that runs the OpenVPN hooks")
        config.add_argument("--re-enrol", action="store_true", help="new keys even if the directory has some")

        pull_parser = sub.add_parser("pull", help="fetch the state from the portal (what the gateway runs)")
        pull_parser.add_argument("--url", required=True, help="portal base URL, e.g. https://portal.example.org")
        token = pull_parser.add_mutually_exclusive_group(required=True)
        token.add_argument("--token", help="the gateway's API token (prefer --token-file: argv is visible)")
        token.add_argument("--token-file", help="file holding the gateway's API token")
        pull_parser.add_argument("--dir", required=True, help="the gateway's state directory")
        pull_parser.add_argument("--timeout", type=float, default=20)

    def handle(self, *args, **options):
        if options["action"] == "config":
            return self._config(options)
        return self._pull(options)

    def _pull(self, options):
        token = options["token"] or Path(options["token_file"]).read_text().strip()
        try:
            changed, files, cut = pull(
                url=options["url"], token=token, state_dir=options["dir"], timeout=options["timeout"]
            )
        except (PullError, StateError) as exc:
            self.stderr.write(f"gateway pull: {exc}; keeping the last good state in {options['dir']}")
            sys.exit(EX_TEMPFAIL)
        if not changed:
            self.stdout.write("gateway pull: unchanged")
            return
        self.stdout.write(
            f"gateway pull: {len(files)} file(s) updated" + (f"; cut sessions of {', '.join(cut)}" if cut else "")
        )

    def _config(self, options):
        from access import openvpn, services
        from access.models import Gateway

        try:
            gateway = Gateway.objects.get(name=options["name"])
        except Gateway.DoesNotExist:
            raise CommandError(f"no gateway named {options['name']!r}") from None
        target = Path(options["dir"]) if options["dir"] else None
        state_dir = target or Path(options["state_dir"])
        configs = {}
        if gateway.serves_vpn:
            configs["openvpn.conf"] = openvpn.render_server_config(
                state_dir=state_dir,
                dev=options["dev"],
                port=gateway.vpn_port,
                proto=gateway.vpn_proto,
                local=options["vpn_local"],
                python=options["python"],
            )
        if gateway.serves_ssh:
            configs["sshd_config"] = sshd.render_sshd_config(
                state_dir=state_dir,
                listen=[(options["ssh_listen"], gateway.ssh_port)],
                account=gateway.ssh_user,
                pid_file=state_dir / "ssh" / "sshd.pid",
            )
        if target is None:
            for name, text in configs.items():
                self.stdout.write(f"# ---- {name} (state directory {state_dir})\n{text}")
            return
        self._enrol(gateway, target, options["re_enrol"])
        for name, text in configs.items():
            write_atomic(target / name, text, 0o644)
        install_state(services.gateway_state(gateway=gateway), target)
        self.stdout.write(f"gateway {gateway.name}: configuration and state written to {target}")

    def _enrol(self, gateway, target: Path, force: bool) -> None:
        from access import services

        vpn, ssh = VpnState.at(target), SshState.at(target)
        have = (not gateway.serves_vpn or vpn.server_key.exists()) and (not gateway.serves_ssh or ssh.host_key.exists())
        if have and not force:
            return
        enrolment = services.gateway_enrol(gateway=gateway)
        if gateway.serves_vpn:
            vpn.ensure_dirs()
            write_atomic(vpn.server_key, enrolment.server_key_pem, 0o600)
            write_atomic(vpn.server_cert, enrolment.server_cert_pem, 0o644)
            write_atomic(vpn.tls_crypt, enrolment.tls_crypt_key, 0o600)
        if gateway.serves_ssh:
            ssh.ensure_dirs()
            write_atomic(ssh.host_key, enrolment.ssh_host_key, 0o600)
            write_atomic(ssh.host_cert, enrolment.ssh_host_cert + "\n", 0o644)
