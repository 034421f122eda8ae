"""A throwaway PostgreSQL server for tests and benchmarks that need more connections than the machine's
server allows (``max_connections`` is 100 there; the allocation race wants 200 at once).

``throwaway_postgres(max_connections=…)`` runs ``initdb`` into a new temporary folder and starts ``postgres``
listening on 127.0.0.1 only (a free port) and on a socket in that folder, trust authentication, no fsync;
it yields the server's URL (database ``postgres``) and stops the server by its PID at the end, then
removes the folder. As root, the server runs as the ``postgres`` account (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class ServerUnavailable(RuntimeError):
    """PostgreSQL's server programs are not installed, or the server did not start; the message says which."""


def server_bin() -> Path | None:
    """The folder of the newest installed PostgreSQL server programs (Debian layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def throwaway_postgres(max_connections: int = 260, *, timeout: float = 30.0) -> Iterator[str]:
    binaries = server_bin()
    if binaries is None:
        raise ServerUnavailable("PostgreSQL server programs not found under /usr/lib/postgresql/*/bin")
    folder = Path(tempfile.mkdtemp(prefix="virtcloud-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    port = _free_port()
    server = None
    try:
        done = subprocess.run(
            [*as_user, str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"]
            + ["-E", "UTF8", "--locale=C"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise ServerUnavailable(f"initdb failed: {done.stderr.strip()[-500:]}")
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": str(folder),
            "max_connections": str(max_connections),
            "shared_buffers": "64MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        with open(folder / "server.log", "wb") as log:  # the server keeps its own copy of the descriptor
            server = subprocess.Popen(
                [*as_user, str(binaries / "postgres"), "-D", str(data), *options], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise ServerUnavailable(f"postgres exited: {(folder / 'server.log').read_text()[-1000:]}")
            ready = subprocess.run(
                [str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)], check=False
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise ServerUnavailable(f"postgres not ready after {timeout:g} s")
            time.sleep(0.1)
        yield f"postgres://postgres@127.0.0.1:{port}/postgres"
    finally:
        if server is not None:
            _stop(server, data / "postmaster.pid")
        shutil.rmtree(folder, ignore_errors=True)


def _stop(server: subprocess.Popen, pid_file: Path) -> None:
    """Fast shutdown of the postmaster by its PID (from its pid file), then wait for ``server`` (runuser)."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
