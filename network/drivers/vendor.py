"""Vendor switches (``ios``, ``eos``, ``junos``, ``nxos``, ``nxos_ssh``) through NAPALM, and the one session flow every
NAPALM-based platform shares (the project's own ``ovs`` driver uses ``NapalmSwitchSession`` too).

The flow of ``converge(desired)``: read the owned ports' VLANs (``get_vlans``) → render the desired VLAN
membership in the platform's language → ``load_merge_candidate`` → ``compare_config`` → ``commit_config``
only when the diff is not empty → verify with ``get_vlans`` → undo (or ``rollback``) when the device does
not show what was asked for.

Rendering is a pure function, ``render(platform, desired, vlan_names, existing=…, current=…)``: it creates the
VLANs the device does not have yet and sets the trunk allowed list of every owned port in ``desired``, and
nothing else (templates in ``templates/``).
"""

from __future__ import annotations

import contextlib
import inspect
import re
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
from network.drivers.naming import VLAN_NAME, vlan_name
from network.drivers.ranges import PLATFORM_RESERVED, compact

TEMPLATES = Path(__file__).with_name("templates")
PLATFORMS = ("ios", "eos", "junos", "nxos", "nxos_ssh")
# the templates ``render`` knows: a platform's own, and ``junos_nonels`` (non-ELS EX switches: "port-mode trunk")
TEMPLATE_NAMES = (*PLATFORMS, "junos_nonels")
# platforms that speak another's configuration language: NX-OS over SSH takes the CLI lines NX-API does
_TEMPLATE_OF = {"nxos_ssh": "nxos"}
# driver_args keys this module reads itself; never passed on to the NAPALM driver as optional_args
_OWN_ARGS = ("template", "vlan_name_format", "undo", "trunk_encapsulation")
DEFAULT_VLAN_NAME = "vc-{vid}"
COMMIT_MESSAGE = "virtcloud: converge VLAN membership"
# NAPALM's ios, eos and nxos drivers refuse any commit message (NotImplementedError, before doing anything)
_NO_COMMIT_MESSAGE = ("ios", "eos", "nxos", "nxos_ssh")
# the longest allowed list one configuration line carries; a longer one continues on "… allowed vlan add" lines
LINE_WIDTH = 200
# templates whose merge the device applies line by line (IOS, NX-OS): a first "allowed vlan <list>" line would
# drop every VLAN of the later "add" lines for a moment, so a long list is changed by "add"/"remove" lines from
# the port's current VLANs (EOS config sessions and Junos commits apply at once: the absolute form is safe)
_INCREMENTAL = ("ios", "nxos")
# A failed verification is undone by merging the ports' previous state on the platforms whose NAPALM
# rollback replaces the whole configuration (EOS: with the startup configuration copied at commit, losing
# what others had not saved; IOS, NX-OS: ``configure replace`` of the file); the device's own rollback
# only when that merge committed nothing (each commit retakes its snapshot). Junos' ``rollback 1`` undoes
# exactly the last commit.
_UNDO_BY_MERGE = ("ios", "eos", "nxos", "nxos_ssh")
# platforms whose commit takes all of the candidate or none of it (EOS configuration sessions, Junos commits,
# one OVSDB transaction): a commit they reject was refused. Elsewhere a merge applied line by line may stop
# half-way (the device kept the lines before the one it rejected), so a rejected commit may have applied.
_ATOMIC_COMMIT = ("eos", "junos", "ovs")
# platforms whose get_vlans lists a VLAN's ports that are up (EOS ``show vlan``, NX-OS ``show vlan brief``,
# IOS ``show vlan``): a port that is down is verified from its state, not its VLANs
_LIVE_VLANS = ("ios", "eos", "nxos", "nxos_ssh")


# --- rendering ------------------------------------------------------------------------------------------------


def vlan_list(vids) -> str:
    """Compact ``100-103,200`` form (what every vendor CLI accepts in an allowed list)."""
    return compact(vids)


