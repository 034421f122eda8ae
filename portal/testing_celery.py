"""The Celery app as the real-worker tests start it: the portal's app plus the fake device drivers of
``network.tests.fakes`` (platform/driver ``fake``), so a worker process can converge a fake fabric; and
``WorkerProcess``, a real worker subprocess for the tests and the benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from network.tests import fakes
from portal.celery import app

fakes.register()

__all__ = ["WorkerProcess", "app", "wait_for"]

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """A real ``celery worker`` subprocess with ``env`` (its database and broker), logging to ``log_path``;
    stopped by its PID. ``queues`` and ``env`` may be changed between ``stop`` and ``start``."""

    def __init__(
        self,
        env: dict,
        log_path: str | os.PathLike,
        *,
        queues: Sequence[str] = ("celery",),
        app: str = "portal.testing_celery",
        pool: str = "threads",
        concurrency: int = 8,
        name: str = "test",
        loglevel: str = "INFO",
    ):
        self.env = env
        self.log_path = str(log_path)
        self.queues = list(queues)
        self.app, self.pool, self.concurrency, self.name, self.loglevel = app, pool, concurrency, name, loglevel
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it to be ready (``wait_ready``): several start at once."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "celery", "-A", self.app, "worker", "-l", self.loglevel]
                + [f"--pool={self.pool}", f"--concurrency={self.concurrency}"]
                + ["--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", ",".join(self.queues)]
                + ["-n", f"{self.name}-{os.getpid()}-{time.monotonic_ns()}@localhost"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the worker logs "ready." (it consumes its queues); raises with the log's end otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if b"ready." in Path(self.log_path).read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"celery worker not ready after {timeout}s: {self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self) -> None:
        """Ask for a warm shutdown without waiting (``stop`` waits)."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned) — what a worker commits shows up in the
    test's database a moment later; an AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
