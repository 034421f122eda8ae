"""NAPALM driver for a Linux switch: one VLAN-aware bridge (``vlan_filtering 1``, ``vlan_default_pvid 0``).

The device is a Linux box (a whitebox switch, or a lab switch in a network namespace) whose front ports are
members of one bridge. The portal owns some of those ports and decides which VLANs are tagged on them; it
never touches the others.

Configuration is a small text format of our own, one line per port, in the NOS style of "switchport trunk
allowed vlan"::

    ! linuxbridge sw1 bridge br0
    port p-h1 vlans 100,200-202
    port p-h2 vlans none
    port uplink vlans none untagged 5 pvid 5

``get_config()['running']`` prints every bridge port. A merge candidate holds ``port NAME vlans LIST``
lines (the tagged set of that port, replacing the present one); ports that are not in the candidate are
never touched, and untagged/PVID membership is shown but never changed (an untagged VLAN the port's static VLANs
name counts as carried: never added again, which would make it tagged). ``compare_config`` prints exactly
the VLAN changes (``-port p-h1 vlan 200`` / ``+port p-h1 vlan 300``), ``commit_config`` applies them (and
restores the touched ports if the kernel rejects one change half-way), ``rollback`` restores the ports
of the last commit to what they were before it.

Transports (``optional_args`` / ``SwitchSpec.driver_args``):

- ``transport: netns`` (default) — the switch is the network namespace ``netns`` (default: the address) on
  this machine, driven by pyroute2 (netlink).
- ``transport: local`` — the switch is this machine's own namespace (the portal agent runs on the switch).
- ``transport: ssh`` — a remote Linux box: ``ip -json``/``bridge -json`` and ``bridge -batch`` run over
  ``ssh`` (options ``port``, ``identity_file``, ``ssh_options``, ``sudo``). The box (the address), the user
  name and the options must pass ``network.drivers.sshargs.ssh_problems``. ``runner`` replaces the
  command runner (tests, or ``LocalRunner`` to drive a local namespace through the same command layer).

Every error is a ``TemporaryDeviceError`` (namespace/box unreachable, timeout) or a
``PermanentDeviceError`` (unknown or unowned port, bad configuration, the kernel rejected the change, ssh
authentication refused); the
classes also derive from the matching NAPALM exception, so NAPALM-minded callers can catch those.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import shlex
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from napalm.base import NetworkDriver
from napalm.base.exceptions import CommitError, ConnectionException, MergeConfigException
from pyroute2 import IPRoute, NetlinkError

from network.drivers.base import (
    ConvergeResult,
    PermanentDeviceError,
    SwitchSpec,
    TemporaryDeviceError,
)
from network.drivers.netlink import TEMPORARY_ERRNOS, netns_exists, open_iproute
from network.drivers.ranges import compact
from network.drivers.sshargs import ssh_problems

PLATFORM = "linuxbridge"
VID_MIN, VID_MAX = 1, 4094

# struct bridge_vlan_info flags (include/uapi/linux/if_bridge.h)
_BRIDGE_VLAN_INFO_PVID = 0x2
_BRIDGE_VLAN_INFO_UNTAGGED = 0x4


# ----------------------------------------------------------------------------------------------- errors


class LinuxBridgeUnreachable(TemporaryDeviceError, ConnectionException):
    """The namespace or the remote box is not there (yet), or did not answer in time: retry later."""


class LinuxBridgeAuthError(PermanentDeviceError, ConnectionException):
    """The box refused our key, or its host key is not the one we know: retrying will not help."""


class LinuxBridgeConfigError(PermanentDeviceError, MergeConfigException):
    """The candidate is malformed, names an unknown port or a port the portal does not own."""


class LinuxBridgeCommitError(PermanentDeviceError, CommitError):
    """The kernel rejected a change (the touched ports were restored, or the message says they could not be:
    then ``may_have_applied``), or the device is misconfigured."""


class _Rejected(Exception):
    """Raised by a backend when the kernel refuses one operation; the driver turns it into a classified error."""

    def __init__(self, message: str, temporary: bool = False):
        super().__init__(message)
        self.temporary = temporary


# ----------------------------------------------------------------------------------------- state/config


@dataclass(frozen=True)
class PortState:
    """VLAN membership of one bridge port: the tagged set (what the portal manages) and the rest (shown only)."""

    tagged: frozenset[int] = frozenset()
    untagged: frozenset[int] = frozenset()
    pvid: int | None = None


def format_vids(vids: Iterable[int]) -> str:
    """``[100, 101, 102, 200]`` -> ``100-102,200``; an empty set is ``none``."""
    return compact(vids) or "none"


def parse_vids(text: str) -> frozenset[int]:
    """Inverse of ``format_vids``; raises ``ValueError`` on anything that is not a valid VLAN list."""
    if text == "none":
        return frozenset()
    vids: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"bad VLAN list item {part!r}")
        lo, hi = int(m[1]), int(m[2] or m[1])
        if not (VID_MIN <= lo <= hi <= VID_MAX):
            raise ValueError(f"VLAN {part!r} outside {VID_MIN}-{VID_MAX}")
        vids.update(range(lo, hi + 1))
    return frozenset(vids)


_PORT_LINE = re.compile(r"port\s+(?P<port>\S+)\s+vlans\s+(?P<vlans>\S+)(?P<rest>.*)")


def parse_candidate(text: str) -> dict[str, frozenset[int]]:
    """Parse merge-candidate text into port -> tagged VLANs (later lines win). Raises ``ValueError``."""
    ports: dict[str, frozenset[int]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(("!", "#")):
            continue
        m = _PORT_LINE.fullmatch(line)
        if not m:
            raise ValueError(f"line {number}: expected 'port NAME vlans LIST', got {line!r}")
        if m["rest"].strip():
            # Untagged/PVID membership belongs to ports the portal does not manage; refuse rather than ignore.
            raise ValueError(f"line {number}: only the tagged VLAN list can be set, not {m['rest'].strip()!r}")
        try:
            ports[m["port"]] = parse_vids(m["vlans"])
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return ports


def render_running(device: str, bridge: str, ports: Mapping[str, PortState]) -> str:
    lines = [f"! {PLATFORM} {device} bridge {bridge}"]
    for name in sorted(ports):
        state = ports[name]
        line = f"port {name} vlans {format_vids(state.tagged)}"
        if state.untagged:
            line += f" untagged {format_vids(state.untagged)}"
        if state.pvid is not None:
            line += f" pvid {state.pvid}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_candidate(ports: Mapping[str, Iterable[int]]) -> str:
    return "".join(f"port {name} vlans {format_vids(ports[name])}\n" for name in sorted(ports))


Op = tuple[str, str, int]  # ("add" | "del", port, vid)


def plan_ops(current: Mapping[str, PortState], wanted: Mapping[str, frozenset[int]]) -> list[Op]:
    """Netlink operations that give every port in ``wanted`` exactly that tagged set; other ports untouched. A VLAN
    the port has untagged (its native/PVID VLAN: the hypervisor's management network, say) is never added nor
    deleted: adding it again without flags would make the kernel take its PVID and untagged flags away (the
    host's untagged traffic cut) — wanted (a static VLAN of the port), it counts as carried as it is."""
    ops: list[Op] = []
    for port in sorted(wanted):
        have, untagged = current[port].tagged, current[port].untagged
        ops += [("del", port, vid) for vid in sorted(have - wanted[port])]
        ops += [("add", port, vid) for vid in sorted(wanted[port] - have - untagged)]
    return ops


def render_diff(ops: Sequence[Op]) -> str:
    return "".join(f"{'+' if action == 'add' else '-'}port {port} vlan {vid}\n" for action, port, vid in ops)


# ----------------------------------------------------------------------------------------------- backends


@dataclass(frozen=True)
class BridgeInfo:
    kind: str | None  # None when no such interface
    vlan_filtering: bool
    ports: dict[str, PortState]


class NetlinkBackend:
    """The switch is a network namespace on this machine (or this namespace): pyroute2."""

    def __init__(self, device: str, netns: str | None):
        self.device = device
        self.netns = netns
        self._ipr: IPRoute | None = None

    def open(self) -> None:
        self._ipr = open_iproute(self.device, self.netns, LinuxBridgeUnreachable)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            raise LinuxBridgeUnreachable(self.device, "session is not open")
        return self._ipr

    def alive(self) -> bool:
        if not netns_exists(self.netns):
            return False
        try:
            self.ipr.link("get", index=1)
        except (NetlinkError, OSError, LinuxBridgeUnreachable):
            return False
        return True

    def interfaces(self) -> list[str]:
        return sorted(link.get("IFLA_IFNAME") for link in self.ipr.get_links())

    def os_version(self) -> str:
        return platform.release()  # same kernel as ours: a namespace is not a machine

    def uptime(self) -> float:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])

    def bridge(self, name: str) -> BridgeInfo:
        links = list(self.ipr.get_links())
        by_name = {link.get("IFLA_IFNAME"): link for link in links}
        br = by_name.get(name)
        if br is None:
            return BridgeInfo(None, False, {})
        info = br.get("IFLA_LINKINFO")
        kind = info.get("IFLA_INFO_KIND") if info else ""
        data = info.get("IFLA_INFO_DATA") if info else None
        filtering = bool(data.get("IFLA_BR_VLAN_FILTERING")) if data and kind == "bridge" else False
        port_names = {
            link["index"]: link.get("IFLA_IFNAME") for link in links if link.get("IFLA_MASTER") == br["index"]
        }
        tagged: dict[int, set[int]] = {i: set() for i in port_names}
        untagged: dict[int, set[int]] = {i: set() for i in port_names}
        pvid: dict[int, int | None] = dict.fromkeys(port_names)
        for msg in self.ipr.get_vlans():
            if msg["index"] not in port_names:
                continue
            spec = msg.get("IFLA_AF_SPEC")
            for key, entry in spec["attrs"] if spec else ():
                if key != "IFLA_BRIDGE_VLAN_INFO":
                    continue
                vid, flags = entry["vid"], entry["flags"]
                (untagged if flags & _BRIDGE_VLAN_INFO_UNTAGGED else tagged)[msg["index"]].add(vid)
                if flags & _BRIDGE_VLAN_INFO_PVID:
                    pvid[msg["index"]] = vid
        ports = {port_names[i]: PortState(frozenset(tagged[i]), frozenset(untagged[i]), pvid[i]) for i in port_names}
        return BridgeInfo(kind, filtering, ports)

    def apply(self, bridge: str, ops: Sequence[Op], force: bool = False) -> None:
        errors = []
        for action, port, vid in ops:
            try:
                found = self.ipr.link_lookup(ifname=port)
                if not found:
                    raise _Rejected(f"port {port} does not exist")
                self.ipr.vlan_filter(action, index=found[0], vlan_info={"vid": vid})
            except NetlinkError as exc:
                failure = _Rejected(
                    f"{action} VLAN {vid} on port {port}: {exc.args[1] if len(exc.args) > 1 else exc}",
                    temporary=exc.code in TEMPORARY_ERRNOS,
                )
            except _Rejected as exc:
                failure = exc
            else:
                continue
            if not force:
                raise failure
            errors.append(str(failure))
        if errors:
            raise _Rejected("; ".join(errors))


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str
    stderr: str


