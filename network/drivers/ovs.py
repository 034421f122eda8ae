"""Open vSwitch as a site switch: a NAPALM ``NetworkDriver`` over OVSDB (``network.drivers.ovsdb``: JSON-RPC on a
local socket, ``ovs-vsctl --db=...`` otherwise).

OVS switches exist in production (Pica8 PicOS; XenServer/XCP-ng run OVS), and the lab's site switches are
OVS bridges, so this driver is both a production platform and the lab's.

Configuration language (the project's own, one line per port)::

    port p-h1 trunks 100,200-202      # a trunk carrying exactly these VLANs
    port p-h2 trunks none             # a trunk carrying no VLAN

``get_config()["running"]`` prints every port of the bridge in that form (ports that are not plain trunks
as ``port x access 5`` or ``port x vlan_mode native-untagged tag 5 trunks 7``); a candidate may only hold
``trunks`` lines. Semantics follow a real NOS: ``load_merge_candidate`` merges lines into a candidate,
``compare_config`` shows per port exactly the VLANs added and removed (``port p-h1 trunks add 300
remove 100-102``), ``commit_config`` applies every
changed port in ONE OVSDB transaction together with a rollback record stored on the device (bridge
``external_ids:virtcloud-rollback``), ``rollback`` restores the ports of the last commit, ``discard_config``
drops the candidate. Ports that are not in the candidate are never written.

Reads: like a NOS configuration session, the driver takes one snapshot of the ports the portal owns when it
opens and works from it through ``load_merge_candidate`` / ``compare_config`` / ``commit_config``. A commit
replaces the snapshot with the owned ports read back in the request that waits for ovs-vswitchd to apply it
(the same OVSDB transaction as that wait, right after it: what the device holds once the change is live);
``rollback`` and ``close`` drop it, and it is read again when older than ``snapshot_max_age`` (driver arg,
default 5 s). So a converge costs three OVSDB round trips (read; commit; wait + verifying read) and a
converge with nothing to change one. The commit writes absolute values
(``vlan_mode=trunk``, the whole trunk list, no tag; a ``native-tagged``/``native-untagged`` trunk whose native VLAN
the candidate holds — the port's static VLANs — keeps its mode and tag, as an IOS trunk keeps its native VLAN
under ``switchport trunk allowed vlan``), so a snapshot a few milliseconds old can only make the
verifying read fail, never write a wrong value. The NAPALM getters (``get_vlans``, ``get_facts``,
``get_config``) always read the whole bridge afresh.

Driver args (NAPALM ``optional_args``): ``bridge`` (scope: the switch is this bridge; default every bridge),
``port_map`` (inventory port name → OVS port name, when they differ, as in the lab where all switches share
one ovs-vswitchd), ``owned_ports`` (refuse candidate lines for other ports), and the transport keys of
``network.drivers.ovsdb.Ovsdb`` (``transport`` local/ssh, ``netns``, ``ssh_host`` …). ``hostname`` is the
OVSDB address, e.g. ``unix:/run/openvswitch/db.sock``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from napalm.base import NetworkDriver
from napalm.base.exceptions import CommitError, ConnectionException, MergeConfigException

from network.drivers.base import PermanentDeviceError, SwitchSpec, TemporaryDeviceError
from network.drivers.ovsdb import NATIVE_MODES, NO_VLANS, Ovsdb, as_set, quote, trunks_value
from network.drivers.vendor import NapalmSwitchSession, classified, vlan_list

ROLLBACK_KEY = "virtcloud-rollback"
# A session's snapshot is read again when older than this (seconds); a convergence takes tens of ms.
SNAPSHOT_MAX_AGE = 5.0
EVERY_VLAN = frozenset(range(1, 4095))
_LINE = re.compile(r"^port\s+(?P<port>\S+)\s+trunks\s+(?P<vids>none|[0-9][0-9,\-]*)$")


class OvsConnectionError(ConnectionException, TemporaryDeviceError):
    """The OVSDB could not be reached (NAPALM's ConnectionException, and a temporary device error)."""


class OvsMergeError(MergeConfigException, PermanentDeviceError):
    """The candidate text is invalid or names a port the switch does not have / the portal does not own."""


class OvsCommitError(CommitError, PermanentDeviceError):
    """OVSDB rejected the commit (or there is nothing to roll back)."""


@dataclass(frozen=True)
class PortState:
    """What OVSDB says about one port's VLAN handling (raw columns, so a rollback restores them exactly)."""

    vlan_mode: str | None
    tag: int | None
    trunks: tuple[int, ...]  # raw column; () means every VLAN in trunk mode

    @property
    def mode(self) -> str:
        # OVS: an empty vlan_mode means access when a tag is set, trunk otherwise
        return self.vlan_mode or ("access" if self.tag is not None else "trunk")

    @property
    def is_plain_trunk(self) -> bool:
        return self.mode == "trunk" and bool(self.trunks)

    @property
    def vids(self) -> frozenset[int]:
        """VLANs carried tagged (for a plain trunk: its list without the 'no VLAN' sentinel)."""
        return frozenset(self.trunks) - {NO_VLANS}

    @property
    def native(self) -> int | None:
        """The native VLAN of a ``native-tagged``/``native-untagged`` trunk (untagged frames' VLAN, carried
        beside its list); None for any other port."""
        return self.tag if self.mode in NATIVE_MODES else None

    def carries(self, want: frozenset[int]) -> frozenset[int] | None:
        """The VLANs this port carries when it is already a trunk the candidate ``want`` may keep as it is
        made (a plain trunk, or a native trunk whose native VLAN ``want`` holds); None otherwise."""
        if self.is_plain_trunk and self.tag is None:
            return self.vids
        if self.native is not None and self.native in want and self.trunks:
            return self.vids | {self.native}
        return None

    def commands(self, ovs_name: str, want: frozenset[int]) -> list[list[str]]:
        """Absolute values making this port carry exactly ``want``: a native trunk whose native VLAN ``want``
        holds keeps its mode and native VLAN (an IOS trunk keeps its native VLAN under ``allowed vlan``; the
        native VLAN goes in the port's static VLANs), any other port becomes a plain trunk with no tag."""
        native = self.native
        if native is not None and native in want:
            return [
                [
                    "set",
                    "Port",
                    ovs_name,
                    f"vlan_mode={self.mode}",
                    f"tag={native}",
                    f"trunks={trunks_value(want - {native})}",
                ]
            ]
        return [
            ["set", "Port", ovs_name, "vlan_mode=trunk", f"trunks={trunks_value(want)}"],
            ["clear", "Port", ovs_name, "tag"],
        ]

    def text(self, name: str) -> str:
        if self.is_plain_trunk:
            return f"port {name} trunks {vlan_list(self.vids) or 'none'}"
        if self.mode == "trunk":
            return f"port {name} trunks all"
        if self.mode == "access":  # OVS ignores trunks on an access port
            return f"port {name} access {self.tag if self.tag is not None else 0}"
        parts = [f"port {name} vlan_mode {self.mode}"]
        if self.tag is not None:
            parts.append(f"tag {self.tag}")
        if self.trunks:
            parts.append(f"trunks {vlan_list(self.vids) or 'none'}")
        return " ".join(parts)

    def as_record(self) -> dict:
        return {"vlan_mode": self.vlan_mode, "tag": self.tag, "trunks": list(self.trunks)}


def parse_candidate(text: str) -> dict[str, frozenset[int]]:
    """``port NAME trunks LIST`` lines → {port: vids}; raises ValueError naming the bad line."""
    result: dict[str, frozenset[int]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise ValueError(f"line {number}: {raw.strip()!r} is not 'port NAME trunks LIST|none'")
        vids: set[int] = set()
        if match["vids"] != "none":
            for item in match["vids"].split(","):
                lo, _, hi = item.partition("-")
                if not lo or (item.endswith("-")):
                    raise ValueError(f"line {number}: bad VLAN item {item!r}")
                lo_i, hi_i = int(lo), int(hi or lo)
                if not 1 <= lo_i <= hi_i <= 4094:
                    raise ValueError(f"line {number}: VLAN ids must be 1-4094 ({item!r})")
                vids.update(range(lo_i, hi_i + 1))
        result[match["port"]] = frozenset(vids)
    return result


def render(desired: Mapping[str, frozenset[int]]) -> str:
    """The candidate text for ``desired`` (pure; the OVS counterpart of ``vendor.render``)."""
    return "".join(f"port {name} trunks {vlan_list(desired[name]) or 'none'}\n" for name in sorted(desired))


def _port_state(row: Mapping) -> PortState:
    tag = as_set(row["tag"])
    mode = as_set(row["vlan_mode"])
    return PortState(
        vlan_mode=mode[0] if mode else None,
        tag=int(tag[0]) if tag else None,
        trunks=tuple(sorted(int(v) for v in as_set(row["trunks"]))),
    )


def _vlan_table(ports: Mapping[str, PortState]) -> dict[int, dict]:
    """NAPALM ``get_vlans`` format for ``ports``. OVS has no VLAN table: the VLANs are those some port
    uses; a trunk with an empty list (OVS: every VLAN) is listed under each of them."""
    members: dict[int, set[str]] = {}
    carries_all = []
    for name, state in ports.items():
        if state.mode in ("trunk", *NATIVE_MODES) and not state.trunks:  # OVS: an empty list trunks every VLAN
            carries_all.append(name)
            if state.native is not None:
                members.setdefault(state.native, set()).add(name)
            continue
        vids = set(state.vids)
        if state.tag is not None and state.mode != "trunk":
            vids.add(state.tag)
        for vid in vids:
            members.setdefault(vid, set()).add(name)
    members.pop(0, None)
    return {
        vid: {"name": f"VLAN{vid:04d}", "interfaces": sorted(names | set(carries_all))}
        for vid, names in sorted(members.items())
    }


def _port_vlans(ports: Mapping[str, PortState]) -> dict[str, frozenset[int]]:
    found: dict[str, set[int]] = {name: set() for name in ports}
    for vid, info in _vlan_table(ports).items():
        for name in info["interfaces"]:
            found[name].add(vid)
    return {name: frozenset(vids) for name, vids in found.items()}


class OvsDriver(NetworkDriver):
    """NAPALM driver for one Open vSwitch switch (one bridge, or a whole OVSDB)."""

    platform = "ovs"

    def __init__(self, hostname: str, username: str = "", password: str = "", timeout: int = 60, optional_args=None):
        args = dict(optional_args or {})
        self.hostname = hostname
        self.username = username
        self.password = password
        self.timeout = timeout
        self.device_name = str(args.get("device_name") or args.get("bridge") or hostname)
        self.bridge = str(args.get("bridge", ""))
        self.port_map: dict[str, str] = dict(args.get("port_map", {}))
        self._reverse = {ovs: name for name, ovs in self.port_map.items()}
        owned = args.get("owned_ports")
        self.owned: frozenset[str] | None = frozenset(owned) if owned is not None else None
        self.ovsdb = Ovsdb.from_args(self.device_name, hostname, args, timeout=float(timeout))
        self._candidate: dict[str, frozenset[int]] = {}
        self._opened = False
        # the session's snapshot of the candidate-relevant ports (see the module docstring); None = read again
        self._snapshot: dict[str, PortState] | None = None
        self._snapshot_at = 0.0
        self.snapshot_max_age = float(args.get("snapshot_max_age", SNAPSHOT_MAX_AGE))

    # --- connection -------------------------------------------------------------------------------------------

    def open(self) -> None:
        self.ovsdb.keep_open()  # one OVSDB connection for the session's transactions
        try:
            self._snapshot, self._snapshot_at = self._read_scoped(), time.monotonic()
        except TemporaryDeviceError as exc:
            raise OvsConnectionError(self.device_name, exc.message) from None
        self._opened = True

    def close(self) -> None:
        self._candidate = {}
        self._snapshot = None
        self._opened = False
        self.ovsdb.close()

    def is_alive(self) -> dict:
        if not self._opened:
            # closed (or never opened): NAPALM's ``__del__`` asks on every garbage collection; no probe needed
            return {"is_alive": False}
        try:
            self.ovsdb.list_rows("Open_vSwitch", ("cur_cfg",))  # on the session's connection, no process
        except TemporaryDeviceError:
            return {"is_alive": False}
        return {"is_alive": True}

    # --- reading ----------------------------------------------------------------------------------------------

    def _read(self) -> tuple[dict[str, PortState], dict, dict]:
        """(ports by inventory name, the Open_vSwitch row, the bridge row) in one consistent read."""
        lists = [
            ("Open_vSwitch", ("ovs_version", "external_ids"), ()),
            ("Bridge", ("name", "ports", "external_ids"), ()),
            ("Port", ("_uuid", "name", "vlan_mode", "tag", "trunks"), ()),
        ]
        root_rows, bridges, ports = self.ovsdb.query(*lists)
        bridge_names = {b["name"] for b in bridges}
        if self.bridge:
            chosen = [b for b in bridges if b["name"] == self.bridge]
            if not chosen:
                raise PermanentDeviceError(self.device_name, f"OVSDB {self.hostname} has no bridge {self.bridge}")
            bridge = chosen[0]
            wanted = set(as_set(bridge["ports"]))
        else:
            bridge = {"name": "", "external_ids": root_rows[0].get("external_ids", {})}
            wanted = {p["_uuid"] for p in ports}
        result: dict[str, PortState] = {}
        for row in ports:
            if row["_uuid"] not in wanted or row["name"] in bridge_names:
                continue  # the bridge's own local port is not a switch port
            result[self._reverse.get(row["name"], row["name"])] = _port_state(row)
        return result, root_rows[0], bridge

    def _ports(self) -> dict[str, PortState]:
        return self._read()[0]

    def _scoped(self) -> bool:
        """Whether reads for the candidate may skip the ports the portal does not own (it never writes them)."""
        return bool(self.bridge) and self.owned is not None

    def _read_scoped(self) -> dict[str, PortState]:
        """The ports a candidate may name, read afresh: with a bridge and ``owned_ports``, only the owned
        ports (one OVSDB transaction, ``--if-exists`` so that a missing port shows up as "no port" at load
        time as before); otherwise every port of the switch."""
        if not self._scoped():
            return self._read()[0]
        return self._scoped_ports(*self.ovsdb.query(*self._scoped_reads()))

    def _scoped_reads(self) -> list[tuple]:
        names = sorted({self.port_map.get(name, name) for name in self.owned or ()})
        return [
            ("Bridge", ("name", "ports"), ("--if-exists", self.bridge)),
            ("Port", ("_uuid", "name", "vlan_mode", "tag", "trunks"), ("--if-exists", *names) if names else ()),
        ]

    def _scoped_ports(self, bridges: list[dict], ports: list[dict]) -> dict[str, PortState]:
        if not bridges:
            raise PermanentDeviceError(self.device_name, f"OVSDB {self.hostname} has no bridge {self.bridge}")
        if not self.owned:
            return {}
        wanted = set(as_set(bridges[0]["ports"]))
        return {
            self._reverse.get(row["name"], row["name"]): _port_state(row)
            for row in ports
            if row["_uuid"] in wanted and row["name"] != self.bridge
        }

    def _session_ports(self) -> dict[str, PortState]:
        """The snapshot (taken at ``open`` or at the first read after a commit or rollback, and again
        when older than ``snapshot_max_age`` seconds: a driver kept open for long never works from old data)."""
        if self._snapshot is None or time.monotonic() - self._snapshot_at > self.snapshot_max_age:
            self._snapshot, self._snapshot_at = self._read_scoped(), time.monotonic()
        return self._snapshot

    def owned_port_vlans(self) -> dict[str, frozenset[int]]:
        """Tagged VLANs of each port in the snapshot, the way ``get_vlans`` reports them — except a trunk with an
        empty list, "every VLAN" to OVS, which carries every id 1-4094 (``get_vlans`` lists it under the VLANs
        other ports use: among the owned ports only, one cleared by hand could look exactly as desired, and the
        reconciler never saw it carry every VLAN of the bridge). What ``OvsSwitchSession.port_vlans`` uses
        instead of a whole-bridge ``get_vlans``."""
        ports = self._session_ports()
        found = _port_vlans(ports)
        for name, state in ports.items():
            if state.mode in ("trunk", *NATIVE_MODES) and not state.trunks:
                found[name] = EVERY_VLAN
        return found

    def get_facts(self) -> dict:
        ports, root, bridge = self._read()
        version = as_set(root.get("ovs_version"))
        return {
            "uptime": -1.0,
            "vendor": "Open vSwitch",
            "model": f"OVS bridge {self.bridge}" if self.bridge else "OVS",
            "hostname": self.device_name,
            "fqdn": self.device_name,
            "os_version": version[0] if version else "",
            "serial_number": root.get("external_ids", {}).get("system-id", ""),
            "interface_list": sorted(ports),
        }

    def get_vlans(self) -> dict[int, dict]:
        """NAPALM format {vid: {"name", "interfaces"}}. OVS has no VLAN table: the VLANs are those some port
        uses; a trunk with an empty list (OVS: every VLAN) is listed under each of them."""
        return _vlan_table(self._ports())

    def get_config(self, retrieve: str = "all", full: bool = False, sanitized: bool = False, format: str = "text"):
        """running = startup (OVSDB is persistent); candidate = the loaded candidate text."""
        running = ""
        if retrieve in ("all", "running", "startup"):
            ports = self._ports()
            header = f"# Open vSwitch {self.device_name}: OVSDB {self.hostname}"
            header += f", bridge {self.bridge}\n" if self.bridge else "\n"
            running = header + "".join(ports[name].text(name) + "\n" for name in sorted(ports))
        return {
            "running": running if retrieve in ("all", "running") else "",
            "startup": running if retrieve in ("all", "startup") else "",
            "candidate": render(self._candidate) if retrieve in ("all", "candidate") and self._candidate else "",
        }

    # --- configuration ----------------------------------------------------------------------------------------

    def load_merge_candidate(self, filename: str | None = None, config: str | None = None) -> None:
        if filename:
            with open(filename) as f:
                config = f.read()
        if config is None:
            raise OvsMergeError(self.device_name, "load_merge_candidate needs a filename or a config")
        try:
            lines = parse_candidate(config)
        except ValueError as exc:
            raise OvsMergeError(self.device_name, f"invalid configuration: {exc}") from None
        if self.owned is not None:
            foreign = sorted(set(lines) - self.owned)
            if foreign:
                raise OvsMergeError(self.device_name, f"ports {', '.join(foreign)} are not owned by the portal")
        ports = self._session_ports() if self.owned is not None else self._ports()
        unknown = sorted(set(lines) - set(ports))
        if unknown:
            raise OvsMergeError(self.device_name, f"no port {', '.join(unknown)} on this switch")
        self._candidate.update(lines)

    def load_replace_candidate(self, filename: str | None = None, config: str | None = None) -> None:
        # Replacing the whole switch configuration would touch ports the portal does not own.
        raise NotImplementedError("the ovs driver only merges (ports not in the candidate are never touched)")

    def _changes(self) -> list[tuple[str, PortState, frozenset[int]]]:
        if not self._candidate:
            return []
        ports = self._session_ports()
        changes = []
        for name in sorted(self._candidate):
            if name not in ports:
                raise OvsMergeError(self.device_name, f"port {name} disappeared since the candidate was loaded")
            want = self._candidate[name]
            state = ports[name]
            if state.carries(want) == want:
                continue
            changes.append((name, state, want))
        return changes

    def compare_config(self) -> str:
        lines = []
        for name, state, want in self._changes():
            carried = state.carries(want)
            if carried is not None:
                added, removed = want - carried, carried - want
                words = ([f"add {vlan_list(added)}"] if added else []) + (
                    [f"remove {vlan_list(removed)}"] if removed else []
                )
                lines.append(f"port {name} trunks {' '.join(words)}")
            else:
                was = state.text(name).removeprefix(f"port {name} ")
                lines.append(f"port {name} {was} -> trunks {vlan_list(want) or 'none'}")
        return "\n".join(lines)

    def commit_config(self, message: str = "", revert_in: int | None = None) -> None:
        if revert_in is not None:
            raise NotImplementedError("the ovs driver has no commit confirm")
        changes = self._changes()
        if not changes:
            self._candidate = {}
            return
        commands: list[list[str]] = []
        record = {}
        for name, state, want in changes:
            ovs_name = self.port_map.get(name, name)
            record[ovs_name] = state.as_record()
            # absolute values only (mode, tag and list, whatever the snapshot says): a port changed by someone
            # else since the snapshot still ends up carrying exactly ``want``
            commands += state.commands(ovs_name, want)
        record_text = json.dumps({"time": time.time(), "message": message, "ports": record}, sort_keys=True)
        commands.append([*self._record_target(), f"external_ids:{ROLLBACK_KEY}={quote(record_text)}"])
        self._snapshot = None  # whatever happens, the device is read again next time
        try:
            if self._scoped():
                # the owned ports read back once ovs-vswitchd has applied the commit, with the wait for it
                # (one round trip): the next snapshot, which the session's verification reads
                read = self.ovsdb.run_then_query(commands, self._scoped_reads())
                self._snapshot, self._snapshot_at = self._scoped_ports(*read), time.monotonic()
            else:
                self.ovsdb.run(*commands)
        except PermanentDeviceError as exc:
            gone = self._missing_port(exc.message)
            if gone is not None:
                raise OvsMergeError(
                    self.device_name, f"port {gone} disappeared since the candidate was loaded"
                ) from None
            raise OvsCommitError(self.device_name, exc.message) from None
        self._candidate = {}

    def _missing_port(self, message: str) -> str | None:
        """The inventory name of the port an ovs-vsctl 'no row "X" in table Port' error names, if any."""
        match = re.search(r'no row "([^"]+)" in table Port', message)
        if not match:
            return None
        return self._reverse.get(match[1], match[1])

    def discard_config(self) -> None:
        self._candidate = {}  # nothing was written: the snapshot stays valid

    def has_pending_commit(self) -> bool:
        return False

    def rollback(self) -> None:
        """Restore the ports of the last commit to what they were before it (once; the record is consumed)."""
        self._snapshot = None
        raw = self._rollback_record()
        if not raw:
            raise OvsCommitError(self.device_name, "nothing to roll back (no commit recorded on the device)")
        record = json.loads(raw)
        commands: list[list[str]] = []
        for ovs_name, state in sorted(record["ports"].items()):
            for column in ("vlan_mode", "tag", "trunks"):
                value = state[column]
                if value in (None, []):
                    commands.append(["clear", "Port", ovs_name, column])
                elif column == "trunks":
                    commands.append(["set", "Port", ovs_name, "trunks=" + ",".join(str(v) for v in value)])
                else:
                    commands.append(["set", "Port", ovs_name, f"{column}={value}"])
        target = self._record_target()
        commands.append(["remove", target[1], target[2], "external_ids", ROLLBACK_KEY])
        try:
            self.ovsdb.run(*commands)
        except PermanentDeviceError as exc:
            raise OvsCommitError(self.device_name, f"rollback failed: {exc.message}") from None

    def _rollback_record(self) -> str | None:
        if self.bridge:
            rows = self.ovsdb.list_rows("Bridge", ("name", "external_ids"), "--if-exists", self.bridge)
            if not rows:
                raise PermanentDeviceError(self.device_name, f"OVSDB {self.hostname} has no bridge {self.bridge}")
        else:
            rows = self.ovsdb.list_rows("Open_vSwitch", ("external_ids",))
        return rows[0].get("external_ids", {}).get(ROLLBACK_KEY)

    def _record_target(self) -> list[str]:
        return ["set", "Bridge", self.bridge] if self.bridge else ["set", "Open_vSwitch", "."]


@contextlib.contextmanager
def open_switch(spec: SwitchSpec) -> Iterator[NapalmSwitchSession]:
    """A ``SwitchSession`` for an OVS switch; ``spec.address`` is the OVSDB address."""
    args = {**spec.driver_args, "owned_ports": list(spec.owned_ports), "device_name": spec.name}
    device = OvsDriver(spec.address, spec.username, spec.password, timeout=int(spec.timeout), optional_args=args)
    with classified(spec.name, "open"):
        device.open()
    try:
        yield OvsSwitchSession(spec, device, render, port_key=lambda name: name)
    finally:
        device.close()


class OvsSwitchSession(NapalmSwitchSession):
    """The shared NAPALM session flow; the owned ports' VLANs come from the driver's snapshot of the owned
    ports (one read per configuration cycle) instead of a whole-bridge ``get_vlans`` each time."""

    def port_vlans(self) -> dict[str, frozenset[int]]:
        with classified(self.spec.name, "get_vlans"):
            found = self.device.owned_port_vlans()
        return {port: found.get(port, frozenset()) for port in self.spec.owned_ports}
