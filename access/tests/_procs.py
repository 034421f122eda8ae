"""Test helpers: throwaway network namespaces and daemons, each named with a per-run prefix.

Everything created here is removed by PID or by exact name; nothing touches the root namespace's links.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def can_use_netns() -> str | None:
    """None if namespaces work here, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    return None


def run_prefix() -> str:
    # Interface names are at most 15 characters: keep the prefix short.
    return "va" + secrets.token_hex(3)


def sh(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=timeout)


class Netns:
    """A network namespace with loopback up; deleted on :meth:`delete`."""

    def __init__(self, name: str):
        self.name = name
        sh("ip", "netns", "add", name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def ip(self, *args: str) -> None:
        sh("ip", "-n", self.name, *args)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
        return sh(*self.cmd(*args), check=check, timeout=timeout)

    def popen(self, *args: str, log: Path | None = None, **kw) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        return subprocess.Popen(self.cmd(*args), stdout=out, stderr=subprocess.STDOUT, **kw)

    def delete(self) -> None:
        sh("ip", "netns", "delete", self.name, check=False)


def public_link(gw: Netns, other: Netns, prefix: str, gw_addr: str, other_addr: str, other_if: str) -> None:
    """The gateway's public side: a veth pair gw (``<prefix>g``) ↔ other (``other_if``) with /30 addresses.
    Deleting either namespace removes the pair."""
    gw.ip("link", "add", f"{prefix}g", "type", "veth", "peer", "name", other_if, "netns", other.name)
    gw.ip("addr", "add", f"{gw_addr}/30", "dev", f"{prefix}g")
    gw.ip("link", "set", f"{prefix}g", "up")
    other.ip("addr", "add", f"{other_addr}/30", "dev", other_if)
    other.ip("link", "set", other_if, "up")


def gateway_link(gw: Netns, other: Netns, prefix: str, gw_addr: str, other_addr: str, other_if: str) -> str:
    """:func:`public_link`, and a persistent tap (``<prefix>t``) in the gateway namespace for OpenVPN.
    Returns the tap's name."""
    public_link(gw, other, prefix, gw_addr, other_addr, other_if)
    tap = f"{prefix}t"
    gw.ip("tuntap", "add", "dev", tap, "mode", "tap")
    gw.ip("link", "set", tap, "up")
    return tap


@contextlib.contextmanager
def gateway_pair(peer: str, gw_addr: str, peer_addr: str) -> Iterator[tuple[str, Netns, Netns, str, list]]:
    """A gateway namespace and a ``peer`` one (``cl``, ``ws``...) joined by :func:`gateway_link`; yields
    (prefix, gateway, peer, tap, procs). On exit the processes appended to ``procs`` are stopped and both
    namespaces deleted, also when setting up failed half-way."""
    prefix = run_prefix()
    made: list[Netns] = []
    procs: list[subprocess.Popen] = []
    try:
        gw = Netns(f"{prefix}-gw")
        made.append(gw)
        other = Netns(f"{prefix}-{peer}")
        made.append(other)
        tap = gateway_link(gw, other, prefix, gw_addr, peer_addr, f"{prefix}{peer[0]}")
        yield prefix, gw, other, tap, procs
    finally:
        for p in procs:
            stop(p)
        for ns in made:
            ns.delete()


@contextlib.contextmanager
def reachable_for(run_as, paths: Sequence[str | os.PathLike[str]]) -> Iterator[list[str]]:
    """A command prefix that runs its command in a mount namespace of its own in which ``run_as``
    (:class:`access.gateway.state.RunAs`) may search every directory on the way to ``paths`` — where OpenVPN's
    hooks must get to once it has dropped its privileges. This machine's Python lives under /root, pytest's
    temporary directories under /tmp/pytest-of-root, both 0700: a real gateway installs its code, its Python and
    its state where that account reaches them (the pull says when it cannot). The machine's own modes are left
    alone: in the namespace an empty 0711 tmpfs covers each directory in the way, with only the next step of the
    way bound back in. [] when nothing is in the way. Start the command inside the ``with``."""
    steps: list[tuple[Path, str]] = []  # (a directory the account may not search, the step below it) outermost first
    for path in paths:
        path = Path(os.path.abspath(path))
        for way in (path, path.resolve()):
            for d in reversed(way.parents):
                if not run_as.may(os.stat(d), 1) and (d, way.parts[len(d.parts)]) not in steps:
                    steps.append((d, way.parts[len(d.parts)]))
    staging = Path(tempfile.mkdtemp(prefix="vc-way-"))  # (in /tmp: under none of the directories it covers)
    try:
        lines = []
        for n, (d, step) in enumerate(steps):  # (a nested one is covered after its parent: its step is back by then)
            inner, stage, q = d / step, staging / str(n), shlex.quote
            if inner.is_dir():
                stage.mkdir()
            else:
                stage.touch()
            lines += [f"mount --bind {q(str(inner))} {q(str(stage))}", f"mount -t tmpfs -o mode=0711 vc {q(str(d))}"]
            lines += [f"{'mkdir' if inner.is_dir() else 'touch'} {q(str(inner))}"]
            lines += [f"mount --move {q(str(stage))} {q(str(inner))}"]
        script = " && ".join([*lines, 'exec "$@"'])
        yield ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"] if lines else []
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tagged_frame_seen(gw: Netns, tap: str, client: Netns, dev: str, vid: int, addr: str, target: str) -> str:
    """Send ARP from the client's tap ``dev`` (address ``addr``, pinging ``target``) and capture it, tagged
    ``vid``, on the gateway's trunk tap. Returns tcpdump's line, or "" when no such frame came."""
    dump = subprocess.Popen(
        gw.cmd("tcpdump", "-i", tap, "-e", "-n", "-l", "-c", "1", f"vlan {vid} and arp"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client.ip("addr", "add", f"{addr}/24", "dev", dev)
        client.ip("link", "set", dev, "up")
        time.sleep(0.3)  # tcpdump attaches
        deadline = time.monotonic() + 8
        while dump.poll() is None and time.monotonic() < deadline:
            client.run("ping", "-c", "1", "-W", "0.3", "-I", dev, target, check=False)
        return dump.stdout.read() if dump.poll() is not None else ""
    finally:
        stop(dump)


def node_sshd_config(d: Path, *, address: str, user_ca: Path, principals: Sequence[str] | str) -> Path:
    """A cluster node's sshd in ``d`` (which holds ``host_key`` and ``host_key-cert.pub``), as the cluster's
    image would set it up: the portal's user CA trusted for root with ``principals`` (a list, or the principals
    file as the portal renders it: ``authorized_principals`` of ``POST /api/access/host-certificates/``).
    Returns the config."""
    (d / "principals").mkdir(mode=0o755)
    text = principals if isinstance(principals, str) else "".join(f"{p}\n" for p in principals)
    (d / "principals" / "root").write_text(text)
    conf = d / "sshd_config"
    conf.write_text(
        "\n".join(
            [
                f"ListenAddress {address}:22",
                f"HostKey {d / 'host_key'}",
                f"HostCertificate {d / 'host_key-cert.pub'}",
                f"PidFile {d / 'sshd.pid'}",
                f"TrustedUserCAKeys {user_ca}",
                f"AuthorizedPrincipalsFile {d / 'principals'}/%u",
                "AuthorizedKeysFile none",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "PermitRootLogin prohibit-password",
                "LogLevel VERBOSE",
            ]
        )
        + "\n"
    )
    return conf


def stop(proc: subprocess.Popen | None, timeout: float = 3, *, kill: bool = False) -> None:
    """Terminate one process we started (by its PID), then kill it if it lingers; ``kill``: SIGKILL at once."""
    if proc is None or proc.poll() is not None:
        return
    if kill:
        proc.kill()
        proc.wait(timeout)
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def wait_for(predicate, timeout: float = 10, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def vmlane_fabric():
    """``network/lab/vmlane/fabric.py`` (the namespaces of the QEMU lane's tests), loaded by path, once: the lane
    runs without Django and must not import the OVS lab package."""
    if "vmlane_fabric" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "network" / "lab" / "vmlane" / "fabric.py"
        spec = importlib.util.spec_from_file_location("vmlane_fabric", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["vmlane_fabric"]