def vlan_chunks(vids, width: int = LINE_WIDTH) -> list[str]:
    """``vlan_list(vids)`` cut at commas into pieces of at most ``width`` characters: the first sets a trunk's
    allowed list, each further one is added to it (a CLI line has a length limit, and the devices themselves
    write a long list back that way)."""
    chunks: list[str] = []
    for item in vlan_list(vids).split(","):
        if chunks and len(chunks[-1]) + 1 + len(item) <= width:
            chunks[-1] += "," + item
        else:
            chunks.append(item)
    return [c for c in chunks if c]


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
    env.filters["vlan_chunks"] = vlan_chunks
    return env


def render(
    platform: str,
    desired: Mapping[str, frozenset[int]],
    vlan_names: Mapping[int, str] | None = None,
    *,
    trunk_encapsulation: str = "",
    existing: frozenset[int] = frozenset(),
    current: Mapping[str, frozenset[int]] | None = None,
    undo: bool = False,
    taken: Mapping[str, int] | None = None,
) -> str:
    """The configuration that makes every port in ``desired`` a trunk carrying exactly its VLAN set.

    Every VLAN used is created (with its name from ``vlan_names``, default ``vc-<vid>``) but those in
    ``existing`` (the operator's static VLANs and every VLAN the device already has: carried by id, never
    created or renamed); no VLAN is ever deleted (another port the portal does not own may use it) and no
    other port is mentioned.

    ``current``: the VLANs of the ports whose present state the device showed (listed under a VLAN). On IOS
    and NX-OS a port whose list takes more than one line, and that showed two VLANs or more (surely a trunk
    with a list of its own), is changed by ``add``/``remove`` lines from it (not at all when it already carries
    its set); one that may allow "all" or be no trunk yet gets every wanted VLAN added, then every other id
    removed — never the absolute form, whose first line dropped the later lines' VLANs for a moment. ``undo``:
    restoring the ports' previous lists exactly as they were — no VLAN is created, and ids the platform reserves
    (IOS lists a trunk under 1002-1005) are let be.
    ``taken``: the device's VLAN names (name → id): a VLAN is never created with a name another id has (Junos's
    ``set vlans <name> vlan-id <id>`` would re-tag that VLAN, and every port in it).
    """
    if platform not in TEMPLATE_NAMES:
        raise PermanentDeviceError(platform, f"no configuration template for platform {platform!r}")
    language = _TEMPLATE_OF.get(platform, platform)
    vlan_names = vlan_names or {}
    vids = sorted({vid for port_vids in desired.values() for vid in port_vids})
    platform_reserved = PLATFORM_RESERVED.get(platform, frozenset())
    reserved = sorted(set(vids) & platform_reserved)
    if reserved and not undo:
        raise PermanentDeviceError(platform, f"VLAN ids {vlan_list(reserved)} are reserved on {platform}")
    created = [] if undo else [vid for vid in vids if vid not in existing]
    vlans = [{"id": vid, "name": vlan_names.get(vid, DEFAULT_VLAN_NAME.format(vid=vid))} for vid in created]
    bad = [vlan["name"] for vlan in vlans if not VLAN_NAME.fullmatch(str(vlan["name"]))]
    if bad:  # (a caller's names; open_switch makes them with vlan_name, which says why)
        raise PermanentDeviceError(platform, f"VLAN names {bad} are not plain words of 1-32 characters")
    taken = taken or {}
    clash = [(v["name"], taken[v["name"]], v["id"]) for v in vlans if taken.get(v["name"], v["id"]) != v["id"]]
    if clash:
        said = "; ".join(f"{name} is VLAN {other}'s, not {vid}'s" for name, other, vid in clash)
        raise PermanentDeviceError(
            platform, f"the device names its VLANs so already ({said}): rename them there, or change vlan_name_format"
        )
    ports = []
    for name in sorted(desired):
        port = {"name": name, "vids": sorted(desired[name]), "add": None, "remove": None}
        now = (current or {}).get(name)
        # a port listed under every VLAN the device has — or, on IOS, under a reserved id — may well allow "all"
        # (the default), which no remove line of what it shows could turn into the desired list
        allows_all = bool(
            now is not None and (now & platform_reserved or (existing and existing - platform_reserved <= now))
        )
        # a port showing one VLAN may be no trunk yet (an access port, a port in dynamic mode): made a trunk, its
        # allowed list is the default "all", which add/remove lines leave carrying every VLAN — only a port
        # showing two or more is surely a trunk with a list of its own
        surely_a_list = now is not None and len(now) >= 2 and not allows_all
        # a long list on IOS and NX-OS, which apply a merge line by line, is never set absolutely on a port the
        # device showed: its first line cut the list to the first chunk until the "add" lines after it (a trunk
        # toward a router or a switch then learns the later VLANs again through spanning tree: seconds without them)
        if language in _INCREMENTAL and now is not None and len(vlan_chunks(desired[name])) > 1:
            if surely_a_list:
                # a VLAN created now is removed too where it is not wanted: the device showed the port's VLANs
                # among those it has, and an id it does not have may still be on the allowed list (its VLAN
                # deleted by hand), which would carry the new VLAN there
                stale = frozenset(created) - desired[name]
                if now == desired[name] and not stale:
                    continue
                port["add"] = vlan_chunks(desired[name] - now)
                port["remove"] = vlan_chunks((now - desired[name]) | stale)
            else:  # "all", or no trunk yet: every wanted VLAN added, then every other id (but those it keeps) removed
                port["add"] = vlan_chunks(desired[name])
                port["remove"] = vlan_chunks(frozenset(range(1, 4095)) - platform_reserved - desired[name])
        ports.append(port)
    if trunk_encapsulation not in ("", "dot1q"):
        raise PermanentDeviceError(platform, f"trunk_encapsulation {trunk_encapsulation!r}: only dot1q")
    return (
        _environment()
        .get_template(f"{language}.j2")
        .render(vlans=vlans, ports=ports, encapsulation=trunk_encapsulation)
    )


