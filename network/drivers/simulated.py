"""The simulated fabric: switches and hosts that exist only as JSON files, for a demo without root (no
network namespaces) and for unit tests (registered there as platform/driver ``fake``). A device uses it when
its ``driver_args`` say ``simulated: true``; every diff it reports is labelled ``(simulated)``.

State lives in a JSON file per device under ``driver_args["state_dir"]`` so that a real Celery worker in
another process sees the same device. Faults are injected through ``driver_args``:

- ``fail_commit``: ``"permanent"`` or ``"temporary"`` — every commit fails with the device's message (a
  converge with nothing to change commits nothing, so it does not fail);
- ``fail_times``: the first N commits fail with a temporary error, then they work;
- ``delay``: seconds each session takes (to make sessions overlap);
- ``reachable_from``: only a worker whose environment has ``VIRTCLOUD_WORKER`` set to this value reaches
  the device (a management address only its site's worker or its host's agent can reach); any other
  session fails with a temporary error, as a timeout would.

Every session is recorded (start, end, committed) so tests can check batching and serialisation.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from network.drivers import base
from network.drivers.base import ConvergeResult, PermanentDeviceError, TemporaryDeviceError
from network.drivers.linuxbridge_host import bridge_name  # a simulated host names its bridges the same way


def register() -> None:
    """Make ``platform="fake"`` (switches) and ``driver="fake"`` (hosts) use this module (tests)."""
    base._SWITCH_DRIVERS["fake"] = __name__
    base._HOST_DRIVERS["fake"] = __name__


LABEL = "(simulated) "


def _path(driver_args: Mapping, kind: str, name: str) -> Path:
    return Path(driver_args["state_dir"]) / f"{kind}-{name}.json"


def load(driver_args: Mapping, kind: str, name: str) -> dict:
    path = _path(driver_args, kind, name)
    if path.exists():
        return json.loads(path.read_text())
    return {"ports": {}, "vlans": [], "vm_ports": {}, "sessions": [], "commits": 0, "failures": 0}


def save(driver_args: Mapping, kind: str, name: str, state: dict) -> None:
    path = _path(driver_args, kind, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, sort_keys=True))
    tmp.replace(path)


def _labelled(driver_args: Mapping, diff: str) -> str:
    """A demo's simulated device says so in every diff (admin and API show them)."""
    return LABEL + diff if diff and driver_args.get("simulated") else diff


def _vids(text: str) -> str:
    return ",".join(str(v) for v in sorted(text)) or "none"


class FakeSwitch:
    """A switch whose owned ports carry the VLAN sets stored in its state file."""

    def __init__(self, spec: base.SwitchSpec):
        self.spec = spec
        self.args = spec.driver_args

    def _state(self) -> dict:
        return load(self.args, "switch", self.spec.name)

    def port_vlans(self) -> dict[str, frozenset[int]]:
        ports = self._state()["ports"]
        return {p: frozenset(ports.get(p, [])) for p in self.spec.owned_ports}

    def render(self, desired: Mapping[str, frozenset[int]]) -> str:
        return "".join(f"port {p} trunks {_vids(desired[p])}\n" for p in sorted(desired))

    def plan(self, desired: Mapping[str, frozenset[int]]) -> str:
        current = self.port_vlans()
        foreign = sorted(set(desired) - set(self.spec.owned_ports))
        if foreign:
            raise PermanentDeviceError(self.spec.name, f"ports {', '.join(foreign)} are not owned by the portal")
        lines = []
        for port in sorted(desired):
            for vid in sorted(desired[port] - current[port]):
                lines.append(f"+ {port} vlan {vid}")
            for vid in sorted(current[port] - desired[port]):
                lines.append(f"- {port} vlan {vid}")
        return _labelled(self.args, "\n".join(lines))

    def converge(self, desired: Mapping[str, frozenset[int]]) -> ConvergeResult:
        desired = {p: frozenset(v) for p, v in desired.items()}
        before = self.port_vlans()
        diff = self.plan(desired)
        if not diff:
            return ConvergeResult(self.spec.name, "", False, before, before)
        state = self._state()
        fault = self.args.get("fail_commit")
        if self.args.get("fail_times", 0) > state["failures"]:
            state["failures"] += 1
            save(self.args, "switch", self.spec.name, state)
            fault = "temporary"
        if fault == "temporary":
            raise TemporaryDeviceError(
                self.spec.name, "commit_config: configuration database locked by another session"
            )
        if fault:
            raise PermanentDeviceError(self.spec.name, "commit_config: % Invalid input detected at '^' marker.")
        for port, vids in desired.items():
            state["ports"][port] = sorted(vids)
        state["commits"] += 1
        save(self.args, "switch", self.spec.name, state)
        return ConvergeResult(self.spec.name, diff, True, before, self.port_vlans())


