"""Cut live OpenVPN sessions through the management interface (a unix socket on the gateway).

Revocation only bites at the next TLS handshake (``crl-verify``); a session that is up stays up until
renegotiation. When the portal revokes a certificate, the gateway's pull (:mod:`access.gateway.pull`)
installs the new CRL and then calls :func:`kill_peers` for that certificate's sessions, so the client's
automatic reconnect meets the new CRL and is refused. :func:`kill_sessions` cuts all of a user's sessions.

Protocol (OpenVPN ``management-notes.txt``): a greeting line ``>INFO:...``, then one command per line;
``client-kill <CID> <msg>`` answers ``SUCCESS: ...`` or ``ERROR: ...``; ``status 3`` answers
tab-separated lines ending with ``END``. Lines starting with ``>`` are real-time
notifications and may arrive at any time; they are skipped.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: OpenVPN's answer to ``client-kill`` for a client ID it no longer knows (the client left in between).
_CID_GONE = "ERROR: client-kill command failed"


class ManagementError(Exception):
    """The management interface is unreachable or answered with an error (temporary: retry later)."""


@dataclass(frozen=True)
class Session:
    """One connected client as ``status 3`` lists it."""

    common_name: str
    real_address: str
    connected_since: int
    client_id: int | None


class _Conn:
    def __init__(self, path: Path, timeout: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise ManagementError(f"cannot reach the OpenVPN management socket {path}: {exc}") from None
        self.buf = b""
        self._line()  # greeting

    def _line(self) -> str:
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError:
                raise ManagementError("OpenVPN management interface did not answer in time") from None
            if not chunk:
                raise ManagementError("OpenVPN management interface closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").rstrip("\r")

    def reply(self) -> str:
        """The next line that is not a real-time notification."""
        while True:
            line = self._line()
            if not line.startswith(">"):
                return line

    def send(self, command: str) -> None:
        if "\n" in command or "\r" in command:
            raise ManagementError("management commands are one line")
        self.sock.sendall(command.encode() + b"\n")

    def close(self) -> None:
        try:
            self.sock.sendall(b"quit\n")
        except OSError:
            pass
        self.sock.close()


def kill_sessions(socket_path: str | Path, common_name: str, *, message: str = "HALT", timeout: float = 5.0) -> int:
    """Disconnect every session of ``common_name``; return how many were cut (0 if none was up).

    Uses ``client-kill <CID> <message>`` per session rather than ``kill <cn>``: over UDP ``kill`` drops
    the server side silently and the client only notices at ``ping-restart`` (a minute later), while
    ``client-kill`` sends the client a control message. ``HALT`` (default) makes an OpenVPN 2.4+ client
    exit; ``RESTART`` makes it reconnect at once (and meet the new CRL).
    """
    if not common_name or any(c.isspace() for c in common_name):
        raise ValueError(f"refusing to kill by an empty or spaced common name {common_name!r}")
    return _kill(socket_path, lambda s: s.common_name == common_name, message, timeout)


def peer_matches(real_address: str, ip: str, port: str) -> bool:
    """Whether a ``status 3`` "Real Address" is the peer (``ip``, ``port``) a client-connect recorded:
    ``ip:port`` for IPv4 (and IPv4-mapped) peers, the bare address for native IPv6 ones (OpenVPN prints no
    port for those)."""
    return real_address == f"{ip}:{port}" or (":" in ip and real_address == ip)


def kill_peers(
    socket_path: str | Path,
    peers: Sequence[tuple[str, str]],
    *,
    common_name: str | None = None,
    message: str = "HALT",
    timeout: float = 5.0,
) -> int:
    """Disconnect every session from one of ``peers`` ((address, port) pairs, see
    :func:`access.gateway.vpn.session_peers`) — of ``common_name`` only, when given: a NAT may since have
    given another user that address and port — ; the number cut."""

    def wanted(s: Session) -> bool:
        if common_name is not None and s.common_name != common_name:
            return False
        return any(peer_matches(s.real_address, ip, port) for ip, port in peers)

    return _kill(socket_path, wanted, message, timeout)


def _kill(socket_path: str | Path, wanted: Callable[[Session], bool], message: str, timeout: float) -> int:
    """``client-kill`` every listed session ``wanted`` picks; the number cut. An answer other than success
    or "gone in between" raises, so the caller retries instead of taking the session for cut."""
    if message not in ("HALT", "RESTART"):
        raise ValueError(f"client-kill message must be HALT or RESTART, not {message!r}")
    targets = [s for s in list_sessions(socket_path, timeout=timeout) if wanted(s)]
    if not targets:
        return 0
    conn = _Conn(Path(socket_path), timeout)
    killed = 0
    try:
        for session in targets:
            if session.client_id is None:
                raise ManagementError(f"OpenVPN did not list a client ID for {session.common_name}; is it 2.5+?")
            conn.send(f"client-kill {session.client_id} {message}")
            answer = conn.reply()
            if answer.startswith("SUCCESS"):
                killed += 1
            elif answer != _CID_GONE:
                raise ManagementError(f"unexpected answer to client-kill {session.client_id}: {answer}")
    finally:
        conn.close()
    return killed


def list_sessions(socket_path: str | Path, *, timeout: float = 5.0) -> list[Session]:
    """The connected clients (``status 3``)."""
    conn = _Conn(Path(socket_path), timeout)
    sessions: list[Session] = []
    try:
        conn.send("status 3")
        header: list[str] = []
        while True:
            line = conn.reply()
            if line == "END":
                break
            fields = line.split("\t")
            if fields[0] == "HEADER" and len(fields) > 1 and fields[1] == "CLIENT_LIST":
                header = fields[2:]
            elif fields[0] == "CLIENT_LIST":
                row = dict(zip(header, fields[1:], strict=False))
                cid = row.get("Client ID", "")
                sessions.append(
                    Session(
                        common_name=row.get("Common Name", fields[1]),
                        real_address=row.get("Real Address", ""),
                        connected_since=int(row.get("Connected Since (time_t)", "0") or 0),
                        client_id=int(cid) if cid.isdigit() else None,
                    )
                )
    finally:
        conn.close()
    return sessions
