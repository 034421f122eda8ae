"""Hypervisor host driver ``linuxbridge``: one Linux bridge per cluster VLAN, fed by an 802.1Q sub-interface.

For VLAN ``vid`` the host gets ``<trunk>.<vid>`` (a VLAN interface on the trunk NIC) enslaved to the bridge
``br-v<vid>``; the VM manager plugs the VM's tap/veth into ``br-v<vid>`` (``attachment_point``). Everything
is done with pyroute2 and is idempotent: what exists is left alone ("already exists" is success), what is
half there (a bridge without its sub-interface, a link that is down) is repaired.

A VLAN that is no longer wanted is removed (sub-interface, then bridge) only when no VM port is left on the
bridge — the trunk sub-interface is the only other member allowed; otherwise the VLAN stays, and the diff
says which VM ports kept it. A sub-interface of the trunk without its bridge is removed only when the portal
made it (its alias says ``virtcloud``) and it has no address: the hypervisor's own VLAN interfaces (a
management or storage ``bond0.20``) are never touched. Only the portal's bridges (marked, or holding its marked
sub-interface) are counted and removed: a ``br-v<vid>`` the operator made (for infrastructure VMs, say) is not,
and is adopted for a cluster only while nothing else is on it. Nor is a ``br-v<vid>`` bridge with an address of
the host's own ever counted, removed or given to a cluster. (A link-local address is the host's own too, but on
a link the portal made — marked ``virtcloud``, or a bridge holding such a sub-interface — which the kernel gave
one before the portal kept its links free of IPv6.)

The host takes no part in a tenant's network: its bridge and sub-interface get no IPv6 address (no link-local
address a root user in a VM could reach the hypervisor on) and, in the host's own namespace, IPv6 is off on
them (no router advertisement from a VM is obeyed).

``driver_args``: ``netns`` — the namespace of a lab host on this machine; absent or empty: this machine's
own namespace (the host agent running on the hypervisor). Same code either way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute, NetlinkError

from network.drivers.base import (
    Attachment,
    ConvergeResult,
    HostSpec,
    PermanentDeviceError,
    TemporaryDeviceError,
    VlansRefused,
)
from network.drivers.netlink import TEMPORARY_ERRNOS, open_iproute

logger = logging.getLogger(__name__)

IFNAMSIZ = 15  # longest interface name the kernel takes
ALIAS = "virtcloud"  # the alias of the sub-interfaces the portal makes (the only ones it ever removes)
_ADDR_GEN = "IFLA_INET6_ADDR_GEN_MODE"  # 1: none (no address generated)
_BRIDGE_NAME = re.compile(r"br-v(\d{1,4})")
_ETH_P_8021AD = 0x88A8


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    kind: str
    master: int | None
    up: bool
    parent: int | None  # IFLA_LINK: the lower device of a VLAN interface
    vlan_id: int | None
    alias: str = ""
    protocol: int | None = None  # IFLA_VLAN_PROTOCOL of a VLAN interface: 0x8100 (802.1Q), 0x88a8 (802.1ad)


_SCOPE_LINK = 253  # RT_SCOPE_LINK: an address the kernel gives any link that is up (fe80::)


def attachment(spec: HostSpec, vid: int) -> Attachment:
    """The VLAN's own bridge ``br-v<vid>``: the VM's port is untagged on it."""
    return Attachment(bridge=bridge_name(vid), vlan=None, uplink=spec.trunk_interface)


def bridge_name(vid: int) -> str:
    return f"br-v{vid}"


def _kept_for(bridge: str, vms: list[str]) -> str:
    """The diff line of a bridge kept for its VM ports (not a change: ``!``)."""
    return f"! keep {bridge}: VM ports {', '.join(vms)} still attached"


class LinuxBridgeHost:
    """``HostSession`` for one hypervisor (or lab host namespace)."""

    def __init__(self, spec: HostSpec):
        self.spec = spec
        self.name = spec.name
        self.trunk = spec.trunk_interface
        self.netns = spec.driver_args.get("netns") or None
        self._ipr: IPRoute | None = None

    # --- connection

    def open(self) -> None:
        self._ipr = open_iproute(self.name, self.netns)

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    # --- reading

    def _links(self) -> dict[str, _Link]:
        links = {}
        for msg in self._call("listing links", self._ipr.get_links):
            info = msg.get("IFLA_LINKINFO")
            kind = (info.get("IFLA_INFO_KIND") if info else None) or ""
            data = info.get("IFLA_INFO_DATA") if info else None
            vlan_id = data.get("IFLA_VLAN_ID") if data is not None and kind == "vlan" else None
            name = msg.get("IFLA_IFNAME")
            links[name] = _Link(
                index=msg["index"],
                name=name,
                kind=kind,
                master=msg.get("IFLA_MASTER"),
                up=bool(msg["flags"] & 1),  # IFF_UP: administratively up (operstate lags behind carrier)
                parent=msg.get("IFLA_LINK"),
                vlan_id=vlan_id,
                alias=msg.get("IFLA_IFALIAS") or "",
                protocol=data.get("IFLA_VLAN_PROTOCOL") if vlan_id is not None else None,
            )
        return links

    def _addresses(self) -> dict[int, set[int]]:
        """The scopes of each link's addresses (one dump for all of them)."""
        scopes: dict[int, set[int]] = {}
        for msg in self._call("listing addresses", self._ipr.get_addr):
            scopes.setdefault(msg["index"], set()).add(msg.get("scope"))
        return scopes

    def _portals(self, link: _Link, links: dict[str, _Link]) -> bool:
        """Whether the portal made ``link``: marked with its alias, or (a bridge made before bridges were
        marked) a ``br-v<vid>`` bridge holding the portal's marked sub-interface of the trunk."""
        if link.alias == ALIAS:
            return True
        m = _BRIDGE_NAME.fullmatch(link.name)
        sub = links.get(self._sub_name(int(m[1]))) if m and link.kind == "bridge" else None
        return sub is not None and sub.alias == ALIAS and sub.master == link.index

    def _hosts_own(self, link: _Link, links: dict[str, _Link], addresses: dict[int, set[int]]) -> bool:
        """Whether ``link`` holds an address of the host's own: any address — but a link-local one on a link the
        portal made (the kernel gave its bridges and sub-interfaces one before they were kept free of IPv6)."""
        scopes = addresses.get(link.index, set())
        if scopes - {_SCOPE_LINK}:
            return True
        return bool(scopes) and not self._portals(link, links)

    def _carried(self, links: dict[str, _Link], addresses: dict[int, set[int]]) -> frozenset[int]:
        """The VLANs of the portal's ``br-v<vid>`` bridges (``_portals``), but for one with an address of the
        host's own: never counted nor removed. A bridge so named that the portal did not make (an operator's
        for infrastructure VMs, their taps gone while they are off) is not the portal's to count or remove."""
        vids = set()
        for name, link in links.items():
            m = _BRIDGE_NAME.fullmatch(name)
            if (
                m
                and link.kind == "bridge"
                and 1 <= int(m[1]) <= 4094
                and self._portals(link, links)
                and not self._hosts_own(link, links, addresses)
            ):
                vids.add(int(m[1]))
        return frozenset(vids)

    def vlans(self) -> frozenset[int]:
        """VLANs with an attachment point (a ``br-v<vid>`` bridge of the portal's) on this host."""
        return self._carried(self._links(), self._addresses())

    def broken(self) -> frozenset[int]:
        """Of ``vlans()``, those whose bridge does not carry the VLAN: the trunk or the bridge down, or the bridge
        without ``<trunk>.<vid>`` (VLAN ``vid`` on the trunk, up, enslaved to it) — a NIC or bond reset takes its
        VLAN interfaces with it, an ``ip link del`` or a bridge set down by hand. The VMs on it are cut off:
        the reconciler counts such a VLAN as missing, and the next converge makes it whole again."""
        links = self._links()
        trunk = links.get(self.trunk)
        broken = set()
        for vid in self._carried(links, self._addresses()):
            br, sub = links.get(bridge_name(vid)), links.get(self._sub_name(vid))
            whole = (
                trunk is not None
                and trunk.up
                and br.up
                and sub is not None
                and (sub.kind, sub.vlan_id, sub.parent, sub.master) == ("vlan", vid, trunk.index, br.index)
                and sub.up
            )
            if not whole:
                broken.add(vid)
        return frozenset(broken)

    def vm_ports(self, vid: int) -> list[str]:
        """Members of ``br-v<vid>`` other than the trunk sub-interface: the VMs plugged in."""
        return self._vm_ports(self._links(), vid)

    def _vm_ports(self, links: dict[str, _Link], vid: int) -> list[str]:
        br = links.get(bridge_name(vid))
        if br is None:
            return []
        sub = self._sub_name(vid)
        return sorted(name for name, link in links.items() if link.master == br.index and name != sub)

    def attachment_point(self, vid: int) -> str:
        return bridge_name(vid)

    # --- changing

    def _sub_name(self, vid: int) -> str:
        return f"{self.trunk}.{vid}"

    def converge(self, desired: Iterable[int]) -> ConvergeResult:
        desired = frozenset(desired)
        bad = sorted(vid for vid in desired if not 1 <= vid <= 4094)
        if bad:
            raise PermanentDeviceError(self.name, f"VLAN ids outside 1-4094: {bad}")
        if desired and len(self._sub_name(max(desired))) > IFNAMSIZ:
            raise PermanentDeviceError(
                self.name, f"trunk name {self.trunk!r} too long for VLAN interfaces ({IFNAMSIZ} characters at most)"
            )
        links, addresses = self._links(), self._addresses()
        before = self._carried(links, addresses)
        trunk = links.get(self.trunk)
        if trunk is None:
            raise PermanentDeviceError(self.name, f"trunk interface {self.trunk} does not exist")
        changes: list[str] = []

        if desired and not trunk.up:
            # The parent must be up before a VLAN sub-interface can go up (else ENETDOWN).
            self._call(f"setting {self.trunk} up", self._ipr.link, "set", index=trunk.index, state="up")
            changes.append(f"~ up {self.trunk}")

        refused: dict[int, str] = {}
        for vid in sorted(desired):
            try:
                changes += self._ensure(vid, links, addresses)
            except PermanentDeviceError as exc:
                # this VLAN only (the host's own network, a clash): the others are converged all the same, and
                # only its cluster's change fails (what it left half made goes with its rollback)
                refused[vid] = exc.message
            links = self._links() if changes or refused else links

        for vid in sorted((before | self._orphan_vids(links, addresses)) - desired):
            changes += self._remove(vid, links, addresses)
            links = self._links()

        after = self._carried(self._links(), self._addresses())
        result = ConvergeResult(
            device=self.name,
            diff="".join(line + "\n" for line in changes),
            changed=any(not line.startswith("!") for line in changes),
            before={self.name: before},
            after={self.name: after},
        )
        if refused:
            raise VlansRefused(self.name, refused, result)
        return result

    def _orphan_vids(self, links: dict[str, _Link], addresses: dict[int, set[int]]) -> set[int]:
        """VLAN sub-interfaces of the trunk the portal made whose bridge is gone (a crashed half-removal); never
        one it did not make, nor one with an address (the hypervisor's own), nor one whose bridge holds one."""
        trunk = links[self.trunk]

        def bridge_is_hosts(vid: int) -> bool:
            bridge = links.get(bridge_name(vid))
            return bridge is not None and bridge.kind == "bridge" and self._hosts_own(bridge, links, addresses)

        return {
            link.vlan_id
            for name, link in links.items()
            if link.kind == "vlan"
            and link.parent == trunk.index
            and name == self._sub_name(link.vlan_id)
            and link.alias == ALIAS
            and not self._hosts_own(link, links, addresses)
            and not bridge_is_hosts(link.vlan_id)
        }

    def _ensure(self, vid: int, links: dict[str, _Link], addresses: dict[int, set[int]]) -> list[str]:
        changes = []
        br_name, sub_name = bridge_name(vid), self._sub_name(vid)
        br = links.get(br_name)
        if br is not None and br.kind != "bridge":
            raise PermanentDeviceError(self.name, f"{br_name} exists but is a {br.kind or 'plain'} link, not a bridge")
        if br is not None and self._hosts_own(br, links, addresses):
            raise PermanentDeviceError(
                self.name, f"{br_name} has addresses of the host's own: VLAN {vid} is the host's, not a cluster's"
            )
        if br is not None and not self._portals(br, links):
            # made by hand, or by a run that crashed before it marked it: adopted — unless something the portal
            # did not attach is on it (an operator's bridge for its own VMs: the cluster would join them)
            others = sorted(n for n, link in links.items() if link.master == br.index and n != self._sub_name(vid))
            if others:
                raise PermanentDeviceError(
                    self.name,
                    f"{br_name} is not the portal's and has ports {', '.join(others)}: VLAN {vid} is the host's, "
                    "not a cluster's",
                )
        own = links.get(sub_name)
        trunk = links[self.trunk]
        if own is not None and (br is None or own.master != br.index):
            if self._hosts_own(own, links, addresses):
                # the hypervisor's own VLAN interface (management, storage): a cluster never gets it (checked
                # before anything is made: no bridge is left behind)
                raise PermanentDeviceError(
                    self.name, f"{sub_name} has addresses of the host's own: VLAN {vid} is the host's, not a cluster's"
                )
            if own.alias != ALIAS and own.master is not None:
                # in another bridge (or bond) of the host's: its address, if any, is up there (a storage bridge)
                holder = next((link.name for link in links.values() if link.index == own.master), own.master)
                raise PermanentDeviceError(
                    self.name, f"{sub_name} is in {holder}, not the portal's: VLAN {vid} is the host's, not a cluster's"
                )
        clash = sorted(
            (
                link
                for link in links.values()
                if link.kind == "vlan"
                and link.parent == trunk.index
                and link.vlan_id == vid
                and link.name != sub_name
                and link.protocol != _ETH_P_8021AD  # (an 802.1ad interface of that id may sit beside an 802.1Q one)
            ),
            key=lambda link: link.name,
        )
        if clash:
            # the kernel takes one 802.1Q interface per id and trunk: another name for it is the host's own — or
            # one the portal made before the trunk was renamed, which it does not remove under another name
            theirs = [link.name for link in clash if link.alias != ALIAS]
            raise PermanentDeviceError(
                self.name,
                f"VLAN {vid} is on {self.trunk} already as {', '.join(theirs)}: the host's, not a cluster's"
                if theirs
                else f"VLAN {vid} is on {self.trunk} already as {clash[0].name}, made by the portal under another "
                f"name: delete it (ip link del {clash[0].name}) and converge again",
            )
        if br is None:
            self._create(f"creating bridge {br_name}", ifname=br_name, kind="bridge")
            changes.append(f"+ bridge {br_name}")
        br_index = self._index(br_name)
        if br is None or br.alias != ALIAS:  # made now, or adopted (a crashed run's, made by hand): the portal's
            # IPv6 off first: a run cut between the two does both again (the mark says it is done)
            self._no_ipv6(br_name, br_index)
            self._call(f"marking {br_name}", self._ipr.link, "set", index=br_index, ifalias=ALIAS)
        if br is None or not br.up:
            self._call(f"setting {br_name} up", self._ipr.link, "set", index=br_index, state="up")
            if br is not None:
                changes.append(f"~ up {br_name}")

        sub = links.get(sub_name)
        if sub is not None and (sub.kind != "vlan" or sub.vlan_id != vid or sub.parent != trunk.index):
            raise PermanentDeviceError(
                self.name, f"{sub_name} exists but is not VLAN {vid} on {self.trunk} (kind {sub.kind or 'plain'})"
            )
        if sub is None:
            self._create(f"creating {sub_name}", ifname=sub_name, kind="vlan", link=trunk.index, vlan_id=vid)
        if sub is None or sub.alias != ALIAS:
            sub_index = self._index(sub_name)
            self._no_ipv6(sub_name, sub_index)
            self._call(f"marking {sub_name}", self._ipr.link, "set", index=sub_index, ifalias=ALIAS)
        if sub is None or sub.master != br_index or not sub.up:
            self._call(
                f"enslaving {sub_name} to {br_name}",
                self._ipr.link,
                "set",
                index=self._index(sub_name),
                master=br_index,
                state="up",
            )
            changes.append(f"{'+' if sub is None else '~'} vlan {sub_name} master {br_name}")
        return changes

    def _remove(self, vid: int, links: dict[str, _Link], addresses: dict[int, set[int]]) -> list[str]:
        br_name, sub_name = bridge_name(vid), self._sub_name(vid)
        vms = self._vm_ports(links, vid)
        if vms:
            return [_kept_for(br_name, vms)]
        bridge = links.get(br_name)
        if bridge is not None and bridge.kind == "bridge" and self._hosts_own(bridge, links, addresses):
            # an address of the host's own was put on it since: the host's network now, never removed (nor its
            # sub-interface, which feeds it)
            return [f"! keep {br_name}: it holds an address of the host's own"]
        changes = []
        sub, trunk = links.get(sub_name), links.get(self.trunk)
        if sub is not None and sub.alias == ALIAS and sub.kind == "vlan" and trunk and sub.parent == trunk.index:
            self._delete(f"deleting {sub_name}", sub.index)  # (only the portal's: never a VLAN interface of the host's)
            changes.append(f"- vlan {sub_name}")
        if br_name in links and links[br_name].kind == "bridge" and self._portals(links[br_name], links):
            # read again: a VM the VM manager plugged since the check above keeps the bridge (it was cut loose
            # with the bridge, the change reported done); its cluster's teardown waits for it as for any VM
            links = self._links()
            vms = self._vm_ports(links, vid)
            if vms:
                return [*changes, _kept_for(br_name, vms)]
            if br_name in links:  # (gone meanwhile: nothing left to delete)
                self._delete(f"deleting bridge {br_name}", links[br_name].index)
                changes.append(f"- bridge {br_name}")
        return changes

    def _no_ipv6(self, name: str, index: int) -> None:
        """No IPv6 of the host's own on a tenant's link: no address generated (netlink), and in the host's own
        namespace IPv6 off (sysctl: no router advertisement from a VM obeyed). A kernel without IPv6: nothing
        to do."""
        try:
            self._ipr.link("set", index=index, IFLA_AF_SPEC={"attrs": [["AF_INET6", {"attrs": [[_ADDR_GEN, 1]]}]]})
        except NetlinkError as exc:
            if exc.code not in (errno.EAFNOSUPPORT, errno.EOPNOTSUPP):
                raise self._classify(f"turning IPv6 off on {name}", exc) from exc
        if self.netns is None:
            try:
                with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
                    f.write("1\n")
            except FileNotFoundError:
                pass  # no IPv6 in this kernel
            except OSError as exc:  # the address is off already (above); say what is left undone
                logger.warning("%s: IPv6 left on for %s (router advertisements): %s", self.name, name, exc)

    # --- netlink with classified errors

    def _index(self, name: str) -> int:
        found = self._call(f"looking up {name}", self._ipr.link_lookup, ifname=name)
        if not found:
            raise TemporaryDeviceError(self.name, f"{name} vanished while being configured")
        return found[0]

    def _create(self, what: str, **kwargs) -> None:
        try:
            self._ipr.link("add", **kwargs)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # made by a concurrent run: idempotent, fine
                raise self._classify(what, exc) from exc

    def _delete(self, what: str, index: int) -> None:
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:  # already gone
                raise self._classify(what, exc) from exc

    def _call(self, what: str, fn, *args, **kwargs):
        if self._ipr is None:
            raise TemporaryDeviceError(self.name, "session is not open")
        try:
            return fn(*args, **kwargs)
        except NetlinkError as exc:
            raise self._classify(what, exc) from exc

    def _classify(self, what: str, exc: NetlinkError):
        cls = TemporaryDeviceError if exc.code in TEMPORARY_ERRNOS else PermanentDeviceError
        return cls(self.name, f"{what}: {exc.args[1] if len(exc.args) > 1 else exc} (errno {exc.code})")


@contextlib.contextmanager
def open_host(spec: HostSpec) -> Iterator[LinuxBridgeHost]:
    """Open the host of ``spec``; closed whatever happens."""
    session = LinuxBridgeHost(spec)
    session.open()
    try:
        yield session
    finally:
        session.close()
