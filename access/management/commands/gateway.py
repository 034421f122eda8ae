"""``manage.py gateway config NAME`` (on the portal) and ``manage.py gateway pull|status`` (on a gateway that
has the portal installed) — set up an access gateway and keep its state current.

``config`` renders the gateway's ``openvpn.conf``, ``sshd_config`` and systemd units
(:mod:`access.gateway.config`); with ``--dir`` it also enrols the gateway (new TLS server key and SSH host key
with their certificates, written into the state directory and not kept by the portal), writes the tls-crypt
key, the configs and units, ``local.json`` (the options given here, from which the gateway's pulls render the
files again when the portal's settings for it change), and a first state.

``pull`` and ``status`` are the gateway agent's (:mod:`access.gateway.agent`, which a gateway runs standalone,
without Django: its systemd units do): fetch and install the state, cut what it revokes, run the
``--on-change`` hook; say whether the state is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from access.gateway import agent, outgoing
from access.gateway import config as gateway_config
from access.gateway import pull as gateway_pull
from access.gateway.agent import DEFAULT_STATE_DIR
from access.gateway.state import RunAs, SshState, VpnState, write_all_atomic, write_atomic

CODE_ROOT = Path(__file__).resolve().parents[3]
_ROOT_HINT = " (--vpn-user '' keeps OpenVPN and its hooks root, e.g. in a lab run without root)"

# --- the command -------------------------------------------------------------------------------------------------


def _as_it_is(path: Path, spec: tuple) -> tuple | None:
    """``path``'s content with the mode (and group) it is written with, or None when there is no such file."""
    try:
        return (path.read_bytes(), *spec[1:])
    except FileNotFoundError:
        return None


