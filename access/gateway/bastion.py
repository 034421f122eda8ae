"""A bastion per closed cluster: sshd started for each connection inside the network namespace of the cluster's
leg, so that clusters may use the same addresses (the gateway's ``ssh_port_base``).

    python3 -I access/gateway/bastion.py --state /var/lib/virtcloud-gateway --listen 198.51.100.7 --port-base 30000

Run as root (a systemd service). It listens on port ``base + VLAN id`` for every cluster in
``ssh/clusters.json`` that has a bastion address, and follows the file (the pull rewrites it; it is read again
every ``--every`` seconds). A connection gets ``sshd -i`` (inetd mode) with its cluster's configuration (the
gateway's ``sshd_config`` with that cluster's principals command, :meth:`Bastion.cluster_config`), started
inside the cluster's namespace (``--netns``, default ``vcl{vid}``: what ``legs.py --namespaces``
makes): its forwarding (ProxyJump) connects from the cluster's leg, to that cluster's nodes only, whatever
addresses other clusters use. The principals command is given the cluster, so only that cluster's principals
log in on its port; everything else (certificates, KRL, revocation cuts, failing closed) is the bastion's as
with one sshd. A cluster whose namespace is missing gets its connections closed, and a line in the log.
Standalone: no Django.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import selectors
import signal
import socket
import sys
import time
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):  # pragma: no cover - run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from access.gateway.state import SSHD_CONFIG, SshState, StateError, load_legs, write_atomic  # noqa: E402

CLONE_NEWNET = 0x40000000
#: An ``AuthorizedPrincipalsCommand`` line of sshd_config (keywords are case-insensitive; not ...CommandUser).
_PRINCIPALS_COMMAND = re.compile(r"\s*AuthorizedPrincipalsCommand(?:\s|=)", re.IGNORECASE)
PRIVSEP_DIR = "/run/sshd"
NETNS_DIR = Path("/run/netns")


def wanted(state_dir: Path, base: int) -> dict[int, tuple[str, int]]:
    """{port: (cluster, VLAN id)} for the clusters of ``ssh/clusters.json`` that have a VLAN and a bastion
    address; :class:`StateError` when the file is missing (no pull yet) or malformed."""
    legs = load_legs(SshState.at(state_dir).clusters)
    return {base + vid: (name, vid) for name, (vid, _address) in legs.items()}


def enter_netns(path: Path) -> None:
    """Move this process (a forked child, single-threaded) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class Bastion:
    """The listeners, one per cluster, and what a connection gets."""

    def __init__(
        self, state_dir: Path, *, listen: str, base: int, netns: str, sshd: str, sshd_log: str = "", log=sys.stderr
    ):
        self.state_dir, self.listen, self.base, self.netns, self.log = state_dir, listen, base, netns, log
        self.sshd, self.sshd_log = sshd, sshd_log
        self.ssh = SshState.at(state_dir)
        self.selector = selectors.DefaultSelector()
        self.listeners: dict[int, socket.socket] = {}
        self.unreadable = ""  # why ssh/clusters.json could not be read at the last sync (said once)

    def say(self, text: str) -> None:
        print(f"virtcloud-bastion: {text}", file=self.log, flush=True)

    def sync(self) -> None:
        """Listen on the ports of the clusters the state lists now; stop listening for the others."""
        try:
            ports = wanted(self.state_dir, self.base)
        except StateError as exc:  # keep what listens now: the clusters did not leave, the file is unreadable
            if str(exc) != self.unreadable:
                self.say(f"{exc}: the listeners stay as they are until it can be read")
            self.unreadable = str(exc)
            return
        self.unreadable = ""
        for port in set(self.listeners) - set(ports):
            sock = self.listeners.pop(port)
            self.selector.unregister(sock)
            sock.close()
            self.say(f"port {port}: closed (its cluster left the state)")
        for port, (label, vid) in sorted(ports.items()):
            if port in self.listeners:
                self.selector.modify(self.listeners[port], selectors.EVENT_READ, (label, vid))
                continue
            family = socket.AF_INET6 if ":" in self.listen else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.listen, port))
            except OSError as exc:
                sock.close()
                self.say(f"port {port} (cluster {label}): cannot listen: {exc}")
                continue
            sock.listen(64)
            sock.setblocking(False)
            try:
                self.cluster_config(label)
            except OSError as exc:  # each connection tries again (and says why it failed)
                self.say(f"port {port} (cluster {label}): cannot write its sshd configuration yet: {exc}")
            self.listeners[port] = sock
            self.selector.register(sock, selectors.EVENT_READ, (label, vid))
            self.say(f"port {port}: cluster {label} (VLAN {vid})")

    def serve(self, *, every: float = 2.0, until: float | None = None) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # sessions are not waited for: the kernel reaps them
        self.sync()
        next_sync = time.monotonic() + every
        while until is None or time.monotonic() < until:
            for key, _ in self.selector.select(timeout=max(0.0, next_sync - time.monotonic())):
                self.accept(key.fileobj, *key.data)
            if time.monotonic() >= next_sync:
                self.sync()
                next_sync = time.monotonic() + every

    def cluster_config(self, label: str) -> Path:
        """The sshd configuration of cluster ``label``'s bastion, rendered whole: that cluster's principals
        command, so only its principals log in here, then the gateway's own configuration (``gateway config``
        wrote it, without a principals command when the gateway has a bastion per cluster) less any
        ``AuthorizedPrincipalsCommand`` it holds (one written before that). Exactly one such line, first: sshd
        takes the first value of a directive; OpenSSH 9.2 happens to keep the last of this one, and with the
        gateway's unfiltered command anywhere in the file some sshd would let every cluster's principals in on
        every cluster's port. (``Include`` of the gateway's file would bring its line along; a ``-o`` loses to
        the file.) :class:`OSError` when the gateway's configuration cannot be read."""
        path = self.ssh.root / "run" / f"sshd_config.{label}"
        shared = (self.state_dir / SSHD_CONFIG).absolute()
        kept = [line for line in shared.read_text().splitlines() if not _PRINCIPALS_COMMAND.match(line)]
        text = "\n".join(
            [
                f"# VirtCloud bastion of cluster {label}: {shared} with this cluster's principals command "
                "(written by bastion.py).",
                f"AuthorizedPrincipalsCommand {self.ssh.principals_command} %u %s {label}",
                *kept,
            ]
        )
        text += "\n"
        if not path.exists() or path.read_text() != text:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(path, text, 0o644)
        return path

    def accept(self, sock: socket.socket, label: str, vid: int) -> None:
        try:
            conn, peer = sock.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        path = NETNS_DIR / self.netns.format(vid=vid, cluster=label)
        if not path.exists():
            self.say(f"cluster {label}: no namespace {path.name} (its leg is not up): closed {peer[0]}'s connection")
            conn.close()
            return
        try:
            # sshd's privilege separation directory: Debian's ssh.service deletes it when it stops
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
            pid = os.fork()
        except OSError as exc:  # out of processes: this connection fails, the bastion goes on
            self.say(f"cluster {label}: cannot start a session for {peer[0]}: {exc}")
            conn.close()
            return
        if pid == 0:  # the session: sshd in the cluster's namespace, on this connection
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                enter_netns(path)
                conn.setblocking(True)
                os.dup2(conn.fileno(), 0)
                os.dup2(conn.fileno(), 1)
                argv = ["sshd", "-i", "-f", str(self.cluster_config(label))]
                os.execv(self.sshd, argv + (["-E", self.sshd_log] if self.sshd_log else []))  # noqa: S606
            except BaseException as exc:  # noqa: BLE001 - the child must never return into the loop
                self.say(f"cluster {label}: {exc}")
            finally:
                os._exit(1)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bastion.py", description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, help="the gateway's state directory")
    parser.add_argument("--listen", required=True, help="the address users reach the bastion at")
    parser.add_argument("--port-base", type=int, required=True, help="the gateway's ssh_port_base")
    parser.add_argument("--netns", default="vcl{vid}", help="each cluster's namespace name ({vid}, {cluster})")
    parser.add_argument("--sshd", default="/usr/sbin/sshd")
    parser.add_argument("--sshd-log", default="", help="sshd's log file (default: syslog)")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between reads of ssh/clusters.json")
    args = parser.parse_args(argv)
    if not 0 < args.port_base <= 65535 - 4094:
        parser.error("--port-base must leave room for every VLAN id (1..61441)")
    bastion = Bastion(
        Path(args.state),
        listen=args.listen,
        base=args.port_base,
        netns=args.netns,
        sshd=args.sshd,
        sshd_log=args.sshd_log,
    )
    bastion.serve(every=args.every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
