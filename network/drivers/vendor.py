"""Vendor switches (``ios``, ``eos``, ``junos``, ``nxos``) through NAPALM, and the one session flow every
NAPALM-based platform shares (the project's own ``ovs`` driver uses ``NapalmSwitchSession`` too).

The flow of ``converge(desired)``: read the owned ports' VLANs (``get_vlans``) → render the desired VLAN
membership in the platform's language → ``load_merge_candidate`` → ``compare_config`` → ``commit_config``
only when the diff is not empty → verify with ``get_vlans`` → ``rollback`` when the device does not show
what was asked for.

Rendering is a pure function, ``render(platform, desired, vlan_names)``: it creates the VLANs and sets the
trunk allowed list of every owned port in ``desired``, and nothing else (templates in ``templates/``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from pathlib import Path

import jinja2
from napalm import get_network_driver
from napalm.base import exceptions as napalm_exc
from napalm.base.helpers import canonical_interface_name

from network.drivers.base import (
    ConvergeResult,
    DeviceError,
    PermanentDeviceError,
    SwitchSpec,
    TemporaryDeviceError,
)
from network.drivers.ranges import compact

TEMPLATES = Path(__file__).with_name("templates")
PLATFORMS = ("ios", "eos", "junos", "nxos")
# driver_args keys this module reads itself; never passed on to the NAPALM driver as optional_args
_OWN_ARGS = ("template", "vlan_name_format")
DEFAULT_VLAN_NAME = "vc-{vid}"


# --- rendering ------------------------------------------------------------------------------------------------


def vlan_list(vids) -> str:
    """Compact ``100-103,200`` form (what every vendor CLI accepts in an allowed list)."""
    return compact(vids)


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(  # noqa: S701 - renders device configuration, not HTML
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["vlan_list"] = vlan_list
    return env


def render(platform: str, desired: Mapping[str, frozenset[int]], vlan_names: Mapping[int, str] | None = None) -> str:
    """The configuration that makes every port in ``desired`` a trunk carrying exactly its VLAN set.

    Every VLAN used is created (with its name from ``vlan_names``, default ``vc-<vid>``); no VLAN is ever
    deleted (another port the portal does not own may use it) and no other port is mentioned.
    """
    if platform not in PLATFORMS:
        raise PermanentDeviceError(platform, f"no configuration template for platform {platform!r}")
    vlan_names = vlan_names or {}
    vids = sorted({vid for port_vids in desired.values() for vid in port_vids})
    vlans = [{"id": vid, "name": vlan_names.get(vid, DEFAULT_VLAN_NAME.format(vid=vid))} for vid in vids]
    ports = [{"name": name, "vids": sorted(desired[name])} for name in sorted(desired)]
    return _environment().get_template(f"{platform}.j2").render(vlans=vlans, ports=ports)


# --- errors ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def classified(device: str, action: str) -> Iterator[None]:
    """Turn NAPALM and transport exceptions into Temporary/PermanentDeviceError naming the device."""
    try:
        yield
    except DeviceError:
        raise
    except napalm_exc.ConnectAuthError as exc:
        raise PermanentDeviceError(device, f"{action}: authentication failed: {exc}") from exc
    except (
        napalm_exc.ConnectionException,
        napalm_exc.SessionLockedException,
        napalm_exc.LockError,
        napalm_exc.CommandTimeoutException,
    ) as exc:
        raise TemporaryDeviceError(device, f"{action}: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:  # timeouts, refused and reset connections
        raise TemporaryDeviceError(device, f"{action}: {exc}") from exc
    except napalm_exc.NapalmException as exc:  # every other NAPALM error: merge, replace or commit rejected …
        raise PermanentDeviceError(device, f"{action}: rejected: {exc}") from exc
    except NotImplementedError as exc:
        raise PermanentDeviceError(device, f"{action}: not supported by the driver: {exc}") from exc


# --- the session ----------------------------------------------------------------------------------------------


class NapalmSwitchSession:
    """A ``SwitchSession`` over an opened NAPALM ``NetworkDriver``: the one code path for every platform.

    ``renderer`` turns the desired state into the platform's configuration text; ``port_key`` maps an
    interface name as the device reports it (``Et1``) to the spelling used in the inventory (``Ethernet1``).
    """

    def __init__(
        self,
        spec: SwitchSpec,
        device,
        renderer: Callable[[Mapping[str, frozenset[int]]], str],
        port_key: Callable[[str], str] = canonical_interface_name,
    ):
        self.spec = spec
        self.device = device
        self.renderer = renderer
        self.port_key = port_key
        self._owned = {port_key(p): p for p in spec.owned_ports}

    def port_vlans(self) -> dict[str, frozenset[int]]:
        with classified(self.spec.name, "get_vlans"):
            vlans = self.device.get_vlans()
        found: dict[str, set[int]] = {p: set() for p in self.spec.owned_ports}
        for vid, info in vlans.items():
            for ifname in info.get("interfaces", ()):
                port = self._owned.get(self.port_key(ifname))
                if port is not None:
                    found[port].add(int(vid))
        return {p: frozenset(v) for p, v in found.items()}

    def render(self, desired: Mapping[str, frozenset[int]]) -> str:
        self._check(desired)
        return self.renderer(desired)

    def plan(self, desired: Mapping[str, frozenset[int]]) -> str:
        config = self.render(desired)
        with classified(self.spec.name, "load_merge_candidate"):
            self.device.load_merge_candidate(config=config)
        try:
            with classified(self.spec.name, "compare_config"):
                return self.device.compare_config()
        finally:
            with classified(self.spec.name, "discard_config"):
                self.device.discard_config()

    def converge(self, desired: Mapping[str, frozenset[int]]) -> ConvergeResult:
        desired = {port: frozenset(vids) for port, vids in desired.items()}
        config = self.render(desired)
        current = self.port_vlans()
        before = {port: current[port] for port in desired}
        with classified(self.spec.name, "load_merge_candidate"):
            self.device.load_merge_candidate(config=config)
        with classified(self.spec.name, "compare_config"):
            diff = self.device.compare_config()
        if not diff.strip():
            with classified(self.spec.name, "discard_config"):
                self.device.discard_config()
            self._verify(desired, rollback=False)
            return ConvergeResult(self.spec.name, "", False, before, dict(before))
        try:
            with classified(self.spec.name, "commit_config"):
                self.device.commit_config(message="virtcloud: converge VLAN membership")
        except DeviceError:
            with contextlib.suppress(Exception):
                self.device.discard_config()
            raise
        after = self._verify(desired, rollback=True)
        return ConvergeResult(self.spec.name, diff, True, before, after)

    def _verify(self, desired: Mapping[str, frozenset[int]], *, rollback: bool) -> dict[str, frozenset[int]]:
        current = self.port_vlans()
        after = {port: current[port] for port in desired}
        wrong = {port: vids for port, vids in after.items() if vids != desired[port]}
        if not wrong:
            return after
        detail = "; ".join(
            f"{port} has {vlan_list(vids) or 'none'}, wanted {vlan_list(desired[port]) or 'none'}"
            for port, vids in sorted(wrong.items())
        )
        if rollback:
            with classified(self.spec.name, "rollback"):
                self.device.rollback()
            raise PermanentDeviceError(self.spec.name, f"verification failed after commit, rolled back: {detail}")
        raise PermanentDeviceError(self.spec.name, f"device shows no diff but differs from desired: {detail}")

    def _check(self, desired: Mapping[str, frozenset[int]]) -> None:
        foreign = sorted(p for p in desired if self.port_key(p) not in self._owned)
        if foreign:
            raise PermanentDeviceError(self.spec.name, f"ports {', '.join(foreign)} are not owned by the portal")
        for port, vids in desired.items():
            bad = sorted(v for v in vids if not 1 <= int(v) <= 4094)
            if bad:
                raise PermanentDeviceError(self.spec.name, f"port {port}: VLAN ids {bad} are outside 1-4094")


@contextlib.contextmanager
def open_switch(spec: SwitchSpec) -> Iterator[NapalmSwitchSession]:
    """A session to a vendor switch through ``napalm.get_network_driver(spec.platform)``.

    ``driver_args`` are passed as NAPALM ``optional_args`` except ``template`` (render with another
    platform's template, e.g. for a NAPALM community driver of a compatible CLI) and ``vlan_name_format``.
    """
    args = dict(spec.driver_args)
    template = str(args.get("template", spec.platform))
    name_format = str(args.get("vlan_name_format", DEFAULT_VLAN_NAME))
    optional_args = {k: v for k, v in args.items() if k not in _OWN_ARGS}
    with classified(spec.name, "load driver"):
        driver_class = get_network_driver(spec.platform)
    device = driver_class(
        hostname=spec.address,
        username=spec.username,
        password=spec.password,
        timeout=int(spec.timeout),
        optional_args=optional_args,
    )
    with classified(spec.name, "open"):
        device.open()

    def renderer(desired: Mapping[str, frozenset[int]]) -> str:
        vids = {vid for v in desired.values() for vid in v}
        return render(template, desired, {vid: name_format.format(vid=vid) for vid in vids})

    try:
        yield NapalmSwitchSession(spec, device, renderer)
    finally:
        with contextlib.suppress(Exception):
            device.close()
