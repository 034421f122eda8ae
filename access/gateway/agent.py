"""The gateway agent: ``pull`` keeps the gateway's state current, ``status`` says whether it is.

What the gateway's timer runs — standalone, like the hooks: standard library and this package only, no Django,
no database and none of the portal's secrets (a gateway holds its pull token and nothing of the portal's)::

    python3 -I access/gateway/agent.py pull --url https://portal.example.org --token-file D/token --dir D \\
        [--on-change CMD] [--timeout 20] [--on-change-timeout 60]
    python3 -I access/gateway/agent.py status --dir D

``pull`` (every minute or so) fetches the state with the gateway's token and ``If-None-Match``, validates all
of it, then replaces the files as a set (:func:`access.gateway.pull.install_state`); afterwards it cuts the live
sessions of certificates revoked since the last pull (the new CRL and KRL are already in place, so the clients'
reconnect is refused); an unchanged state (304) still cuts those it could not cut before. When the portal
cannot be reached, or answers badly, the last good state stays as it is and the pull exits 75 (EX_TEMPFAIL): the
gateway keeps authorizing from it for the state's ``max_age`` after the last pull that succeeded, then fails
closed — the hooks refuse everyone and the pull cuts every live session — since a cluster that ended meanwhile
may have passed its VLAN to another. ``--on-change CMD`` runs CMD (no shell; ``VIRTCLOUD_STATE_DIR`` in its
environment) after a pull that changed the state, at every pull after one where CMD failed or was interrupted
(the pull then exits 1), and once after each boot: the operator's hook, e.g. ``legs.py``, which gives the SSH
bastion its leg in each closed cluster (the legs are gone after a reboot, while the state on disk is unchanged).

The gateway follows the portal's settings for it (ports, transport, bastion account, which services): with
``local.json`` in the state directory (the operator's choices, written by ``gateway config --dir``) a pull that
brings changed settings rewrites ``openvpn.conf``, ``sshd_config`` and ``systemd/*`` with the rest of the state
(:mod:`access.gateway.config`), says which, and gives the hook their names (relative to the state directory,
space-separated) in ``VIRTCLOUD_CONFIG_CHANGED`` — empty when none changed — until a run of it succeeds: the
hook restarts or reloads what reads them (``systemctl daemon-reload`` after copying the units, restart OpenVPN
and the bastion). A listed file that is gone belongs to a service the portal no longer has the gateway serve: stop
and disable it (its state is already emptied and its sessions cut, see :func:`access.gateway.pull.install_state`).
Without a hook the pull's log line is the only notice.

``status`` prints what the gateway goes by and exits 1 when it refuses everyone, 2 when the ``--on-change``
hook failed at the last pull (for a monitoring check).

``manage.py gateway pull|status`` run the same code on a host that has the portal installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from access.gateway import config as gateway_config  # noqa: E402
from access.gateway import outgoing, sshd  # noqa: E402
from access.gateway import pull as install  # noqa: E402
from access.gateway import report as sessions_report  # noqa: E402
from access.gateway import vpn as gateway_vpn  # noqa: E402
from access.gateway.state import SshState, StateError, VpnState, check_fresh, write_atomic  # noqa: E402

EX_TEMPFAIL = 75
ON_CHANGE_FAILED = ".on-change-failed"  # in the state directory: why the --on-change hook failed last
ON_CHANGE_RAN = ".on-change-ran"  # … and the boot it last succeeded in
RUNNING = "running: the pull of pid"  # the record while the hook runs
STATE_PATH = sessions_report.STATE_PATH
DEFAULT_STATE_DIR = "/var/lib/virtcloud-gateway"


class PullError(Exception):
    """The portal could not be reached or answered badly (temporary: the gateway keeps its last state)."""


def fetch_state(
    url: str, token: str, *, etag: str | None, generated_at: str | None = None, timeout: float = 20
) -> tuple[dict | None, str | None]:
    """(document, etag) from the portal, or (None, etag) when unchanged (304). Redirects are refused.
    ``generated_at``: that of the installed state, which the portal waits for before it hands out again the
    VLAN ids released before it."""
    url = sessions_report.portal_url(url, STATE_PATH)
    headers = {"If-None-Match": etag, "VirtCloud-State-Generated-At": generated_at}
    try:  # a redirect is refused: urllib would send the token along to wherever it points
        answer = outgoing.send_with_token(
            "GET", url, token, headers={k: v for k, v in headers.items() if v}, timeout=timeout
        )
    except outgoing.NotSent as exc:
        raise PullError(str(exc)) from None
    except outgoing.Unreachable as exc:
        raise PullError(f"cannot reach the portal at {url}: {exc}") from None
    if answer.status == 304:
        return None, etag
    if outgoing.redirected(answer.status):
        where = answer.headers.get("Location")
        raise PullError(f"the portal answered {answer.status}, a redirect to {where}: refused (the token stays here)")
    if answer.status >= 300:
        raise PullError(f"the portal answered {answer.status} for {url}: {answer.body[:200]!r}")
    body, new_etag = answer.body, answer.headers.get("ETag")
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise PullError(f"the portal's state is not JSON: {exc}") from None
    return doc, new_etag


def pull(*, url: str, token: str, state_dir: str | Path, timeout: float = 20) -> tuple[bool, install.InstallReport]:
    """One pull: (changed?, the install report). Raises PullError/StateError and then leaves every file as
    it was (``access.gateway.pull.install_state`` validates the whole document before writing). Unchanged
    (304), it still cuts the sessions of the certificates revoked lately that are up: a cut that failed
    last time is tried again, not only at the next change of the state."""
    state_dir = Path(state_dir)
    installed = install.installed(state_dir)
    # The etag of what is installed (its record, written with it): a 304 then says exactly that this state is
    # current. (A separate record of the last etag fetched was not: a state directory copied over from
    # ``gateway config --dir``, or a fetched state left out as older than the installed one, kept an older state
    # that every 304 then renewed.) Without a record, fetch it whole (a 304 could not say for how long to trust it).
    etag = f'"{installed["etag"]}"' if installed else None
    fetched_at = time.time()  # before the request: the portal makes the state after this
    doc, _etag = fetch_state(
        url, token, etag=etag, generated_at=installed and installed.get("generated_at"), timeout=timeout
    )
    try:
        if doc is None:
            install.refresh(state_dir, fetched_at=fetched_at)
            return False, install.cut_revoked(state_dir)
        report = install.install_state(state_dir, doc, fetched_at=fetched_at)
    except OSError as exc:  # a full disk, a read-only directory: the old files are still whole
        raise PullError(f"cannot write the state in {state_dir}: {exc}") from None
    (state_dir / ".etag").unlink(missing_ok=True)  # (an earlier version's record of the last etag fetched)
    return True, report


def _cuts(report: install.InstallReport, *, retried: bool = False) -> str:
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


def _say(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")


def run_pull(
    *,
    url: str,
    token: str,
    state_dir: str | Path,
    timeout: float = 20,
    on_change: str | None = None,
    on_change_timeout: float = 60,
    hook_leaves_config: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """A pull as the timer runs it, with its log lines; the exit status (0, 1: the hook failed, 75: the portal
    could not be reached or sent something malformed, the last good state kept — or expired and refusing).
    ``hook_leaves_config``: the hook does not restart what reads the configuration files (the generated units'
    ``legs.py``): the files a pull rewrote stay pending after it ran — as without a hook — said by every pull and
    by ``status`` until the operator, having restarted what reads them, runs ``applied``."""
    try:
        changed, report = pull(url=url, token=token, state_dir=state_dir, timeout=timeout)
    except (PullError, StateError) as exc:
        closed = install.fail_closed(state_dir)
        if closed is None:
            _say(err, f"gateway pull: {exc}; keeping the last good state in {state_dir}")
        else:
            _say(
                err,
                f"gateway pull: {exc}; the last good state in {state_dir} has expired: refusing everyone"
                + _cuts(closed),
            )
        return EX_TEMPFAIL
    line = f"gateway pull: {len(report.written)} file(s) updated" if changed else "gateway pull: unchanged"
    if report.configs:
        line += f"; configuration changed: {', '.join(report.configs)}"
    # nothing restarts what reads them (no hook, or one that leaves them): pending until the operator says
    pending = gateway_config.pending(state_dir) if not on_change or hook_leaves_config else []
    if pending:
        line += f"; {_NOT_APPLIED.format(files=', '.join(pending), dir=state_dir)}"
    _say(out, line + _cuts(report, retried=True))
    for note in report.notes:
        _say(err, f"gateway pull: {note}")
    try:  # who is connected, for the portal's operators and users (best effort: the pull itself went well)
        sessions_report.report(url=url, token=token, state_dir=state_dir, timeout=timeout)
    except sessions_report.ReportError as exc:
        _say(err, f"gateway pull: {exc}")
    except Exception as exc:  # noqa: BLE001 - a record it could not read: the pull's work stands
        _say(err, f"gateway pull: could not report the sessions: {type(exc).__name__}: {exc}")
    if on_change:
        return run_on_change(
            on_change, Path(state_dir), changed, on_change_timeout, leaves_config=hook_leaves_config, out=out, err=err
        )
    return 0


_NOT_APPLIED = (
    "configuration not applied yet: {files} (restart or reload what reads them, then `agent.py applied --dir {dir}`)"
)


def _boot_id() -> str:
    """This boot of the machine (what the hook made — network interfaces, namespaces — is gone after a reboot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def run_on_change(
    command: str,
    state_dir: Path,
    changed: bool,
    timeout: float,
    *,
    leaves_config: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run the operator's hook after a change, again after it failed or was interrupted, and once after each
    boot of the gateway (the legs it made are gone then, while the state on disk is unchanged: the pull gets a
    304). The state is installed either way: a failing hook makes the pull exit 1, and it runs at the next
    pull even if nothing changed. ``VIRTCLOUD_CONFIG_CHANGED``: the configuration files pulls rewrote since a run
    of it last succeeded (space-separated, relative to the state directory; empty when none)."""
    failed, ran = state_dir / ON_CHANGE_FAILED, state_dir / ON_CHANGE_RAN
    boot = _boot_id()
    configs = gateway_config.pending(state_dir)  # changed by this pull or one whose hook failed
    if not changed and not configs and not failed.exists() and ran.exists() and ran.read_text().strip() == boot:
        return 0
    # until it succeeds, a pull killed meanwhile (a timeout, a shutdown) leaves the hook due
    write_atomic(failed, f"{RUNNING} {os.getpid()} (interrupted if that pull is gone)\n", 0o600)
    env = {
        **os.environ,
        "VIRTCLOUD_STATE_DIR": str(state_dir.absolute()),
        "VIRTCLOUD_CONFIG_CHANGED": " ".join(configs),
    }
    try:
        done = subprocess.run(  # noqa: S603 - the operator's own command line, without a shell
            shlex.split(command), env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        error = "" if done.returncode == 0 else f"exit {done.returncode}: {(done.stderr or done.stdout).strip()}"
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if not error:
        write_atomic(ran, boot + "\n", 0o600)
        if configs and not leaves_config and gateway_config.pending(state_dir) == configs:  # (or added some since)
            (state_dir / gateway_config.CONFIG_CHANGED).unlink(missing_ok=True)
        failed.unlink(missing_ok=True)
        _say(out, "gateway pull: --on-change ran")
        return 0
    write_atomic(failed, error[-2000:] + "\n", 0o600)
    _say(
        err,
        f"gateway pull: the state is installed, but --on-change failed ({error[-500:]}); "
        "it runs again at the next pull",
    )
    return 1


def status(state_dir: str | Path, *, out: TextIO = sys.stdout) -> int:
    """What the gateway goes by: the state it installed, until when it trusts it, the sessions it recorded
    (what an expiry or a revocation would cut). 1 when it refuses everyone, 2 when the hook failed last."""
    state_dir = Path(state_dir)
    installed = install.installed(state_dir)
    vpn_sessions = len(gateway_vpn.recorded_serials(VpnState.at(state_dir)))
    ssh_logins = len(sshd.live_serials(SshState.at(state_dir)))
    try:
        left = check_fresh(state_dir)
    except StateError as exc:
        verdict, fresh = f"REFUSING everyone: {exc}", False
    else:
        verdict, fresh = f"current: trusted for {int(left)} s more unless a pull succeeds", True
    made = installed["generated_at"] if installed else "none recorded"
    _say(
        out,
        f"gateway state in {state_dir}: {verdict}; installed state made at {made}; "
        f"recorded sessions: {vpn_sessions} VPN certificate(s), {ssh_logins} SSH certificate(s)",
    )
    if installed and not gateway_config.local_path(state_dir).exists():
        _say(
            out,
            f"configuration: no {gateway_config.LOCAL} (set up by an older `gateway config`): openvpn.conf, "
            "sshd_config and the units do not follow the portal's settings; run `gateway config NAME --dir` once",
        )
    pending = gateway_config.pending(state_dir)
    if pending:
        _say(out, _NOT_APPLIED.format(files=", ".join(pending), dir=state_dir))
    if not fresh:
        return 1
    failed = state_dir / ON_CHANGE_FAILED
    if failed.exists():  # the state is current, but the legs (or whatever the hook keeps) may not follow it
        reason = (failed.read_text().strip().splitlines() or ["?"])[0][:300]
        running = _running_pull(reason)
        if running:
            _say(out, f"the --on-change hook is running (the pull of pid {running})")
            return 0
        _say(out, f"the --on-change hook failed at the last pull ({reason}); it runs again at the next")
        return 2
    return 0


def _running_pull(record: str) -> int | None:
    """The pid of the pull whose hook is running now, from the hook's record, or None (finished, failed, or its
    pull was killed: the hook is due again)."""
    if not record.startswith(RUNNING):
        return None
    try:
        pid = int(record[len(RUNNING) :].split()[0])
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        pass
    except (ValueError, IndexError, ProcessLookupError):
        return None
    return pid


def add_arguments(sub) -> None:
    """The ``pull`` and ``status`` sub-commands (also ``manage.py gateway``'s)."""
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
        help="run CMD after a pull that changed the state, at every pull until it succeeds once, and once after "
        "each boot: e.g. the hook that gives the bastion a leg in each cluster from ssh/clusters.json; "
        "VIRTCLOUD_CONFIG_CHANGED names the configuration files the pulls rewrote (restart what reads them)",
    )
    pull_parser.add_argument("--on-change-timeout", type=float, default=60, help="seconds CMD may run")
    pull_parser.add_argument(
        "--on-change-leaves-config",
        action="store_true",
        help="CMD does not restart what reads the configuration files: those a pull rewrites stay pending (said "
        "by every pull and by status) until `applied`",
    )
    applied_parser = sub.add_parser(
        "applied", help="the configuration files the pulls rewrote are in use now (OpenVPN, sshd restarted)"
    )
    applied_parser.add_argument("--dir", required=True, help="the gateway's state directory")
    status_parser = sub.add_parser(
        "status", help="is the pulled state current? (exit 1 if not, 2 if the --on-change hook failed)"
    )
    status_parser.add_argument("--dir", required=True, help="the gateway's state directory")


def take_pending(state_dir: Path) -> list[str]:
    """The files pending (``gateway applied``), taken off the list in one rename: a pull that changes a file
    meanwhile writes a list of its own, never lost (read, then deleted, the list lost a file a pull added in
    between: never restarted)."""
    changed = state_dir / gateway_config.CONFIG_CHANGED
    taken = changed.with_name(changed.name + ".applied")
    try:
        os.replace(changed, taken)
    except FileNotFoundError:
        return []
    try:
        return taken.read_text().split()
    finally:
        taken.unlink(missing_ok=True)


def run(options: dict, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Run the parsed ``pull`` or ``status`` (``options["action"]``); the exit status."""
    if options["action"] == "status":
        return status(options["dir"], out=out)
    if options["action"] == "applied":
        pending = take_pending(Path(options["dir"]))
        _say(out, f"configuration applied: {', '.join(pending) or 'nothing was pending'}")
        return 0
    try:
        token = outgoing.read_token(options["token"], options["token_file"], what="gateway token")
    except ValueError as exc:
        _say(err, f"gateway pull: {exc}")
        return 2
    exposed = "" if options["token"] else outgoing.exposed_token_file(options["token_file"])
    if exposed:
        _say(err, f"gateway pull: warning: {exposed}")
    return run_pull(
        url=options["url"],
        token=token,
        state_dir=options["dir"],
        timeout=options["timeout"],
        on_change=options["on_change"],
        on_change_timeout=options["on_change_timeout"],
        hook_leaves_config=options["on_change_leaves_config"],
        out=out,
        err=err,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="VirtCloud access gateway agent: pull the state, tell its status")
    add_arguments(parser.add_subparsers(dest="action", required=True))
    return run(vars(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