# --- errors ---------------------------------------------------------------------------------------------------


def _transport_errors() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(permanent, temporary, refused) exceptions of the transports under NAPALM's drivers (netmiko for IOS/NX-OS
    SSH, pyeapi for EOS, PyEZ for Junos) that NAPALM lets through unwrapped; those not installed are left out.
    Refused: the device said no to a command or a commit (EOS's ``commit_config`` raises pyeapi's CommandError,
    Junos's PyEZ's CommitError, both unwrapped) — a permanent error, checked after the temporary ones (PyEZ's
    lock and timeout errors are RpcErrors too)."""
    permanent: list[type] = []
    temporary: list[type] = []
    refused: list[type] = []
    with contextlib.suppress(ImportError):
        from netmiko import exceptions as netmiko_exc

        permanent.append(netmiko_exc.NetmikoAuthenticationException)
        temporary += [netmiko_exc.NetmikoTimeoutException, netmiko_exc.ReadTimeout, netmiko_exc.ReadException]
    with contextlib.suppress(ImportError):
        from pyeapi import eapilib

        temporary.append(eapilib.ConnectionError)
        refused.append(eapilib.CommandError)
    with contextlib.suppress(ImportError):
        from jnpr.junos import exception as junos_exc

        permanent += [junos_exc.ConnectAuthError, junos_exc.ConnectUnknownHostError]
        temporary += [
            junos_exc.RpcTimeoutError,
            junos_exc.ConnectRefusedError,
            junos_exc.ConnectClosedError,
            junos_exc.ConnectTimeoutError,
            junos_exc.LockError,
        ]
        refused.append(junos_exc.RpcError)  # CommitError, ConfigLoadError, … (after LockError and the timeouts)
    return tuple(permanent), tuple(temporary), tuple(refused)


_TRANSPORT_PERMANENT, _TRANSPORT_TEMPORARY, _TRANSPORT_REFUSED = _transport_errors()


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
    except _TRANSPORT_PERMANENT as exc:  # the transports' own: a login refused, a name that does not resolve
        raise PermanentDeviceError(device, f"{action}: {type(exc).__name__}: {exc}") from exc
    except _TRANSPORT_TEMPORARY as exc:  # … and their timeouts and lost connections (a switch reloading)
        raise TemporaryDeviceError(device, f"{action}: {type(exc).__name__}: {exc}") from exc
    except _TRANSPORT_REFUSED as exc:  # a command or commit the device rejected (nothing of it applied)
        raise PermanentDeviceError(device, f"{action}: rejected: {type(exc).__name__}: {exc}") from exc
    except napalm_exc.NapalmException as exc:  # every other NAPALM error: merge, replace or commit rejected …
        raise PermanentDeviceError(device, f"{action}: rejected: {exc}") from exc
    except NotImplementedError as exc:
        raise PermanentDeviceError(device, f"{action}: not supported by the driver: {exc}") from exc


# --- the session ----------------------------------------------------------------------------------------------

# what the session knows of the device when it renders, passed to a renderer that takes it as keywords
_RENDER_CONTEXT = ("existing", "current", "undo", "taken")


def _context_keywords(renderer: Callable) -> frozenset[str]:
    """Which of ``_RENDER_CONTEXT`` ``renderer`` takes (a renderer of the desired state alone takes none)."""
    try:
        params = inspect.signature(renderer).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(_RENDER_CONTEXT)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.name in _RENDER_CONTEXT and p.kind in keyword)


def _vid(key) -> int | None:
    try:
        return int(key)
    except (TypeError, ValueError):
        return None


class NapalmSwitchSession:
    """A ``SwitchSession`` over an opened NAPALM ``NetworkDriver``: the one code path for every platform.

    ``renderer`` turns the desired state into the platform's configuration text (given, when it takes them as
    keywords, ``existing``: every VLAN id the device showed at the last ``get_vlans``; ``current``: the
    owned ports it listed, with their VLANs; ``undo``: restoring the ports' previous state); ``port_key`` maps
    an interface name as the device reports it (``Et1``) to the spelling used in the inventory (``Ethernet1``).
    """

    def __init__(
        self,
        spec: SwitchSpec,
        device,
        renderer: Callable[[Mapping[str, frozenset[int]]], str],
        port_key: Callable[[str], str] | None = None,
        *,
        undo_by_merge: bool | None = None,
    ):
        platform = spec.platform
        if port_key is None:
            port_key = _junos_port if platform == "junos" else canonical_interface_name
        self.spec = spec
        self.device = device
        self.renderer = renderer
        # in any case: an inventory's "ethernet1" is the device's "Ethernet1" (the CLIs take either)
        self.port_key = lambda name, key=port_key: key(name).lower()
        self.commit_message = "" if platform in _NO_COMMIT_MESSAGE else COMMIT_MESSAGE  # "": the driver takes none
        self.undo_by_merge = platform in _UNDO_BY_MERGE if undo_by_merge is None else undo_by_merge
        self._owned = {self.port_key(p): p for p in spec.owned_ports}
        self._keywords = _context_keywords(renderer)
        # what the last get_vlans showed: every VLAN id of the device, and the owned ports listed under one
        self.device_vlans: frozenset[int] = frozenset()
        self.device_vlan_names: dict[str, int] = {}
        self._listed: dict[str, frozenset[int]] = {}

    def port_vlans(self) -> dict[str, frozenset[int]]:
        with classified(self.spec.name, "get_vlans"):
            vlans = self.device.get_vlans()
        found: dict[str, set[int]] = {p: set() for p in self.spec.owned_ports}
        listed: set[str] = set()
        ids: set[int] = set()
        names: dict[str, int] = {}
        for key, info in vlans.items():
            vid = _vid(key)
            if vid is None:
                continue
            ids.add(vid)
            if isinstance(info.get("name"), str) and info["name"]:
                names.setdefault(info["name"], vid)
            for ifname in info.get("interfaces", ()):
                port = self._owned.get(self.port_key(ifname))
                if port is not None:
                    found[port].add(vid)
                    listed.add(port)
        self.device_vlans = frozenset(ids)
        self.device_vlan_names = names
        self._listed = {p: frozenset(found[p]) for p in listed}
        return {p: frozenset(v) for p, v in found.items()}

    def render(self, desired: Mapping[str, frozenset[int]], *, undo: bool = False) -> str:
        self._check(desired)
        context = {
            "existing": self.device_vlans,
            "current": {port: vids for port, vids in self._listed.items() if port in desired},
            "undo": undo,
            "taken": self.device_vlan_names,
        }
        return self.renderer(desired, **{k: v for k, v in context.items() if k in self._keywords})

    def plan(self, desired: Mapping[str, frozenset[int]]) -> str:
        if self._keywords:  # the renderer needs what the device has (its VLANs, the ports' lists)
            self._check(desired)
            self.port_vlans()
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
        self._check(desired)
        current = self.port_vlans()
        self._check_present(desired)
        before = {port: current[port] for port in desired}
        diff = self._load(self.render(desired))
        if not diff.strip():
            self._verify(desired)
            return ConvergeResult(self.spec.name, "", False, before, dict(before))
        try:
            self._commit()
        except DeviceError as exc:
            if exc.permanent and not exc.may_have_applied:
                raise self._refusal_checked(exc, before) from exc
            raise
        after = self._verify(desired, before=before)
        return ConvergeResult(self.spec.name, diff, True, before, after)

    def _refusal_checked(self, exc: DeviceError, before: Mapping[str, frozenset[int]]) -> DeviceError:
        """``exc``, a commit an all-or-nothing platform rejected, when the device shows its owned ports as they
        were; otherwise (or when it cannot be read) the same error saying the change may be on the device. The
        commit call does more than commit: NAPALM's EOS sends ``write memory`` after the session's commit, Junos
        unlocks after ``commit`` — an error there comes once the change is live, and a change recorded refused
        lets the VLAN go back to the pool whatever the device carries."""
        try:
            current = self.port_vlans()
        except DeviceError as read:
            shows = f"its ports could not be read to tell ({read.message})"
        else:
            moved = sorted(port for port, vids in before.items() if current.get(port, frozenset()) != vids)
            if not moved:
                return exc
            shows = f"the device shows it on {', '.join(moved)}"
        return PermanentDeviceError(exc.device, f"{exc.message}; {shows}", may_have_applied=True)

    def _load(self, config: str) -> str:
        """Load ``config`` as a merge candidate; the device's diff. A candidate with an empty diff is discarded,
        and so is one whose compare fails (EOS keeps its config session otherwise, and NAPALM's lock then
        refuses every later load; the discard's own errors suppressed there)."""
        with classified(self.spec.name, "load_merge_candidate"):
            self.device.load_merge_candidate(config=config)
        try:
            with classified(self.spec.name, "compare_config"):
                diff = self.device.compare_config()
            if not diff.strip():
                with classified(self.spec.name, "discard_config"):
                    self.device.discard_config()
        except BaseException:
            with contextlib.suppress(Exception):
                self.device.discard_config()
            raise
        return diff

    def _commit(self) -> None:
        try:
            with classified(self.spec.name, "commit_config"):
                self.device.commit_config(message=self.commit_message)
        except DeviceError as exc:
            with contextlib.suppress(Exception):
                self.device.discard_config()
            if exc.permanent and not exc.may_have_applied and self.spec.platform not in _ATOMIC_COMMIT:
                raise PermanentDeviceError(exc.device, exc.message, may_have_applied=True) from exc
            raise

    def _verify(
        self, desired: Mapping[str, frozenset[int]], *, before: Mapping[str, frozenset[int]] | None = None
    ) -> dict[str, frozenset[int]]:
        """The owned ports as the device shows them, when they are ``desired``. Otherwise a permanent error,
        after undoing the commit when ``before`` (the ports before it) is given."""
        current = self.port_vlans()
        after = {port: current[port] for port in desired}
        wrong = {port: vids for port, vids in after.items() if vids != desired[port]}
        # a port that is down shows none of its VLANs on some platforms (``_down``): not a failed change, its
        # configuration is what was committed
        down = self._down(desired) if wrong else set()
        after.update({port: desired[port] for port in wrong if port in down})
        wrong = {port: vids for port, vids in wrong.items() if port not in down}
        if not wrong:
            return after
        detail = "; ".join(
            f"{port} has {vlan_list(vids) or 'none'}, wanted {vlan_list(desired[port]) or 'none'}"
            for port, vids in sorted(wrong.items())
        )
        if before is None:
            raise PermanentDeviceError(self.spec.name, f"device shows no diff but differs from desired: {detail}")
        if self.undo_by_merge:
            # a port that is down read as carrying nothing (its "before" is blind): merging that back would
            # empty its real list, so it keeps what was committed
            committed, problem = self._undo({port: vids for port, vids in before.items() if port not in down})
            if not problem:
                where = "the ports that are up are as before" if down else "the ports are as before"
                message = f"verification failed after commit, undone ({where}): {detail}"
                # a port that is down keeps what was committed: the change may be on the device
                raise PermanentDeviceError(self.spec.name, message, may_have_applied=bool(down))
            if committed:
                # NAPALM's ios, eos and nxos commit first snapshots the device (rollback_config, rollback-0,
                # checkpoint): the device's rollback would now restore the failed change, not the state before it
                raise PermanentDeviceError(
                    self.spec.name,
                    f"verification failed after commit ({detail}); the undo did not restore the ports ({problem}): "
                    "the change may be on the device (its own rollback, now the undo's snapshot, is not used)",
                    may_have_applied=True,
                )
        try:
            with classified(self.spec.name, "rollback"):
                self.device.rollback()
        except DeviceError as exc:
            raise PermanentDeviceError(
                self.spec.name, f"verification failed after commit ({detail}); {exc.message}", may_have_applied=True
            ) from exc
        raise PermanentDeviceError(self.spec.name, f"verification failed after commit, rolled back: {detail}")

    def down_ports(self, ports) -> set[str]:
        """Of ``ports``, those the device reports down where its VLAN lists leave such ports out (``_down``):
        the reconciler reads no missing VLAN there (it would record one every pass, and "repair" it with a
        commit that changes nothing)."""
        return self._down(ports)

    def _down(self, ports) -> set[str]:
        """Of ``ports``, those the device reports down — on the platforms whose VLAN lists name only the ports
        that are up (``_LIVE_VLANS``); none elsewhere, or when it cannot say."""
        if self.spec.platform not in _LIVE_VLANS:
            return set()
        try:
            with classified(self.spec.name, "get_interfaces"):
                interfaces = self.device.get_interfaces()
        except Exception:  # noqa: BLE001 - it cannot say: the verification's own failure stands
            return set()
        state = {self.port_key(name): info for name, info in interfaces.items()}
        return {port for port in ports if state.get(self.port_key(port), {}).get("is_up") is False}

    def _undo(self, before: Mapping[str, frozenset[int]]) -> tuple[bool, str]:
        """Merge the owned ports' previous state (only theirs: nothing else of the device is replaced; no VLAN
        created, their lists restored exactly as they were). (whether a commit was attempted, what is still
        wrong: "" when the device shows the ports as they were)."""
        committed = False
        try:
            diff = self._load(self.render(before, undo=True))
            if diff.strip():
                committed = True  # from here on the device's own rollback snapshot is the undo's
                self._commit()
            current = self.port_vlans()
        except DeviceError as exc:
            return committed, exc.message or type(exc).__name__
        wrong = {port: vids for port, vids in before.items() if current[port] != vids}
        return committed, "; ".join(
            f"{port} has {vlan_list(current[port]) or 'none'}, was {vlan_list(vids) or 'none'}"
            for port, vids in sorted(wrong.items())
        )

    def _check_present(self, desired: Mapping[str, frozenset[int]]) -> None:
        """The owned ports ``get_vlans`` listed under no VLAN are interfaces of the device (asked only then): a name
        the device spells otherwise (``ethernet1`` for ``Ethernet1``, a typo) read as a port carrying nothing, and
        a failed change's undo then emptied the real port and said it was as before. When the device cannot say,
        nothing is refused."""
        unlisted = [port for port in desired if port not in self._listed]
        if not unlisted:
            return
        try:
            with classified(self.spec.name, "get_interfaces"):
                interfaces = self.device.get_interfaces()
            known = {self.port_key(name) for name in interfaces}
        except Exception:  # noqa: BLE001 - it cannot say
            return
        if not known:
            return
        missing = sorted(port for port in unlisted if self.port_key(port) not in known)
        if missing:
            raise PermanentDeviceError(
                self.spec.name,
                f"ports {', '.join(missing)} are not interfaces of the switch (it names them otherwise?): fix the "
                "inventory's port names; nothing was changed",
            )

    def _check(self, desired: Mapping[str, frozenset[int]]) -> None:
        foreign = sorted(p for p in desired if self.port_key(p) not in self._owned)
        if foreign:
            raise PermanentDeviceError(self.spec.name, f"ports {', '.join(foreign)} are not owned by the portal")
        for port, vids in desired.items():
            bad = sorted(v for v in vids if not 1 <= int(v) <= 4094)
            if bad:
                raise PermanentDeviceError(self.spec.name, f"port {port}: VLAN ids {bad} are outside 1-4094")


def _junos_port(name: str) -> str:
    """A Junos interface as the inventory names it: ``get_vlans`` reports the logical unit (``xe-0/0/1.0``,
    an active one with ``*``), the inventory the physical port (``xe-0/0/1``)."""
    return canonical_interface_name(re.sub(r"\.\d+$", "", name.rstrip("*")))


def _junos_switch_style(device) -> str:
    """The PyEZ fact ``switch_style`` of an opened NAPALM junos driver (``VLAN``: a non-ELS EX switch,
    ``VLAN_L2NG``: ELS), read as NAPALM's own ``get_vlans`` does; "" when it cannot be read (facts are
    gathered on demand: an RPC that may fail)."""
    try:
        style = device.device.facts.get("switch_style", "")
    except Exception:  # noqa: BLE001 - no answer: the ELS template
        return ""
    return style if isinstance(style, str) else ""


@contextlib.contextmanager
def open_switch(spec: SwitchSpec) -> Iterator[NapalmSwitchSession]:
    """A session to a vendor switch through ``napalm.get_network_driver(spec.platform)``.

    ``driver_args`` are passed as NAPALM ``optional_args`` except ``template`` (render with another
    platform's template, e.g. for a NAPALM community driver of a compatible CLI; ``junos_nonels`` for a non-ELS
    EX switch, chosen by itself when the device's facts say switch_style ``VLAN``) and ``vlan_name_format``.
    """
    args = dict(spec.driver_args)
    name_format = str(args.get("vlan_name_format", DEFAULT_VLAN_NAME))
    # Catalysts that also speak ISL refuse "switchport mode trunk" while the encapsulation is "auto"
    encapsulation = str(args.get("trunk_encapsulation", ""))
    optional_args = {k: v for k, v in args.items() if k not in _OWN_ARGS}
    if spec.platform == "junos":
        # deleting a port's VLAN members it has none of is a warning PyEZ raises: the candidate sets every
        # owned port's members absolutely, so "statement not found" is expected, not an error
        optional_args.setdefault("ignore_warning", "statement not found")
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
    if "template" in args:
        template = str(args["template"])
    elif spec.platform == "junos" and _junos_switch_style(device) == "VLAN":
        template = "junos_nonels"
    else:
        template = spec.platform

    def renderer(
        desired: Mapping[str, frozenset[int]],
        *,
        existing: frozenset[int] = frozenset(),
        current: Mapping[str, frozenset[int]] | None = None,
        undo: bool = False,
        taken: Mapping[str, int] | None = None,
    ) -> str:
        # the operator's static VLANs and every VLAN the device already has: carried, never created or renamed
        existing = spec.static_vlans | existing
        vids = set() if undo else {vid for v in desired.values() for vid in v} - existing
        try:
            names = {vid: vlan_name(name_format, vid) for vid in vids}
        except ValueError as exc:
            raise PermanentDeviceError(spec.name, str(exc)) from None
        return render(
            template,
            desired,
            names,
            trunk_encapsulation=encapsulation,
            existing=existing,
            current=current,
            undo=undo,
            taken=taken,
        )

    try:
        yield NapalmSwitchSession(
            spec,
            device,
            renderer,
            undo_by_merge=None if "undo" not in args else args["undo"] == "merge",
        )
    finally:
        with contextlib.suppress(Exception):
            device.close()
