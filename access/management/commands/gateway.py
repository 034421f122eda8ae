"""``manage.py gateway config NAME`` and ``manage.py gateway pull`` — set up an access gateway and keep its
state current.

``config`` (on the portal): renders the gateway's ``openvpn.conf`` and ``sshd_config``; with ``--dir`` it
also enrols the gateway (new TLS server key and SSH host key with their certificates, written into the
state directory and not kept by the portal), writes the tls-crypt key and a first state.

``pull`` (on the gateway, from cron or a timer, every minute or so): fetches the state with the gateway's
token and ``If-None-Match``, validates all of it, then replaces each file atomically; afterwards it cuts
the live OpenVPN sessions of certificates revoked since the last pull (the new CRL is already in place, so
the clients' reconnect is refused); an unchanged state (304) still cuts those it could not cut before.
When the portal cannot be reached the last good state stays as it is and the command exits 75
(EX_TEMPFAIL): the gateway keeps authorizing from it for the state's ``max_age`` (``GATEWAY_STATE_MAX_AGE``)
from the last pull that succeeded, then fails closed — the hooks refuse everyone, and the command cuts every
live OpenVPN session — since a cluster that ended meanwhile may have passed its VLAN to another.
``--on-change CMD`` runs CMD (no shell; ``VIRTCLOUD_STATE_DIR`` in its environment) after a pull that
changed the state, and at every pull after one where CMD failed: the operator's hook that gives the SSH
bastion its leg in each closed cluster from ``ssh/clusters.json`` (each cluster's VLAN and nodes).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from access.gateway import pull as gateway_pull
from access.gateway import sshd
from access.gateway import vpn as gateway_vpn
from access.gateway.state import SshState, StateError, VpnState, check_fresh, write_atomic
from portal import http

EX_TEMPFAIL = 75
ON_CHANGE_FAILED = ".on-change-failed"  # in the state directory: why the --on-change hook failed last
STATE_PATH = "/api/access/gateway/state/"
DEFAULT_STATE_DIR = "/var/lib/virtcloud-gateway"


class PullError(Exception):
    """The portal could not be reached or answered badly (temporary: the gateway keeps its last state)."""


# --- what runs on the gateway (no database) ---------------------------------------------------------------


def _check_url(url: str) -> None:
    """https, or http to a portal on this host (the state carries the CA, the AA and the CRL unsigned: anyone
    on the path of a plain-http pull could replace them)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return
    if parts.scheme == "http":
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
        raise PullError(f"the portal URL must be https (plain http only to this host): {url}")
    raise PullError(f"the portal URL must be https: {url}")


