"""The portal behind a real gunicorn on 127.0.0.1, for the benchmarks that measure over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start_gunicorn(env: dict, *, workers: int, threads: int = 1, log: Path | None = None):
    """Start gunicorn (``workers`` processes × ``threads``) on a free port of 127.0.0.1 and wait until it
    answers ``/healthz``; returns (process, base URL). The caller terminates the process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [str(Path(sys.executable).parent / "gunicorn"), "portal.wsgi", "-b", f"127.0.0.1:{port}"]
    argv += ["-w", str(workers), "--threads", str(threads), "--log-level", "warning"]
    out = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):  # noqa: S310 (our own server)
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"gunicorn did not start{f' (see {log})' if log else ''}") from None
            time.sleep(0.1)