def _put_back(before: dict[Path, tuple | None]) -> None:
    """The files of ``before`` as they were: written back, or removed when there was none."""
    if not before:
        return
    write_all_atomic({path: old for path, old in before.items() if old is not None})
    for path, old in before.items():
        if old is None:
            path.unlink(missing_ok=True)


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
        config.add_argument(
            "--python", default=sys.executable, help="python that runs the hooks and the agent on the gateway"
        )
        config.add_argument(
            "--code-root",
            default=str(CODE_ROOT),
            help="where the portal's code is on the gateway (access/gateway/ is what runs there)",
        )
        config.add_argument(
            "--portal-url", default=None, help="the URL the gateway pulls from (default: the SITE_URL setting)"
        )
        config.add_argument("--token-file", default=None, help="the gateway's pull token (default: <state>/token)")
        config.add_argument(
            "--trunk",
            default=None,
            help="interface carrying the clusters' VLANs: the pull's hook then gives the bastion a leg in each",
        )
        config.add_argument(
            "--vpn-user",
            default="nobody",
            help="the user OpenVPN and its hooks run as after start ('': root throughout, e.g. a lab without root)",
        )
        config.add_argument("--vpn-group", default="nogroup", help="… and their group (files they read are root:GROUP)")
        config.add_argument("--re-enrol", action="store_true", help="new keys even if the directory has some")

        agent.add_arguments(sub)

    def handle(self, *args, **options):
        if options["action"] == "config":
            return self._config(options)
        if options["action"] == "pull":
            try:
                options["token"] = outgoing.read_token(options["token"], options["token_file"], what="gateway token")
            except ValueError as exc:
                raise CommandError(str(exc)) from None
        code = agent.run(options, out=self.stdout, err=self.stderr)
        if code:
            sys.exit(code)

    def _config(self, options):
        from access import selectors, services
        from access.models import Gateway

        try:
            gateway = Gateway.objects.get(name=options["name"])
        except Gateway.DoesNotExist:
            raise CommandError(f"no gateway named {options['name']!r}") from None
        target = Path(options["dir"]) if options["dir"] else None
        state_dir = target or Path(options["state_dir"])
        # The operator's half: what the portal does not know; recorded beside the state (local.json), the gateway's
        # pulls render the files again from it and the portal's half whenever the portal's settings change.
        local = {
            "state_dir": str(state_dir),
            "dev": options["dev"],
            "vpn_local": options["vpn_local"] or None,
            "ssh_listen": options["ssh_listen"],
            "python": options["python"],
            "code_root": str(options["code_root"]),
            "portal_url": options["portal_url"] or settings.SITE_URL,
            "token_file": options["token_file"] or None,
            "trunk": options["trunk"] or None,
            # an empty --vpn-user keeps OpenVPN root (and its state root's only)
            "vpn_user": options["vpn_user"] or None,
            "vpn_group": (options["vpn_user"] and options["vpn_group"]) or None,
        }
        if local["vpn_user"] and not local["vpn_group"]:
            raise CommandError("--vpn-user needs a --vpn-group (the group that may read the state)")
        run_as = None
        try:
            configs = gateway_config.render(selectors.gateway_settings(gateway), local)
            if target is not None:
                configs[gateway_config.LOCAL] = gateway_config.local_json(local)
                run_as = gateway_config.run_as(local)  # (the state directory is this host's: its accounts)
        except (ValueError, LookupError) as exc:
            raise CommandError(f"{exc}{_ROOT_HINT if isinstance(exc, LookupError) else ''}") from None
        if target is None:
            for name, text in configs.items():
                self.stdout.write(f"# ---- {name} (state directory {state_dir})\n{text}")
            return
        try:
            re_enrolled = self._enrol(gateway, target, options["re_enrol"], run_as)
            for name, text in configs.items():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target / name, text, 0o644)
            doc = services.gateway_state(gateway=gateway)
            report = gateway_pull.install_state(target, doc, cut_sessions=False)
        except PermissionError as exc:  # giving the state to the account's group takes root
            raise CommandError(f"{exc}{_ROOT_HINT if run_as else ''}") from None
        except OSError as exc:  # --dir is a file, the disk is full or read-only …
            where = f" {exc.filename}" if exc.filename else f" {target}"
            raise CommandError(f"cannot write{where}: {exc.strerror or exc}") from None
        if gateway.state_as_of is None:
            # its first state, wherever it runs from: it has no older one. Run again (after an upgrade, into a
            # directory copied over later) it says nothing of what the running gateway has: its next pull does
            services.gateway_pulled(gateway=gateway, installed=doc["generated_at"])
        self.stdout.write(f"gateway {gateway.name}: configuration and state written to {target}")
        if re_enrolled:
            self.stdout.write(
                f"gateway {gateway.name}: re-enrolled: restart its OpenVPN and its bastion's sshd now, to use the new "
                "keys; VPN profiles and SSH bundles issued from now on accept the new keys only"
            )
        for note in report.notes:
            self.stdout.write(f"gateway {gateway.name}: {note}")

    def _enrol(self, gateway, target: Path, force: bool, run_as: RunAs | None) -> bool:
        """New keys for ``gateway`` into ``target`` when it has none (or ``force``); whether it had some before.
        The portal records them only once the files are written (new profiles pin the new certificate)."""
        from django.db import transaction

        from access import services

        vpn, ssh = VpnState.at(target, run_as), SshState.at(target)
        have = (not gateway.serves_vpn or vpn.server_key.exists()) and (not gateway.serves_ssh or ssh.host_key.exists())
        if have and not force:
            return False
        had = bool(gateway.server_certificate or gateway.ssh_host_certificate)
        before: dict[Path, tuple] = {}  # the files replaced, as they were (None: there was none)
        try:
            with transaction.atomic():
                enrolment = services.gateway_enrol(gateway=gateway)
                files: dict[Path, tuple] = {}
                if gateway.serves_vpn:
                    vpn.ensure_dirs()
                    files[vpn.server_key] = (enrolment.server_key_pem, 0o600)
                    files[vpn.server_cert] = (enrolment.server_cert_pem, *vpn.readable)
                    files[vpn.tls_crypt] = (enrolment.tls_crypt_key, 0o600)
                if gateway.serves_ssh:
                    ssh.ensure_dirs()
                    files[ssh.host_key] = (enrolment.ssh_host_key, 0o600)
                    files[ssh.host_cert] = (enrolment.ssh_host_cert + "\n", 0o644)
                before = {path: _as_it_is(path, spec) for path, spec in files.items()}
                write_all_atomic(files)  # every one written, or none: the old key set stays whole
        except BaseException:
            # the portal did not record the new keys (a file could not be written, or the commit failed): the
            # gateway keeps the old ones, which the portal's profiles pin
            _put_back(before)
            raise
        return had