class FakeHost:
    """A hypervisor with one "bridge" per VLAN; ``vm_ports`` (vid → count) keeps a bridge in use."""

    def __init__(self, spec: base.HostSpec):
        self.spec = spec
        self.args = spec.driver_args

    def vlans(self) -> frozenset[int]:
        return frozenset(load(self.args, "host", self.spec.name)["vlans"])

    def broken(self) -> frozenset[int]:
        """Bridges there that do not carry their VLAN (as the Linux-bridge host's: its VLAN interface gone)."""
        state = load(self.args, "host", self.spec.name)
        return frozenset(state.get("broken", ())) & frozenset(state["vlans"])

    def attachment_point(self, vid: int) -> str:
        return attachment(self.spec, vid).bridge

    def converge(self, desired: frozenset[int]) -> ConvergeResult:
        refused = {v: f"VLAN {v} is the host's own (simulated)" for v in self.args.get("refuse", ()) if v in desired}
        result = self._converge(frozenset(desired) - frozenset(refused))
        if refused:  # (as the real host drivers: the others converged, these refused)
            raise base.VlansRefused(self.spec.name, refused, result)
        return result

    def _converge(self, desired: frozenset[int]) -> ConvergeResult:
        state = load(self.args, "host", self.spec.name)
        before = frozenset(state["vlans"])
        in_use = {int(v) for v, n in state["vm_ports"].items() if n}
        after = set(desired) | (before & in_use)
        if after != before and self.args.get("fail_times", 0) > state["failures"]:  # as the switch
            state["failures"] += 1
            save(self.args, "host", self.spec.name, state)
            raise TemporaryDeviceError(self.spec.name, "ovsdb transaction: try again (database busy)")
        if self.args.get("fail_commit") and after != before:  # as the switch: nothing to change, nothing fails
            raise PermanentDeviceError(self.spec.name, "ip link add br-v: Operation not permitted")
        broken = set(state.get("broken", ())) & after
        diff = _labelled(
            self.args,
            "\n".join(
                [f"+ {bridge_name(v)}" for v in sorted(after - before)]
                + [f"- {bridge_name(v)}" for v in sorted(before - after)]
                + [f"~ repair {bridge_name(v)}" for v in sorted(broken & set(desired))]
            ),
        )
        state["vlans"] = sorted(after)
        state["broken"] = sorted(broken - set(desired))
        if diff:
            state["commits"] += 1
        save(self.args, "host", self.spec.name, state)
        return ConvergeResult(
            self.spec.name, diff, bool(diff), {self.spec.name: before}, {self.spec.name: frozenset(after)}
        )


@contextlib.contextmanager
def _recorded(kind: str, spec) -> Iterator[None]:
    only = spec.driver_args.get("reachable_from")
    if only and os.environ.get("VIRTCLOUD_WORKER") != only:
        raise TemporaryDeviceError(spec.name, f"connect: timed out (reachable from worker {only} only)")
    start = time.time()
    delay = float(spec.driver_args.get("delay", 0))
    if delay:
        time.sleep(delay)
    try:
        yield
    finally:
        state = load(spec.driver_args, kind, spec.name)
        state["sessions"].append([start, time.time()])
        save(spec.driver_args, kind, spec.name, state)


@contextlib.contextmanager
def open_switch(spec: base.SwitchSpec) -> Iterator[FakeSwitch]:
    with _recorded("switch", spec):
        yield FakeSwitch(spec)


def attachment(spec: base.HostSpec, vid: int) -> base.Attachment:
    """A simulated host has one bridge per VLAN, as the Linux-bridge driver does."""
    return base.Attachment(bridge=bridge_name(vid), vlan=None, uplink=spec.trunk_interface)


@contextlib.contextmanager
def open_host(spec: base.HostSpec) -> Iterator[FakeHost]:
    with _recorded("host", spec):
        yield FakeHost(spec)