def fetch_state(
    url: str, token: str, *, etag: str | None, generated_at: str | None = None, timeout: float = 20
) -> tuple[dict | None, str | None]:
    """(document, etag) from the portal, or (None, etag) when unchanged (304). Redirects are refused.
    ``generated_at``: that of the installed state, which the portal waits for before it hands out again the
    VLAN ids released before it."""
    if not url.rstrip("/").endswith(STATE_PATH.rstrip("/")):
        url = url.rstrip("/") + STATE_PATH
    _check_url(url)
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked above
    if etag:
        request.add_header("If-None-Match", etag)
    if generated_at:
        request.add_header("VirtCloud-State-Generated-At", generated_at)
    try:  # a redirect is refused: urllib would send the token along to wherever it points
        with http.opener().open(request, timeout=timeout) as response:
            body = response.read()
            new_etag = response.headers.get("ETag")
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return None, etag
        if http.redirected(exc.code):
            where = exc.headers.get("Location")
            raise PullError(
                f"the portal answered {exc.code}, a redirect to {where}: refused (the token stays here)"
            ) from None
        raise PullError(f"the portal answered {exc.code} for {url}: {exc.read()[:200]!r}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise PullError(f"cannot reach the portal at {url}: {exc}") from None
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise PullError(f"the portal's state is not JSON: {exc}") from None
    return doc, new_etag


def pull(
    *, url: str, token: str, state_dir: str | Path, timeout: float = 20
) -> tuple[bool, gateway_pull.InstallReport]:
    """One pull: (changed?, the install report). Raises PullError/StateError and then leaves every file as
    it was (``access.gateway.pull.install_state`` validates the whole document before writing). Unchanged
    (304), it still cuts the sessions of the certificates revoked lately that are up: a cut that failed
    last time is tried again, not only at the next change of the state."""
    state_dir = Path(state_dir)
    etag_file = state_dir / ".etag"
    installed = gateway_pull.installed(state_dir)
    # Without a record of what is installed, fetch it whole (a 304 could not say for how long to trust it).
    etag = etag_file.read_text().strip() if installed and etag_file.exists() else None
    fetched_at = time.time()  # before the request: the portal makes the state after this
    doc, new_etag = fetch_state(
        url, token, etag=etag, generated_at=installed and installed.get("generated_at"), timeout=timeout
    )
    try:
        if doc is None:
            gateway_pull.refresh(state_dir, fetched_at=fetched_at)
            return False, gateway_pull.cut_revoked(state_dir)
        report = gateway_pull.install_state(state_dir, doc, fetched_at=fetched_at)
    except OSError as exc:  # a full disk, a read-only directory: the old files are still whole
        raise PullError(f"cannot write the state in {state_dir}: {exc}") from None
    if new_etag:
        write_atomic(etag_file, new_etag, 0o600)  # last: a failed install is retried in full
    return True, report


def _cuts(report: gateway_pull.InstallReport, *, retried: bool = False) -> str:
    """What a pull cut, for its log line ("" when nothing)."""
    parts = []
    if report.cut:
        parts.append(f"cut the sessions of serials {', '.join(map(str, report.cut))}")
    if report.ssh_cut:
        parts.append(f"cut the SSH logins of serials {', '.join(map(str, report.ssh_cut))}")
    if report.cut_errors:
        again = " (retried at the next pull)" if retried else ""
        parts.append(f"could not cut: {'; '.join(report.cut_errors)}{again}")
    return "".join(f"; {part}" for part in parts)


# --- the command -------------------------------------------------------------------------------------------------


class Command(BaseCommand):
    help = (
        "Access gateway: 'config NAME' renders/enrols a gateway; 'pull' fetches its state and 'status' says whether "
        "it is current (run on the gateway)."
    )

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
        pull_parser.add_argument(
            "--on-change",
            metavar="CMD",
            help="run CMD after a pull that changed the state (and after every pull until it succeeds once): "
            "e.g. the hook that gives the bastion a leg in each cluster from ssh/clusters.json",
        )
        pull_parser.add_argument("--on-change-timeout", type=float, default=60, help="seconds CMD may run")

        status = sub.add_parser(
            "status",
            help="is the pulled state current? (run on the gateway; exit 1 if not, 2 if the --on-change hook failed)",
        )
        status.add_argument("--dir", required=True, help="the gateway's state directory")

    def handle(self, *args, **options):
        if options["action"] == "config":
            return self._config(options)
        if options["action"] == "status":
            return self._status(options)
        return self._pull(options)

    def _status(self, options):
        """What the gateway goes by: the state it installed, until when it trusts it, the sessions it recorded
        (what an expiry or a revocation would cut). Exit 1 when it refuses everyone (for a monitoring check)."""
        state_dir = Path(options["dir"])
        installed = gateway_pull.installed(state_dir)
        vpn_sessions = len(gateway_vpn.recorded_serials(VpnState.at(state_dir)))
        ssh_logins = len(sshd.live_serials(SshState.at(state_dir)))
        try:
            left = check_fresh(state_dir)
        except StateError as exc:
            verdict, fresh = f"REFUSING everyone: {exc}", False
        else:
            verdict, fresh = f"current: trusted for {int(left)} s more unless a pull succeeds", True
        made = installed["generated_at"] if installed else "none recorded"
        self.stdout.write(
            f"gateway state in {state_dir}: {verdict}; installed state made at {made}; "
            f"recorded sessions: {vpn_sessions} VPN certificate(s), {ssh_logins} SSH certificate(s)"
        )
        if not fresh:
            sys.exit(1)
        failed = state_dir / ON_CHANGE_FAILED
        if failed.exists():  # the state is current, but the legs (or whatever the hook keeps) may not follow it
            reason = (failed.read_text().strip().splitlines() or ["?"])[0][:300]
            self.stdout.write(f"the --on-change hook failed at the last pull ({reason}); it runs again at the next")
            sys.exit(2)

    def _pull(self, options):
        try:
            token = options["token"] or Path(options["token_file"]).read_text().strip()
        except OSError as exc:
            raise CommandError(f"cannot read the gateway token: {exc}") from None
        try:
            changed, report = pull(
                url=options["url"], token=token, state_dir=options["dir"], timeout=options["timeout"]
            )
        except (PullError, StateError) as exc:
            closed = gateway_pull.fail_closed(options["dir"])
            if closed is None:
                self.stderr.write(f"gateway pull: {exc}; keeping the last good state in {options['dir']}")
            else:
                self.stderr.write(
                    f"gateway pull: {exc}; the last good state in {options['dir']} has expired: refusing everyone"
                    + _cuts(closed)
                )
            sys.exit(EX_TEMPFAIL)
        line = f"gateway pull: {len(report.written)} file(s) updated" if changed else "gateway pull: unchanged"
        self.stdout.write(line + _cuts(report, retried=True))
        if options["on_change"]:
            self._on_change(options["on_change"], Path(options["dir"]), changed, options["on_change_timeout"])

    def _on_change(self, command: str, state_dir: Path, changed: bool, timeout: float) -> None:
        """Run the operator's hook after a change, or again after it failed (the state is installed either
        way: a failing hook makes the pull exit 1, and it runs at the next pull even if nothing changed)."""
        failed = state_dir / ON_CHANGE_FAILED
        if not changed and not failed.exists():
            return
        env = {**os.environ, "VIRTCLOUD_STATE_DIR": str(state_dir.absolute())}
        try:
            done = subprocess.run(  # noqa: S603 - the operator's own command line, without a shell
                shlex.split(command), env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
            error = "" if done.returncode == 0 else f"exit {done.returncode}: {(done.stderr or done.stdout).strip()}"
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            error = str(exc)
        if not error:
            failed.unlink(missing_ok=True)
            self.stdout.write("gateway pull: --on-change ran")
            return
        write_atomic(failed, error[-2000:] + "\n", 0o600)
        self.stderr.write(
            f"gateway pull: the state is installed, but --on-change failed ({error[-500:]}); "
            "it runs again at the next pull"
        )
        sys.exit(1)

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
                reneg_sec=settings.GATEWAY_STATE_MAX_AGE,
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
        doc = services.gateway_state(gateway=gateway)
        gateway_pull.install_state(target, doc, cut_sessions=False)
        services.gateway_pulled(gateway=gateway, installed=doc["generated_at"])
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