Runner = Callable[..., RunResult]  # runner(argv, *, input=None, timeout=...) -> RunResult


class SshRunner:
    """Runs one command on a remote box over OpenSSH (key authentication only, no prompts)."""

    def __init__(
        self,
        host: str,
        user: str = "",
        port: int = 22,
        identity_file: str | None = None,
        ssh_options: Sequence[str] = (),
        ssh_binary: str = "ssh",
    ):
        self.host, self.user, self.port = host, user, int(port)
        self.identity_file, self.ssh_options, self.ssh_binary = identity_file, tuple(ssh_options), ssh_binary

    def argv(self, command: Sequence[str], timeout: float) -> list[str]:
        argv = [self.ssh_binary, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
        argv += ["-p", str(self.port)]
        if self.identity_file:
            argv += ["-i", self.identity_file, "-o", "IdentitiesOnly=yes"]
        for option in self.ssh_options:
            argv += ["-o", option]
        # ``--``: nothing after it is an ssh option, whatever the destination looks like
        argv += ["--", f"{self.user}@{self.host}" if self.user else self.host, shlex.join(command)]
        return argv

    def __call__(self, command: Sequence[str], *, input: str | None = None, timeout: float) -> RunResult:
        done = subprocess.run(self.argv(command, timeout), input=input, capture_output=True, text=True, timeout=timeout)
        if done.returncode == 255:
            # ssh's own failure rather than the remote command's: a refused key or host key will not get better
            # by retrying; a refused or timed-out connection may.
            message = done.stderr.strip() or "ssh failed"
            if any(sign in message for sign in _SSH_PERMANENT):
                raise SshAuthError(message)
            raise ConnectionError(message)
        return RunResult(done.returncode, done.stdout, done.stderr)


_SSH_PERMANENT = ("Permission denied", "Host key verification failed", "HOST IDENTIFICATION HAS CHANGED")


class SshAuthError(Exception):
    """ssh could connect but authentication (ours or the host's) failed."""


class LocalRunner:
    """Runs the command layer locally, optionally inside a network namespace (``ip netns exec``)."""

    def __init__(self, netns: str | None = None):
        self.netns = netns

    def __call__(self, command: Sequence[str], *, input: str | None = None, timeout: float) -> RunResult:
        argv = ["ip", "netns", "exec", self.netns, *command] if self.netns else list(command)
        done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        return RunResult(done.returncode, done.stdout, done.stderr)


class CommandBackend:
    """The switch is reached through a command runner (ssh): iproute2's JSON output in, ``bridge -batch`` out."""

    def __init__(self, device: str, runner: Runner, timeout: float, sudo: bool = False):
        self.device, self.runner, self.timeout, self.sudo = device, runner, timeout, sudo

    def _run(self, argv: Sequence[str], input: str | None = None) -> RunResult:
        argv = ["sudo", "-n", *argv] if self.sudo else list(argv)
        what = shlex.join(argv)
        try:
            return self.runner(argv, input=input, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise LinuxBridgeUnreachable(self.device, f"{what!r} timed out after {self.timeout:g} s") from None
        except ConnectionError as exc:
            raise LinuxBridgeUnreachable(self.device, f"{what!r}: {exc}") from exc
        except SshAuthError as exc:
            raise LinuxBridgeAuthError(self.device, f"{what!r}: {exc}") from exc
        except OSError as exc:  # the ssh client itself is missing or not executable
            raise LinuxBridgeCommitError(self.device, f"cannot run {what!r}: {exc}") from exc

    def _json(self, argv: Sequence[str]):
        done = self._run(argv)
        if done.returncode != 0:
            raise LinuxBridgeCommitError(
                self.device, f"{shlex.join(argv)!r} failed ({done.returncode}): {done.stderr.strip()}"
            )
        try:
            return json.loads(done.stdout or "[]")
        except ValueError as exc:
            raise LinuxBridgeCommitError(self.device, f"{shlex.join(argv)!r}: unreadable output: {exc}") from exc

    def open(self) -> None:
        self._json(["ip", "-json", "link", "show", "lo"])  # reachability and a working iproute2

    def close(self) -> None:
        pass

    def alive(self) -> bool:
        try:
            self._json(["ip", "-json", "link", "show", "lo"])
        except (TemporaryDeviceError, PermanentDeviceError):
            return False
        return True

    def interfaces(self) -> list[str]:
        return sorted(link["ifname"] for link in self._json(["ip", "-json", "link", "show"]))

    def os_version(self) -> str:
        return self._run(["uname", "-r"]).stdout.strip()

    def uptime(self) -> float:
        return float(self._run(["cat", "/proc/uptime"]).stdout.split()[0])

    def bridge(self, name: str) -> BridgeInfo:
        links = self._json(["ip", "-json", "-details", "link", "show"])
        br = next((link for link in links if link.get("ifname") == name), None)
        if br is None:
            return BridgeInfo(None, False, {})
        info = br.get("linkinfo", {})
        kind = info.get("info_kind", "")
        filtering = kind == "bridge" and bool(info.get("info_data", {}).get("vlan_filtering"))
        port_names = [link["ifname"] for link in links if link.get("master") == name]
        return BridgeInfo(
            kind, filtering, parse_bridge_vlan_json(self._json(["bridge", "-json", "vlan", "show"]), port_names)
        )

    def apply(self, bridge: str, ops: Sequence[Op], force: bool = False) -> None:
        if not ops:
            return
        script = "".join(f"vlan {action} dev {port} vid {vid}\n" for action, port, vid in ops)
        argv = ["bridge", *(["-force"] if force else []), "-batch", "-"]
        done = self._run(argv, input=script)
        if done.returncode != 0:
            raise _Rejected(done.stderr.strip() or f"bridge -batch exited {done.returncode}")


def parse_bridge_vlan_json(data, port_names: Iterable[str]) -> dict[str, PortState]:
    """Parse ``bridge -json vlan show`` (iproute2 ≥ 5: a list; older: a dict keyed by port) for ``port_names``."""
    entries: dict[str, list] = {}
    if isinstance(data, dict):
        entries = {name: vlans for name, vlans in data.items()}
    else:
        for item in data:
            entries.setdefault(item["ifname"], []).extend(item.get("vlans", []))
    ports = {}
    for name in port_names:
        tagged, untagged, pvid = set(), set(), None
        for entry in entries.get(name, []):
            flags = entry.get("flags", [])
            vids = range(entry["vlan"], entry.get("vlanEnd", entry["vlan"]) + 1)
            (untagged if "Egress Untagged" in flags else tagged).update(vids)
            if "PVID" in flags:
                pvid = entry["vlan"]
        ports[name] = PortState(frozenset(tagged), frozenset(untagged), pvid)
    return ports


# ------------------------------------------------------------------------------------------------- driver


class LinuxBridgeDriver(NetworkDriver):
    """NAPALM driver for platform ``linuxbridge`` (see the module docstring for config format and transports)."""

    platform = PLATFORM

    def __init__(self, hostname: str, username: str = "", password: str = "", timeout: int = 60, optional_args=None):
        args = dict(optional_args or {})
        self.hostname, self.username, self.password, self.timeout = hostname, username, password, timeout
        self.device = args.get("name") or hostname
        self.bridge_name = args.get("bridge", "br0")
        owned = args.get("owned_ports")
        self.owned_ports = frozenset(owned) if owned is not None else None  # None: every bridge port
        transport = args.get("transport", "netns")
        if transport == "netns":
            self._backend = NetlinkBackend(self.device, args.get("netns") or hostname)
        elif transport == "local":
            self._backend = NetlinkBackend(self.device, None)
        elif transport == "ssh":
            # checked when the inventory was saved too; a row written another way must not get through either
            problems = ssh_problems(host=hostname, user=username, options=args.get("ssh_options", ()))
            if problems:
                raise LinuxBridgeCommitError(self.device, "; ".join(problems))
            runner = args.get("runner") or SshRunner(
                hostname,
                user=username,
                port=args.get("port", 22),
                identity_file=args.get("identity_file"),
                ssh_options=args.get("ssh_options", ()),
            )
            self._backend = CommandBackend(self.device, runner, float(timeout), sudo=bool(args.get("sudo")))
        else:
            raise LinuxBridgeCommitError(self.device, f"unknown transport {transport!r} (netns, local or ssh)")
        self._candidate: dict[str, frozenset[int]] | None = None
        self._checkpoint: dict[str, frozenset[int]] | None = None  # tagged sets before the last commit

    # --- connection

    def open(self) -> None:
        self._backend.open()
        try:
            self._ports()  # a device without our bridge is misconfigured, say so now
        except Exception:
            self._backend.close()
            raise

    def close(self) -> None:
        self._backend.close()

    def is_alive(self) -> dict:
        return {"is_alive": self._backend.alive()}

    # --- getters

    def _ports(self) -> dict[str, PortState]:
        try:
            info = self._backend.bridge(self.bridge_name)
        except NetlinkError as exc:
            raise self._netlink_error("reading the bridge", exc) from exc
        if info.kind is None:
            raise LinuxBridgeCommitError(self.device, f"bridge {self.bridge_name} does not exist")
        if info.kind != "bridge":
            raise LinuxBridgeCommitError(self.device, f"{self.bridge_name} is a {info.kind or 'plain'} link")
        if not info.vlan_filtering:
            raise LinuxBridgeCommitError(self.device, f"bridge {self.bridge_name} is not VLAN-aware (vlan_filtering 0)")
        return info.ports

    def _netlink_error(self, what: str, exc: NetlinkError):
        cls = LinuxBridgeUnreachable if exc.code in TEMPORARY_ERRNOS else LinuxBridgeCommitError
        return cls(self.device, f"{what}: {exc}")

    def get_facts(self) -> dict:
        return {
            "uptime": self._backend.uptime(),
            "vendor": "Linux",
            "model": f"{PLATFORM} (VLAN-aware bridge {self.bridge_name})",
            "os_version": self._backend.os_version(),
            "serial_number": "",
            "hostname": self.device,
            "fqdn": self.device,
            "interface_list": self._backend.interfaces(),
        }

    def tagged_vlans(self) -> dict[str, frozenset[int]]:
        """Each port's tagged VLAN set: what the portal manages (untagged/PVID membership is not its own)."""
        return {port: state.tagged for port, state in self._ports().items()}

    def port_states(self) -> dict[str, PortState]:
        """Each port's VLAN membership, tagged and untagged."""
        return dict(self._ports())

    def get_vlans(self) -> dict:
        """NAPALM format: ``{vid: {"name": ..., "interfaces": [...]}}``, tagged and untagged members alike."""
        members: dict[int, set[str]] = {}
        for port, state in self._ports().items():
            for vid in state.tagged | state.untagged:
                members.setdefault(vid, set()).add(port)
        return {vid: {"name": f"vlan{vid}", "interfaces": sorted(members[vid])} for vid in sorted(members)}

    def get_config(self, retrieve: str = "all", full: bool = False, sanitized: bool = False, format: str = "text"):
        if format != "text":
            raise NotImplementedError(f"{PLATFORM}: only format='text'")
        config = {"running": "", "candidate": "", "startup": ""}
        if retrieve in ("all", "running"):
            config["running"] = render_running(self.device, self.bridge_name, self._ports())
        if retrieve in ("all", "candidate") and self._candidate is not None:
            config["candidate"] = render_candidate(self._candidate)
        # startup stays "": bridge VLAN state is not persisted by the kernel; the portal re-converges instead.
        return config

    # --- candidate configuration

    def load_merge_candidate(self, filename: str | None = None, config: str | None = None) -> None:
        if filename is not None:
            with open(filename) as f:
                config = f.read()
        if config is None:
            raise LinuxBridgeConfigError(self.device, "load_merge_candidate needs filename or config")
        try:
            ports = parse_candidate(config)
        except ValueError as exc:
            raise LinuxBridgeConfigError(self.device, f"bad candidate: {exc}") from None
        if self.owned_ports is not None:
            foreign = sorted(set(ports) - self.owned_ports)
            if foreign:
                raise LinuxBridgeConfigError(self.device, f"ports not owned by the portal: {', '.join(foreign)}")
        self._check_known(ports)
        self._candidate = {**(self._candidate or {}), **ports}

    def load_replace_candidate(self, filename=None, config=None):
        raise NotImplementedError(f"{PLATFORM}: merge only, ports outside the candidate are never touched")

    def _check_known(self, ports: Iterable[str], current: Mapping[str, PortState] | None = None):
        current = self._ports() if current is None else current
        unknown = sorted(set(ports) - set(current))
        if unknown:
            raise LinuxBridgeConfigError(
                self.device, f"unknown port {', '.join(unknown)} (not a port of bridge {self.bridge_name})"
            )
        return current

    def compare_config(self) -> str:
        if not self._candidate:
            return ""
        current = self._check_known(self._candidate)
        return render_diff(plan_ops(current, self._candidate))

    def discard_config(self) -> None:
        self._candidate = None

    def commit_config(self, message: str = "", revert_in: int | None = None) -> None:
        if revert_in is not None:
            raise NotImplementedError(f"{PLATFORM}: no commit confirm (revert_in)")
        if not self._candidate:
            return
        current = self._check_known(self._candidate)
        ops = plan_ops(current, self._candidate)
        if ops:
            before = {port: current[port].tagged for port in self._candidate}
            self._apply(ops, before)
            self._checkpoint = before
        self._candidate = None

    def _apply(self, ops: Sequence[Op], restore_to: Mapping[str, frozenset[int]]) -> None:
        """Apply ``ops``; if the kernel refuses one, put the touched ports back to ``restore_to`` and raise."""
        try:
            self._backend.apply(self.bridge_name, ops)
            return
        except _Rejected as exc:
            failure = exc
        try:
            self._restore(restore_to)
            restored, applied = "ports restored", False
        except (_Rejected, PermanentDeviceError, TemporaryDeviceError) as exc:
            # what was applied before the rejection may still be there: not a change the device refused
            restored, applied = f"restoring the ports failed too: {exc}", True
        cls = LinuxBridgeUnreachable if failure.temporary else LinuxBridgeCommitError
        raise cls(self.device, f"change rejected: {failure}; {restored}", may_have_applied=applied)

    def _restore(self, tagged: Mapping[str, frozenset[int]]) -> None:
        current = self._ports()
        ops = plan_ops(current, {port: vids for port, vids in tagged.items() if port in current})
        self._backend.apply(self.bridge_name, ops, force=True)

    def rollback(self) -> None:
        """Put the ports of the last commit back to what they were before it (no-op when nothing was committed)."""
        if self._checkpoint is None:
            return
        checkpoint, current = self._checkpoint, self._ports()
        self._check_known(checkpoint, current)
        ops = plan_ops(current, checkpoint)
        self._apply(ops, {port: current[port].tagged for port in checkpoint})
        self._checkpoint = None


# ------------------------------------------------------------------------------------------------ session


class LinuxBridgeSession:
    """``SwitchSession`` on a ``LinuxBridgeDriver``: only the ports of ``spec.owned_ports`` are ever changed."""

    def __init__(self, spec: SwitchSpec, driver: LinuxBridgeDriver):
        self.spec, self.driver = spec, driver

    def port_vlans(self) -> dict[str, frozenset[int]]:
        """The owned ports' tagged VLANs (what the candidate sets and the verification compares: a port's
        native/PVID VLAN is not the portal's and never made a converge fail), and of its untagged ones those the
        port's own static VLANs name (the operator said the port carries them: carried, untagged, they are
        neither missing nor made tagged). Another port's static VLAN untagged here is not this port's: counted
        switch-wide, a host trunk's PVID (VLAN 1 by default) that the uplink lists as static read as carried on
        the host trunk, which then failed every verification."""
        ports = self.driver.port_states()
        return {
            port: (ports[port].tagged | (ports[port].untagged & self.spec.port_static(port)))
            if port in ports
            else frozenset()
            for port in self.spec.owned_ports
        }

    def render(self, desired: Mapping[str, frozenset[int]]) -> str:
        foreign = sorted(set(desired) - set(self.spec.owned_ports))
        if foreign:
            raise PermanentDeviceError(self.spec.name, f"ports not owned by the portal: {', '.join(foreign)}")
        return render_candidate(desired)

    def plan(self, desired: Mapping[str, frozenset[int]]) -> str:
        self.driver.load_merge_candidate(config=self.render(desired))
        try:
            return self.driver.compare_config()
        finally:
            self.driver.discard_config()

    def converge(self, desired: Mapping[str, frozenset[int]]) -> ConvergeResult:
        before = self.port_vlans()
        self.driver.load_merge_candidate(config=self.render(desired))
        diff = self.driver.compare_config()
        if not diff:
            self.driver.discard_config()
            return ConvergeResult(self.spec.name, "", False, before, before)
        self.driver.commit_config(message="virtcloud converge")
        after = self.port_vlans()
        wrong = {port: after.get(port) for port, vids in desired.items() if after.get(port) != frozenset(vids)}
        if wrong:
            detail = ", ".join(
                f"{port} has {format_vids(after.get(port) or ())} not {format_vids(desired[port])}"
                for port in sorted(wrong)
            )
            try:
                self.driver.rollback()
                outcome, applied = "rolled back", False
            except (PermanentDeviceError, TemporaryDeviceError) as exc:
                outcome, applied = f"rollback failed: {exc.message}", True
            raise PermanentDeviceError(
                self.spec.name, f"verification failed after commit: {detail}; {outcome}", may_have_applied=applied
            )
        return ConvergeResult(self.spec.name, diff, True, before, after)


def driver_for(spec: SwitchSpec) -> LinuxBridgeDriver:
    args = {**spec.driver_args, "name": spec.name, "owned_ports": tuple(spec.owned_ports)}
    return LinuxBridgeDriver(spec.address or spec.name, spec.username, spec.password, spec.timeout, args)


@contextlib.contextmanager
def open_switch(spec: SwitchSpec) -> Iterator[LinuxBridgeSession]:
    """Open the switch of ``spec``; the session is closed whatever happens."""
    driver = driver_for(spec)
    driver.open()
    try:
        yield LinuxBridgeSession(spec, driver)
    finally:
        driver.close()
