"""A small ``ovs-vsctl`` runner shared by the Open vSwitch switch and host drivers (and the lab).

It reaches one OVSDB (``--db=unix:/path/db.sock`` or ``tcp:host:port``) over one of three transports named
in the driver args:

- ``local`` (default): run ``ovs-vsctl`` on this machine;
- ``local`` with ``netns``: run it inside a network namespace (for a ``tcp:`` database only reachable there);
- ``ssh``: run it on a remote box (``ssh_host``, optional ``ssh_user``, ``ssh_port``, ``ssh_key``,
  ``ssh_options``), the way an operator would drive an OVS switch or an XCP-ng host.

Failures are classified: a database that cannot be reached or does not answer in time is a
``TemporaryDeviceError``; a value OVSDB rejects or a port that does not exist is a ``PermanentDeviceError``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from network.drivers.base import PermanentDeviceError, TemporaryDeviceError

VSCTL = "ovs-vsctl"

# OVS reads an empty ``trunks`` set as "every VLAN". A trunk that must carry no VLAN at all is written as
# trunks=[4095] instead: 802.1Q reserves VID 4095, so no cluster ever uses it (the same "dead VLAN" Neutron's
# OVS agent uses). Readers translate it back to the empty set.
NO_VLANS = 4095

# ovs-vsctl messages that mean "the device is not there right now", as opposed to "the device said no".
_TEMPORARY_MARKERS = (
    "database connection failed",
    "timeout",
    "Connection refused",
    "connection reset",
    "No such file or directory",  # the socket is gone (daemon restarting)
    "transaction error",  # another client won a race; the whole transaction was rolled back
)


@dataclass(frozen=True)
class Ovsdb:
    """How to reach one OVSDB. ``device`` names the switch or host in every error message."""

    device: str
    db: str
    transport: str = "local"
    netns: str = ""
    ssh_host: str = ""
    ssh_user: str = ""
    ssh_port: int = 22
    ssh_key: str = ""
    ssh_options: tuple[str, ...] = ()
    timeout: float = 30.0
    wait: bool = True  # wait until ovs-vswitchd has applied a change (not only OVSDB stored it)
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_args(cls, device: str, db: str, args: Mapping, timeout: float = 30.0) -> Ovsdb:
        """Build from NAPALM-style optional args / ``driver_args``; unknown transports are permanent errors."""
        transport = str(args.get("transport", "local"))
        if transport not in ("local", "ssh"):
            raise PermanentDeviceError(device, f"unknown OVSDB transport {transport!r} (use local or ssh)")
        if transport == "ssh" and not args.get("ssh_host"):
            raise PermanentDeviceError(device, "transport ssh needs ssh_host in the driver args")
        if not db:
            raise PermanentDeviceError(device, "no OVSDB address (e.g. unix:/run/openvswitch/db.sock)")
        return cls(
            device=device,
            db=db,
            transport=transport,
            netns=str(args.get("netns", "")),
            ssh_host=str(args.get("ssh_host", "")),
            ssh_user=str(args.get("ssh_user", "")),
            ssh_port=int(args.get("ssh_port", 22)),
            ssh_key=str(args.get("ssh_key", "")),
            ssh_options=tuple(args.get("ssh_options", ())),
            timeout=float(args.get("timeout", timeout)),
            wait=bool(args.get("wait", True)),
        )

    def argv(self, commands: Sequence[Sequence[str]], *, json_format: bool = False, wait: bool | None = None):
        """The full command line: one ovs-vsctl run, every command joined with ``--`` (one transaction)."""
        wait = self.wait if wait is None else wait
        vsctl = [VSCTL, f"--db={self.db}", f"--timeout={max(1, int(self.timeout))}"]
        if not wait:
            vsctl.append("--no-wait")
        if json_format:
            vsctl += ["--format=json"]
        for command in commands:
            vsctl += ["--", *command]
        if self.transport == "ssh":
            target = f"{self.ssh_user}@{self.ssh_host}" if self.ssh_user else self.ssh_host
            ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(self.timeout))}"]
            ssh += ["-p", str(self.ssh_port)]
            if self.ssh_key:
                ssh += ["-i", self.ssh_key]
            for option in self.ssh_options:
                ssh += ["-o", option]
            # the remote shell re-splits the command line: quote every word
            return [*ssh, target, "--", shlex.join(vsctl)]
        if self.netns:
            return ["ip", "netns", "exec", self.netns, *vsctl]
        return vsctl

    def run(self, *commands: Sequence[str], json_format: bool = False, wait: bool | None = None) -> str:
        """Run ``commands`` as one OVSDB transaction and return stdout; raise a classified DeviceError."""
        argv = self.argv(commands, json_format=json_format, wait=wait)
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout + 5, env=self._env(), check=False
            )
        except subprocess.TimeoutExpired:
            raise TemporaryDeviceError(
                self.device, f"OVSDB {self.db} did not answer within {self.timeout:g} s"
            ) from None
        except FileNotFoundError as exc:
            raise PermanentDeviceError(self.device, f"cannot run {exc.filename}: not installed") from None
        if proc.returncode == 0:
            return proc.stdout
        message = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
        message = message.removeprefix("ovs-vsctl: ")
        if self.transport == "ssh" and proc.returncode == 255:
            raise TemporaryDeviceError(self.device, f"ssh to {self.ssh_host} failed: {message}")
        if proc.returncode < 0 or proc.returncode == 142 or any(m in message for m in _TEMPORARY_MARKERS):
            # 142 = 128 + SIGALRM: ovs-vsctl's own --timeout fired (daemon hung or ovs-vswitchd not running)
            raise TemporaryDeviceError(self.device, f"OVSDB {self.db}: {message or 'timed out'}")
        raise PermanentDeviceError(self.device, f"OVSDB {self.db} rejected the change: {message}")

    def _env(self) -> dict[str, str] | None:
        if not self.env:
            return None
        import os

        return {**os.environ, **self.env}

    def list_rows(self, table: str, columns: Iterable[str], *records: str) -> list[dict]:
        """``ovs-vsctl list`` as dicts of plain Python values (sets → lists, maps → dicts, uuids → str)."""
        return self.query((table, columns, records))[0]

    def query(self, *lists: tuple[str, Iterable[str], Sequence[str]]) -> list[list[dict]]:
        """Several ``list TABLE [records]`` reads in one ovs-vsctl run (one consistent snapshot). A record
        starting with ``--`` is a command option (``--if-exists``: records that do not exist are skipped)."""
        commands = []
        for table, columns, records in lists:
            options = [r for r in records if r.startswith("--")]
            names = [r for r in records if not r.startswith("--")]
            commands.append([*options, "--columns=" + ",".join(columns), "list", table, *names])
        return parse_tables(self.run(*commands, json_format=True, wait=False))


def parse_tables(out: str) -> list[list[dict]]:
    """The tables ``list`` commands printed in an ovs-vsctl ``--format=json`` run, as lists of dicts."""
    tables = []
    for line in out.splitlines():
        if not line.strip():
            continue
        data = json.loads(line)
        tables.append([dict(zip(data["headings"], (_value(v) for v in row), strict=True)) for row in data["data"]])
    return tables


def _value(v):
    """Decode an OVSDB JSON datum (RFC 7047 §5.1) into plain Python."""
    if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
        kind, payload = v
        if kind == "set":
            return [_value(x) for x in payload]
        if kind == "map":
            return {_value(k): _value(x) for k, x in payload}
        if kind in ("uuid", "named-uuid"):
            return payload
    return v


def as_set(value) -> list:
    """OVSDB returns a one-element set as a bare atom: normalise to a list."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def trunks_value(vids: Iterable[int]) -> str:
    """The ``trunks=`` argument for exactly ``vids`` (never the empty set, which means every VLAN)."""
    vids = sorted(set(vids))
    return ",".join(str(v) for v in vids) if vids else str(NO_VLANS)


def trunks_read(raw) -> frozenset[int] | None:
    """VLAN ids a trunk carries; ``None`` means every VLAN (OVS empty trunks)."""
    vids = {int(v) for v in as_set(raw)}
    if not vids:
        return None
    return frozenset(vids - {NO_VLANS})


def quote(text: str) -> str:
    """An OVSDB string atom as ovs-vsctl parses it (JSON string syntax keeps newlines and commas)."""
    return json.dumps(text)
