"""The gateway tells the portal who is connected: after each pull the agent posts the sessions up now —
``POST /api/access/gateway/sessions/`` with its own token — VPN sessions as ``client-connect`` recorded them
(certificate serial, peer address and port, when, the cluster) and SSH logins on the bastion (serial, how many,
since when). The portal shows them to the operators (who is on cluster X now, from where) and to each user
(is my lost laptop still connected?). Best effort: a portal that cannot take the report fails no pull."""

from __future__ import annotations

import json
from pathlib import Path

from access.gateway import outgoing, sshd
from access.gateway import vpn as gateway_vpn
from access.gateway.state import SshState, VpnState

SESSIONS_PATH = "/api/access/gateway/sessions/"
STATE_PATH = "/api/access/gateway/state/"  # (what the pull fetches: ``--url`` may name it whole)


def portal_url(url: str, path: str) -> str:
    """``path`` on the portal at ``url``: the portal's address, or the state's whole URL (``--url`` takes both)."""
    base = url.rstrip("/")
    return base.removesuffix(STATE_PATH.rstrip("/")) + path


MAX_SESSIONS = 5000  # per kind, as the portal takes them


class ReportError(Exception):
    """The report did not reach the portal, or the portal refused it (the next pull reports again)."""


def collect(state_dir: str | Path) -> dict:
    """What is up on this gateway now (``vpn`` and ``ssh``, each a list; at most ``MAX_SESSIONS`` each)."""
    return {
        "vpn": gateway_vpn.sessions(VpnState.at(state_dir))[:MAX_SESSIONS],
        "ssh": sshd.sessions(SshState.at(state_dir))[:MAX_SESSIONS],
    }


def report(*, url: str, token: str, state_dir: str | Path, timeout: float = 20) -> dict:
    """Post ``collect(state_dir)`` to the portal at ``url``; what was sent. ``ReportError`` when it did not land."""
    doc = collect(state_dir)
    target = portal_url(url, SESSIONS_PATH)
    try:
        answer = outgoing.send_with_token(
            "POST",
            target,
            token,
            headers={"Content-Type": "application/json"},
            data=json.dumps(doc).encode(),
            timeout=timeout,
        )
    except (outgoing.NotSent, outgoing.Unreachable) as exc:
        raise ReportError(f"cannot report the sessions to {target}: {exc}") from None
    if answer.status >= 300:
        raise ReportError(f"the portal answered {answer.status} to the sessions' report: {answer.body[:200]!r}")
    return doc
