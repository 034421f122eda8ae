"""A small ``ovs-vsctl`` runner shared by the Open vSwitch switch and host drivers (and the lab).

It reaches one OVSDB (``--db=unix:/path/db.sock`` or ``tcp:host:port``) over one of three transports named
in the driver args:

- ``local`` (default): run ``ovs-vsctl`` on this machine;
- ``local`` with ``netns``: run it inside a network namespace (for a ``tcp:`` database only reachable there);
- ``ssh``: run it on a remote box (``ssh_host``, optional ``ssh_user``, ``ssh_port``, ``ssh_key``,
  ``ssh_options``), the way an operator would drive an OVS switch or an XCP-ng host. Host, user and options
  must pass ``network.drivers.sshargs.ssh_problems`` (no ssh option that runs a command on the worker).

Fast path: with the ``local`` transport (no ``netns``) and a ``unix:`` database, the reads and the small set of
writes the drivers use (``list``, ``set``/``clear`` of ``vlan_mode``/``tag``/``trunks``, ``external_ids`` keys)
talk OVSDB's JSON-RPC (RFC 7047) on the socket directly instead of starting an ``ovs-vsctl`` process (each
costs ~10 ms of CPU). Same transaction, same ``--wait`` semantics (``next_cfg`` incremented in the transaction,
then wait for ovs-vswitchd's ``cur_cfg``), same error classes and messages. Any other command still runs
``ovs-vsctl``. Driver arg ``jsonrpc: false`` turns the fast path off.

Failures are classified: a database that cannot be reached or does not answer in time is a
``TemporaryDeviceError``; a value OVSDB rejects or a port that does not exist is a ``PermanentDeviceError``.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from network.drivers.base import PermanentDeviceError, TemporaryDeviceError
from network.drivers.sshargs import ssh_problems

VSCTL = "ovs-vsctl"

# OVS reads an empty ``trunks`` set as "every VLAN". A trunk that must carry no VLAN at all is written as
# trunks=[4095] instead: 802.1Q reserves VID 4095, so no cluster ever uses it (the same "dead VLAN" Neutron's
# OVS agent uses). Readers translate it back to the empty set.
NO_VLANS = 4095
#: the vlan_mode of a trunk that carries a native VLAN (its ``tag``: untagged frames' VLAN) beside its list
NATIVE_MODES = ("native-tagged", "native-untagged")

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
    jsonrpc: bool = True  # use the JSON-RPC fast path when the database allows it (see the module docstring)
    # the JSON-RPC connection kept between ``keep_open`` and ``close`` (a driver session); not a value
    _kept: dict = field(default_factory=dict, init=False, repr=False, compare=False)

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
        if transport == "ssh":
            # checked when the inventory was saved too; a row written another way must not get through either
            problems = ssh_problems(
                host=args["ssh_host"], user=args.get("ssh_user", ""), options=args.get("ssh_options", ())
            )
            if problems:
                raise PermanentDeviceError(device, "; ".join(problems))
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
            jsonrpc=bool(args.get("jsonrpc", True)),
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
            # ``--``: nothing after it is an ssh option, whatever the target looks like; the remote shell
            # re-splits the command line: quote every word
            return [*ssh, "--", target, shlex.join(vsctl)]
        if self.netns:
            return ["ip", "netns", "exec", self.netns, *vsctl]
        return vsctl

    def run(self, *commands: Sequence[str], json_format: bool = False, wait: bool | None = None) -> str:
        """Run ``commands`` as one OVSDB transaction and return stdout; raise a classified DeviceError."""
        plan = _translate(commands) if self._socket_path() else None
        if plan is not None:
            return self._rpc_run(plan, json_format=json_format, wait=self.wait if wait is None else wait)
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

    def run_rows(self, *commands: Sequence[str], wait: bool | None = None) -> list[list[dict]]:
        """``run(*commands)`` (one transaction) and the rows of its ``list`` commands, parsed (what
        ``parse_tables`` makes of ``run(..., json_format=True)``)."""
        plan = _translate(commands) if self._socket_path() else None
        if plan is None:
            return parse_tables(self.run(*commands, json_format=True, wait=wait))
        return self._rpc_rows(plan, wait=self.wait if wait is None else wait)

    def run_then_query(
        self, commands: Sequence[Sequence[str]], lists: Sequence[tuple[str, Iterable[str], Sequence[str]]]
    ) -> list[list[dict]]:
        """``run(*commands)`` (one transaction, waiting for ovs-vswitchd as configured), then ``query(*lists)``.
        On the JSON-RPC path with ``wait``, the reads are in the same request as the wait for ovs-vswitchd
        (OVSDB runs a transaction's operations in order): they see the database the moment ovs-vswitchd
        reports the change applied, one round trip less than a separate read."""
        plan = _translate(commands) if self._socket_path() else None
        reads = [_list_plan(table, columns, records) for table, columns, records in lists]
        writes = plan is not None and any(step[0] != "list" for step in plan)
        if not writes or not self.wait or any(r is None for r in reads):
            self.run(*commands)
            return self.query(*lists)
        return self._rpc_apply(plan, wait=True, after=reads)[2]

    def _env(self) -> dict[str, str] | None:
        if not self.env:
            return None
        return {**os.environ, **self.env}

    def list_rows(self, table: str, columns: Iterable[str], *records: str) -> list[dict]:
        """``ovs-vsctl list`` as dicts of plain Python values (sets → lists, maps → dicts, uuids → str)."""
        return self.query((table, columns, records))[0]

    def query(self, *lists: tuple[str, Iterable[str], Sequence[str]]) -> list[list[dict]]:
        """Several ``list TABLE [records]`` reads in one ovs-vsctl run (one consistent snapshot). A record
        starting with ``--`` is a command option (``--if-exists``: records that do not exist are skipped)."""
        if self._socket_path():
            plan = [_list_plan(table, columns, records) for table, columns, records in lists]
            if all(p is not None for p in plan):
                return self._rpc_rows(plan, wait=False)
        commands = []
        for table, columns, records in lists:
            options = [r for r in records if r.startswith("--")]
            names = [r for r in records if not r.startswith("--")]
            commands.append([*options, "--columns=" + ",".join(columns), "list", table, *names])
        return parse_tables(self.run(*commands, json_format=True, wait=False))

    def bridge_ports(
        self,
        bridge: str,
        columns: Iterable[str],
        *,
        named: Sequence[str] = (),
        tagged: bool = False,
        internal: bool = False,
    ) -> list[dict] | None:
        """The Port rows of ``bridge`` (``_uuid``, ``name`` and ``columns``), or None when there is no such
        bridge. With ``named`` and/or ``tagged``, only the ports with one of those names or with a ``tag``
        (a hypervisor's VM ports). With ``internal``, each row says too whether its interface is an OVS
        internal port (``"internal"``: the host's own network stack, not a VM's).

        On the JSON-RPC path only the bridge's own ports are read: its row, then its ports by uuid (two small
        round trips on one connection); restricted, ONE transaction: the bridge's row, the named ports and
        the tagged ones (and the internal interfaces' names), kept when they belong to the bridge."""
        columns = list(dict.fromkeys(["_uuid", "name", *columns]))
        restricted = bool(named) or tagged

        def wanted(row: dict) -> bool:
            return not restricted or row["name"] in named or (tagged and bool(as_set(row.get("tag"))))

        def marked(rows: list[dict], internals: set[str]) -> list[dict]:
            return [{**row, "internal": row["name"] in internals} for row in rows] if internal else rows

        if not self._socket_path():
            reads = [("Bridge", ("name", "ports"), ("--if-exists", bridge)), ("Port", columns, ())]
            mine, ports, *interfaces = self.query(*reads, *([("Interface", ("name", "type"), ())] if internal else []))
            if not mine:
                return None
            members = set(as_set(mine[0]["ports"]))
            internals = {i["name"] for i in (interfaces[0] if interfaces else []) if i.get("type") == "internal"}
            return marked([row for row in ports if row["_uuid"] in members and wanted(row)], internals)
        deadline = time.monotonic() + self.timeout
        bridge_op = {"op": "select", "table": "Bridge", "where": [["name", "==", bridge]], "columns": ["ports"]}
        internal_op = {"op": "select", "table": "Interface", "where": [["type", "==", "internal"]], "columns": ["name"]}
        if restricted:
            selects = [[["name", "==", name]] for name in dict.fromkeys(named)]
            if tagged:
                selects.append([["tag", "!=", ["set", []]]])
            ops = [bridge_op, *({"op": "select", "table": "Port", "where": w, "columns": columns} for w in selects)]
            if internal:
                ops.append(internal_op)
            found, *results = self._transact(ops, deadline)
            if not found.get("rows"):
                return None
            internals = {row["name"] for row in results.pop()["rows"]} if internal else set()
            members = {uuid for _kind, uuid in _uuid_list(found["rows"][0]["ports"])}
            rows = {row["_uuid"][1]: row for result in results for row in result["rows"]}
            return marked(
                [{c: _value(row.get(c)) for c in columns} for uuid, row in rows.items() if uuid in members], internals
            )
        found, *extra = self._transact([bridge_op, *([internal_op] if internal else [])], deadline)
        if not found.get("rows"):
            return None
        internals = {row["name"] for row in extra[0]["rows"]} if internal else set()
        members = [uuid for _kind, uuid in _uuid_list(found["rows"][0]["ports"])]
        if not members:
            return []
        results = self._transact(
            [
                {"op": "select", "table": "Port", "where": [["_uuid", "==", ["uuid", uuid]]], "columns": columns}
                for uuid in members
            ],
            deadline,
        )
        rows = [{column: _value(row.get(column)) for column in columns} for result in results for row in result["rows"]]
        return marked(rows, internals)

    # --- JSON-RPC fast path ---------------------------------------------------------------------------------

    def _socket_path(self) -> str:
        """The unix socket to talk JSON-RPC on, or "" when the fast path does not apply."""
        if not self.jsonrpc or self.transport != "local" or self.netns or self.env or not self.db.startswith("unix:"):
            return ""
        return self.db.removeprefix("unix:")

    def _rpc_rows(self, plan: list[tuple], *, wait: bool) -> list[list[dict]]:
        """Execute translated commands as ONE ``transact`` and return the rows of its ``list`` steps, parsed."""
        results, selects, _ = self._rpc_apply(plan, wait=wait)
        return self._list_rows(results, selects)

    def _rpc_run(self, plan: list[tuple], *, json_format: bool, wait: bool) -> str:
        """Execute translated commands as ONE ``transact`` and return what ovs-vsctl would have printed."""
        results, selects, _ = self._rpc_apply(plan, wait=wait)
        return self._list_output(results, selects, json_format)

    def _rpc_apply(
        self, plan: list[tuple], *, wait: bool, after: Sequence[tuple] = ()
    ) -> tuple[list, list[tuple], list[list[dict]]]:
        """Execute translated commands as ONE ``transact``: (its results, where its ``list`` steps' rows are
        in them, the ``list`` steps ``after`` read with the wait for ovs-vswitchd, parsed)."""
        ops: list[dict] = []
        checks: list[tuple[int, str, str]] = []  # (op index, table, name): rows that must exist
        lists: list[tuple] = []  # (first op, table, columns, names, if_exists)
        writes = False
        for step in plan:
            kind = step[0]
            if kind == "list":
                _add_select(ops, lists, step)
                continue
            writes = True
            _, table, record, change = step
            where = _where(table, record)
            if where and (table, record) not in {(t, r) for _, t, r in checks}:
                checks.append((len(ops), table, record))
                # the row must exist (ovs-vsctl: 'no row "X" in table T'); fails the whole transaction
                ops.append(
                    {
                        "op": "wait",
                        "table": table,
                        "timeout": 0,
                        "where": where,
                        "columns": [_KEY[table]],
                        "until": "==",
                        "rows": [{_KEY[table]: record}],
                    }
                )
            if kind == "update":
                ops.append({"op": "update", "table": table, "where": where, "row": change})
            else:
                ops.append({"op": "mutate", "table": table, "where": where, "mutations": change})
        cfg_op = -1
        if writes and wait:
            ops.append({"op": "mutate", "table": "Open_vSwitch", "where": [], "mutations": [["next_cfg", "+=", 1]]})
            cfg_op = len(ops)
            ops.append({"op": "select", "table": "Open_vSwitch", "where": [], "columns": ["next_cfg"]})
        deadline = time.monotonic() + self.timeout
        results = self._transact(ops, deadline)
        for index, result in enumerate(results):
            if isinstance(result, dict) and "error" in result:
                for op_index, table, record in checks:
                    if op_index == index:
                        raise PermanentDeviceError(
                            self.device, f'OVSDB {self.db} rejected the change: no row "{record}" in table {table}'
                        )
                text = result["error"] + (f": {result['details']}" if result.get("details") else "")
                if any(m in text for m in _TEMPORARY_MARKERS):
                    raise TemporaryDeviceError(self.device, f"OVSDB {self.db}: {text}")
                raise PermanentDeviceError(self.device, f"OVSDB {self.db} rejected the change: {text}")
        if len(results) > len(ops) and isinstance(results[-1], dict) and "error" in results[-1]:
            text = results[-1]["error"] + (f": {results[-1]['details']}" if results[-1].get("details") else "")
            raise PermanentDeviceError(self.device, f"OVSDB {self.db} rejected the change: {text}")
        found: list[list[dict]] = []
        if cfg_op >= 0:
            found = self._wait_applied(results[cfg_op]["rows"][0]["next_cfg"], deadline, after)
        return results, lists, found

    def _list_output(self, results: list, lists: list[tuple], json_format: bool) -> str:
        """What ovs-vsctl ``--format=json list`` prints for each read of ``lists``."""
        lines = []
        for columns, rows in self._selected(results, lists):
            data = [[row.get(c) for c in columns] for row in rows]
            lines.append(json.dumps({"headings": columns, "data": data}) if json_format else "")
        return "".join(line + "\n" for line in lines)

    def _list_rows(self, results: list, lists: list[tuple]) -> list[list[dict]]:
        """The rows of each read of ``lists`` as ``parse_tables`` gives them from ovs-vsctl's output (without
        printing and parsing JSON again)."""
        return [
            [{c: _value(row.get(c)) for c in columns} for row in rows]
            for columns, rows in self._selected(results, lists)
        ]

    def _selected(self, results: list, lists: list[tuple]) -> list[tuple[list[str], list[dict]]]:
        """(columns, raw rows) of each read of ``lists``; a named row that is missing without ``--if-exists``
        is ovs-vsctl's 'no row' error."""
        out = []
        for first, table, columns, names, if_exists in lists:
            if names:
                rows = []
                for offset, name in enumerate(names):
                    found = results[first + offset]["rows"]
                    if not found and not if_exists:
                        raise PermanentDeviceError(
                            self.device, f'OVSDB {self.db} rejected the change: no row "{name}" in table {table}'
                        )
                    rows += found
            else:
                rows = results[first]["rows"]
            out.append((columns, rows))
        return out

    def _wait_applied(self, next_cfg: int, deadline: float, after: Sequence[tuple] = ()) -> list[list[dict]]:
        """ovs-vsctl ``--wait``: block until ovs-vswitchd reports ``cur_cfg >= next_cfg``. A server-side
        ``wait`` operation does it in one round trip; it fails with "timed out" at the deadline. The ``list``
        steps ``after`` are read in the same transaction, right after the wait succeeds (returned parsed)."""
        ms = max(1, int((deadline - time.monotonic()) * 1000))
        wait_op = {
            "op": "wait",
            "table": "Open_vSwitch",
            "timeout": ms,
            "where": [["cur_cfg", ">=", next_cfg]],
            "columns": [],
            "until": "!=",
            "rows": [],
        }
        ops: list[dict] = [wait_op]
        lists: list[tuple] = []
        for step in after:
            _add_select(ops, lists, step)
        results = self._transact(ops, deadline + 1)
        if "error" in results[0]:
            raise TemporaryDeviceError(
                self.device, f"OVSDB {self.db}: timeout waiting for ovs-vswitchd to apply the change"
            )
        return self._list_rows(results, lists)

    def keep_open(self) -> None:
        """From now until ``close``, the JSON-RPC transactions share one connection (a driver session:
        one connect instead of one per transaction, for this process and for ovsdb-server). The connection
        may be one a previous session of this process left idle (see ``_IdleConnections``)."""
        self._kept["keep"] = True

    def close(self) -> None:
        """End the session: a healthy kept connection (no error, nothing unread) is left idle for the next
        session of this process to the same database, any other is closed; later transactions connect each
        time again."""
        sock = self._kept.pop("sock", None)
        leftover = self._kept.get("rest")
        self._kept.clear()
        if sock is None:
            return
        if leftover:
            sock.close()
        else:
            _IDLE.give_back(self._socket_path(), sock)

    def _transact(self, ops: list[dict], deadline: float) -> list:
        """One JSON-RPC ``transact`` (on the kept connection, or a new one); connection problems and
        silence are temporary. A connection that saw any error is not used again."""
        sock = self._kept.get("sock")
        if sock is None:
            sock = self._connect(deadline)
        request_id = self._kept.get("next_id", 0)
        self._kept["next_id"] = request_id + 1
        request = json.dumps({"method": "transact", "params": ["Open_vSwitch", *ops], "id": request_id}).encode()
        keep = False
        try:
            sock.sendall(request)
            result = self._receive(sock, deadline, request_id)
            keep = bool(self._kept.get("keep"))
            return result
        except TimeoutError:
            raise TemporaryDeviceError(
                self.device, f"OVSDB {self.db} did not answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise TemporaryDeviceError(
                self.device, f"OVSDB {self.db}: connection reset ({exc.strerror or exc})"
            ) from None
        finally:
            if keep:
                self._kept["sock"] = sock
            else:
                self._kept.pop("sock", None)
                self._kept.pop("rest", None)
                sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        if self._kept.get("keep"):
            idle = _IDLE.take(self._socket_path(), timeout=max(0.001, deadline - time.monotonic()))
            if idle is not None:
                return idle
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(self._socket_path())
        except OSError as exc:
            sock.close()
            raise TemporaryDeviceError(
                self.device, f"OVSDB {self.db}: database connection failed ({exc.strerror or exc})"
            ) from None
        return sock

    def _receive(self, sock: socket.socket, deadline: float, request_id: int) -> list:
        decoder = json.JSONDecoder()
        raw = self._kept.pop("rest", b"")
        while True:
            try:
                buffer = raw.decode()
            except UnicodeDecodeError:
                buffer = ""  # a multi-byte character split across reads: read more
            while buffer.strip():
                try:
                    message, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break  # incomplete: read more
                buffer = buffer.lstrip()[end:]
                raw = buffer.encode()
                if message.get("method") == "echo":  # the server's keepalive: answer it
                    sock.sendall(json.dumps({"result": message["params"], "id": message["id"]}).encode())
                    continue
                if message.get("id") != request_id:
                    continue
                if raw.strip():
                    self._kept["rest"] = raw  # what the server sent after our answer (a keepalive)
                if message.get("error") is not None:
                    raise PermanentDeviceError(self.device, f"OVSDB {self.db} rejected the change: {message['error']}")
                return message["result"]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("connection closed by ovsdb-server")
            raw += chunk


# Tables the fast path knows: how a record is named (``.`` = the one Open_vSwitch row) …
_KEY = {"Port": "name", "Bridge": "name", "Interface": "name", "Open_vSwitch": ""}
# … and the columns it may write, with their type (anything else runs ovs-vsctl).
_COLUMNS = {"vlan_mode": "string", "tag": "integer", "trunks": "integer-set", "external_ids": "map"}


def _add_select(ops: list[dict], lists: list[tuple], step: tuple) -> None:
    """Append the select ops of one ``list`` plan step to ``ops`` and note where they are in ``lists``."""
    _, table, columns, names, if_exists = step
    first = len(ops)
    for name in names or [None]:
        where = [] if name is None else [[_KEY[table], "==", name]]
        ops.append({"op": "select", "table": table, "where": where, "columns": list(columns)})
    lists.append((first, table, list(columns), names, if_exists))


def _uuid_list(datum) -> list[tuple[str, str]]:
    """An OVSDB set-of-uuids datum (``["set", [["uuid", u], …]]`` or a single ``["uuid", u]``) as pairs."""
    if datum and datum[0] == "set":
        return [tuple(item) for item in datum[1]]
    return [tuple(datum)] if datum else []


def _where(table: str, record: str) -> list:
    return [] if table == "Open_vSwitch" else [[_KEY[table], "==", record]]


def _list_plan(table: str, columns: Iterable[str], records: Sequence[str]) -> tuple | None:
    if table not in _KEY:
        return None
    options = [r for r in records if r.startswith("--")]
    names = [r for r in records if not r.startswith("--")]
    if set(options) - {"--if-exists"} or (table == "Open_vSwitch" and names):
        return None
    return ("list", table, tuple(columns), names, bool(options))


def _atom(kind: str, text: str):
    if kind == "integer":
        return int(text)
    if kind == "integer-set":
        return ["set", [int(v) for v in text.split(",") if v.strip()]]
    return json.loads(text) if text.startswith('"') else text


class _IdleConnections:
    """JSON-RPC connections a finished driver session left open, per database socket, for the next session
    of this process to the same device: a converge then costs neither a connect nor a close, for the worker
    nor for ovsdb-server (a network management system keeps its device sessions the same way). Kept at most
    ``max_age`` seconds — ovsdb-server probes a client idle for 5 s and drops one that does not answer — and
    ``per_db`` per database; one the server closed meanwhile (restarted, gone) is noticed before reuse and
    replaced by a new connection. Keyed by process id as well: a forked child never shares its parent's."""

    def __init__(self, *, max_age: float = 4.0, per_db: int = 4):
        self.max_age, self.per_db = max_age, per_db
        self._lock = threading.Lock()
        self._idle: dict[tuple[int, str], list[tuple[float, socket.socket]]] = {}

    def take(self, path: str, *, timeout: float) -> socket.socket | None:
        """An idle connection to ``path`` still open, with ``timeout`` set on it; None when there is none."""
        key = (os.getpid(), path)
        while True:
            with self._lock:
                stack = self._idle.get(key)
                if not stack:
                    return None
                since, sock = stack.pop()
            if time.monotonic() - since <= self.max_age and _still_open(sock):
                sock.settimeout(timeout)
                return sock
            sock.close()

    def give_back(self, path: str, sock: socket.socket) -> None:
        key = (os.getpid(), path)
        with self._lock:
            stack = self._idle.setdefault(key, [])
            now = time.monotonic()
            stale = [s for since, s in stack if now - since > self.max_age]
            stack[:] = [(since, s) for since, s in stack if now - since <= self.max_age]
            if len(stack) < self.per_db:
                stack.append((now, sock))
                sock = None
        for old in stale:
            old.close()
        if sock is not None:
            sock.close()

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for stack in idle.values():
            for _since, sock in stack:
                sock.close()


def _still_open(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` (a peek, without waiting: end of stream means closed; pending
    data, an ovsdb-server echo request, is read and answered by the next transaction). Leaves ``sock``
    non-blocking: the caller sets the timeout it needs."""
    try:
        sock.setblocking(False)  # a socket with a timeout would wait for data up to that timeout
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


_IDLE = _IdleConnections()


def _translate(commands: Sequence[Sequence[str]]) -> list[tuple] | None:
    """ovs-vsctl commands → fast-path steps, or None when any command is outside what the fast path knows."""
    plan: list[tuple] = []
    try:
        for command in commands:
            command = list(command)
            if "list" in command:
                at = command.index("list")
                options, (table, *records) = command[:at], command[at + 1 :]
                columns = [o.removeprefix("--columns=").split(",") for o in options if o.startswith("--columns=")]
                others = [o for o in options if not o.startswith("--columns=")]
                if len(columns) != 1:
                    return None
                step = _list_plan(table, columns[0], [*others, *records])
                if step is None:
                    return None
                plan.append(step)
                continue
            verb, table, record, *rest = command
            if table not in _KEY or (table == "Open_vSwitch") != (record == "."):
                return None
            if verb == "set":
                row = {}
                for item in rest:
                    column, equals, value = item.partition("=")
                    column, _, key = column.partition(":")
                    kind = _COLUMNS.get(column)
                    if kind is None or (kind == "map") != bool(key) or not equals:
                        return None
                    if key:
                        key = json.loads(key) if key.startswith('"') else key
                        # "insert" never overwrites a key: delete it first (mutations apply in order)
                        mutations = [
                            [column, "delete", ["set", [key]]],
                            [column, "insert", ["map", [[key, _atom("string", value)]]]],
                        ]
                        plan.append(("mutate", table, record, mutations))
                    else:
                        row[column] = _atom(kind, value)
                if row:
                    plan.append(("update", table, record, row))
            elif verb == "clear":
                if not rest or any(c not in _COLUMNS for c in rest):
                    return None
                plan.append(
                    ("update", table, record, {c: ["map" if _COLUMNS[c] == "map" else "set", []] for c in rest})
                )
            elif verb == "remove":
                column, *keys = rest
                if _COLUMNS.get(column) != "map" or not keys:
                    return None
                keys = [json.loads(k) if k.startswith('"') else k for k in keys]
                plan.append(("mutate", table, record, [[column, "delete", ["set", keys]]]))
            else:
                return None
    except (ValueError, TypeError):
        return None  # not something the fast path parses: let ovs-vsctl handle (and report) it
    return plan


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
