"""Hypervisor hosts whose network stack is Open vSwitch (XCP-ng/XenServer, or KVM with OVS).

The host is one OVS bridge; its uplink port (``trunk_interface``) is an 802.1Q trunk toward the site switch
and carries exactly the host's cluster VLANs; a VM is an access port ``tag=<vid>`` on the same bridge. So
"the host carries VLAN v" means "v is in the uplink's trunk list", and the attachment point of VLAN v is the
pair (bridge, tag v).

``converge(desired)`` reads the bridge once, writes the uplink's list in one OVSDB transaction when it
differs, verifying from the row that transaction committed (one OVSDB transaction when nothing changes,
two when it does). A VLAN that is no longer desired but still has a VM port is kept and reported in the diff
(``keep 300: in use by vm-a``) — the VM manager must detach the VM first. Idempotent: converging to the
current state changes nothing. Untagged frames the uplink lets in (VLAN 0 in its list, or a trunk of every
VLAN before the first converge) keep coming in: the host's own network (XCP-ng's management on the same
bridge) is not the portal's. Nor is the VLAN of a tagged internal port (XCP-ng's VLAN networks, the host's own
stack): it stays on the uplink, is never counted as a cluster's VLAN (no drift) and never given to one.

Driver args: ``db`` (OVSDB address, default ``unix:/var/run/openvswitch/db.sock``), ``bridge`` (default: the
bridge that holds the uplink), ``uplink`` (the uplink's OVS port name when it differs from the inventory's
``trunk_interface``; the lab uses this), and the transport keys of ``network.drivers.ovsdb.Ovsdb``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from network.drivers.base import Attachment, ConvergeResult, HostSpec, PermanentDeviceError, VlansRefused
from network.drivers.ovsdb import NATIVE_MODES, NO_VLANS, Ovsdb, as_set, trunks_value
from network.drivers.ranges import compact

DEFAULT_DB = "unix:/var/run/openvswitch/db.sock"
UNTAGGED = 0  # in an OVS trunk list: untagged frames (the host's own network), never a cluster's VLAN


class OvsHostSession:
    """A ``HostSession`` for one OVS hypervisor bridge."""

    def __init__(self, spec: HostSpec):
        args = dict(spec.driver_args)
        self.spec = spec
        self.ovsdb = Ovsdb.from_args(spec.name, str(args.get("db", DEFAULT_DB)), args, timeout=spec.timeout)
        self.uplink = str(args.get("uplink") or spec.trunk_interface)
        self.bridge = str(args.get("bridge", ""))
        if not self.bridge:
            try:
                self.bridge = self.ovsdb.run(["port-to-br", self.uplink], wait=False).strip()
            except PermanentDeviceError:
                raise PermanentDeviceError(spec.name, f"no OVS port {self.uplink} (the host's uplink)") from None

    # --- reading ----------------------------------------------------------------------------------------------

    def _state(self) -> tuple[dict, dict[int, list[str]], dict[int, list[str]]]:
        """(the uplink's Port row, {vid: [VM ports with that tag]}, {vid: [the host's own tagged internal ports,
        e.g. XCP-ng's VLAN networks on the same bridge]})."""
        # the uplink and the tagged ports, with whether each is internal, in one OVSDB transaction
        ports = self.ovsdb.bridge_ports(
            self.bridge, ("vlan_mode", "tag", "trunks"), named=[self.uplink], tagged=True, internal=True
        )
        if ports is None:
            raise PermanentDeviceError(self.spec.name, f"no OVS bridge {self.bridge}")
        uplink = None
        in_use: dict[int, list[str]] = {}
        own: dict[int, list[str]] = {}
        for row in ports:
            if row["name"] == self.bridge:
                continue
            if row["name"] == self.uplink:
                uplink = row
                continue
            tag = as_set(row["tag"])
            if tag:
                (own if row.get("internal") else in_use).setdefault(int(tag[0]), []).append(row["name"])
        if uplink is None:
            raise PermanentDeviceError(self.spec.name, f"bridge {self.bridge} has no uplink port {self.uplink}")
        return uplink, in_use, own

    @staticmethod
    def _native(uplink: dict) -> int | None:
        """The native VLAN of a ``native-untagged``/``native-tagged`` uplink: the host's own (its untagged
        network: a KVM host's management on an internal port of that tag), carried beside the trunk list."""
        mode, tag = as_set(uplink["vlan_mode"]), as_set(uplink["tag"])
        return int(tag[0]) if mode and mode[0] in NATIVE_MODES and tag else None

    @classmethod
    def _carried(cls, uplink: dict) -> frozenset[int] | None:
        """VLANs the uplink trunks (a native uplink: its list, without its native VLAN); None when it is not a
        trunk with an explicit list."""
        mode = as_set(uplink["vlan_mode"])
        trunks = {int(v) for v in as_set(uplink["trunks"])}
        native = cls._native(uplink)
        if native is not None:
            return frozenset(trunks - {NO_VLANS, UNTAGGED, native}) if trunks else None
        if as_set(uplink["tag"]) or (mode and mode[0] != "trunk") or not trunks:
            return None
        return frozenset(trunks - {NO_VLANS, UNTAGGED})

    @staticmethod
    def _access(uplink: dict) -> int | None:
        """The VLAN of an access uplink (a tag, mode ``access`` or none): the host's own, untagged on the wire."""
        mode, tag = as_set(uplink["vlan_mode"]), as_set(uplink["tag"])
        return int(tag[0]) if tag and (not mode or mode[0] == "access") else None

    @staticmethod
    def _passes_untagged(uplink: dict) -> bool:
        """Whether the uplink lets untagged frames in now (VLAN 0 listed, or a trunk of every VLAN): the
        host's own untagged network (XCP-ng's management on the same bridge) — kept, never the portal's."""
        mode = as_set(uplink["vlan_mode"])
        trunks = {int(v) for v in as_set(uplink["trunks"])}
        if as_set(uplink["tag"]):
            return False
        if mode and mode[0] != "trunk":  # access or native with no tag: VLAN 0, the untagged frames
            return True
        return UNTAGGED in trunks or not trunks

    def vlans(self) -> frozenset[int]:
        """The cluster VLANs the uplink trunks (the host's own, of its internal ports, are not the portal's)."""
        uplink, _vms, own = self._state()
        return (self._carried(uplink) or frozenset()) - frozenset(own)

    def own_vlans(self) -> tuple[frozenset[int], frozenset[int]]:
        """(the VLANs of the host's own tagged internal ports, those of them the uplink lets through). An uplink
        the portal gave an explicit list carries the host's own VLANs beside the clusters' (``converge`` keeps
        them); one made since — an XCP-ng VLAN network created after the first converge — is cut off until the
        next converge of the host: the reconciler counts it as missing on the host's own network and repairs it."""
        uplink, _vms, own = self._state()
        carried = self._carried(uplink)
        wanted = frozenset(own) - {self._native(uplink), self._access(uplink)}
        return wanted, wanted if carried is None else wanted & carried

    def vm_ports(self) -> dict[int, list[str]]:
        """VM ports on the bridge by VLAN (what the VM manager attached)."""
        return self._state()[1]

    # --- changing ---------------------------------------------------------------------------------------------

    def converge(self, desired: frozenset[int]) -> ConvergeResult:
        desired = frozenset(int(v) for v in desired)
        bad = sorted(v for v in desired if not 1 <= v <= 4094)
        if bad:
            raise PermanentDeviceError(self.spec.name, f"VLAN ids {bad} are outside 1-4094")
        uplink, in_use, own = self._state()
        native, access = self._native(uplink), self._access(uplink)
        # the host's own VLANs are refused (each with why), the others converged all the same: only the changes
        # of the refused VLANs' clusters fail
        refused = {
            vid: f"VLAN {vid} is the host's own (internal port {', '.join(own[vid])}), not a cluster's"
            for vid in desired
            if vid in own
        }
        if native is not None and native in desired:
            refused[native] = f"VLAN {native} is the host's own (the native VLAN of uplink {self.uplink})"
        if access is not None and access in desired:
            refused[access] = f"VLAN {access} is the host's own (uplink {self.uplink} is an access port of it)"
        result = self._converge(desired - frozenset(refused), uplink, in_use, own, native, access)
        if refused:
            raise VlansRefused(self.spec.name, refused, result)
        return result

    def _converge(self, desired, uplink, in_use, own, native, access) -> ConvergeResult:
        carried = self._carried(uplink)
        before = carried if carried is not None else frozenset()
        # a VM's VLAN the uplink carries stays until its last VM port goes; one it never carried (an interface
        # someone else tagged) is not the portal's to add
        kept = {
            vid: names for vid, names in in_use.items() if vid not in desired and (carried is None or vid in before)
        }
        # the host's own VLANs stay on the uplink (its network), unreported: they are not the portal's; a native
        # uplink keeps its mode and native VLAN (its untagged network), beside the list
        target = (desired | frozenset(kept) | frozenset(own)) - {native, access}
        lines = []
        if carried is None and native is not None:
            lines.append(f"uplink {self.uplink}: list its VLANs (it trunked every VLAN)")
        elif carried is None and access is not None:
            lines.append(f"uplink {self.uplink}: trunk beside its untagged VLAN {access} (native-untagged)")
        elif carried is None:
            lines.append(f"uplink {self.uplink}: make it a trunk (was not a plain trunk)")
        if target - before:
            lines.append(f"add {compact(target - before)}")
        if before - target:
            lines.append(f"remove {compact(before - target)}")
        for vid, names in sorted(kept.items()):
            lines.append(f"keep {vid}: in use by {', '.join(sorted(names))}")
        changed = carried is None or target != before
        untagged = {UNTAGGED} if self._passes_untagged(uplink) else set()
        if changed:
            if native is not None:  # (its mode and native VLAN as they are)
                commands = [["set", "Port", self.uplink, f"trunks={trunks_value(target)}"]]
            elif access is not None:
                # an access uplink (the host's management untagged on the wire, an internal port of its tag):
                # its VLAN stays untagged as the native one, the clusters' VLANs tagged beside it — a plain trunk
                # without its tag dropped the untagged frames, and the host went off the network
                commands = [["set", "Port", self.uplink, "vlan_mode=native-untagged", f"trunks={trunks_value(target)}"]]
            else:
                trunks = trunks_value(target | untagged)
                commands = [["set", "Port", self.uplink, "vlan_mode=trunk", f"trunks={trunks}"]]
                if as_set(uplink["tag"]):
                    commands.append(["clear", "Port", self.uplink, "tag"])
            # verify from the transaction's own result: the uplink row as OVSDB committed it (a transaction is
            # atomic, so this is what the device holds; with ``wait`` also what ovs-vswitchd applied)
            commands.append(["--columns=vlan_mode,tag,trunks", "list", "Port", self.uplink])
            (committed,) = self.ovsdb.run_rows(*commands)
            after = self._carried(committed[0]) or frozenset()
        else:
            after = before  # nothing written: the state just read is the verified state
        if after != target:
            raise PermanentDeviceError(
                self.spec.name,
                f"verification failed: uplink {self.uplink} carries {compact(after) or 'none'}, "
                f"wanted {compact(target) or 'none'}",
            )
        diff = "\n".join(lines) if changed or kept else ""
        theirs = frozenset(own)
        return ConvergeResult(
            self.spec.name, diff, changed, {self.spec.name: before - theirs}, {self.spec.name: after - theirs}
        )

    def attachment_point(self, vid: int) -> str:
        """``<bridge>:<vid>``: plug the VM into that bridge as an access port with tag ``vid``."""
        return "{}:{}".format(*self.attachment(vid))

    def attachment(self, vid: int) -> tuple[str, int]:
        if int(vid) not in self.vlans():
            raise PermanentDeviceError(self.spec.name, f"VLAN {vid} is not carried by this host (converge first)")
        return self.bridge, int(vid)

    def plug(self, port: str, vid: int) -> None:
        """Attach an existing interface (a VM's tap/veth) as an access port of VLAN ``vid``; idempotent."""
        bridge, vid = self.attachment(vid)
        self.ovsdb.run(
            ["--may-exist", "add-port", bridge, port], ["set", "Port", port, "vlan_mode=access", f"tag={vid}"]
        )

    def unplug(self, port: str) -> None:
        """Remove a VM port; a port that is already gone is success."""
        self.ovsdb.run(["--if-exists", "del-port", self.bridge, port])


def attachment(spec: HostSpec, vid: int) -> Attachment:
    """An access port with tag ``vid`` on the host's OVS bridge (``driver_args.bridge``; otherwise the bridge
    that holds the uplink, which only the host knows)."""
    args = dict(spec.driver_args)
    uplink = str(args.get("uplink") or spec.trunk_interface)
    return Attachment(bridge=str(args.get("bridge") or "") or None, vlan=vid, virtualport="openvswitch", uplink=uplink)


@contextlib.contextmanager
def open_host(spec: HostSpec) -> Iterator[OvsHostSession]:
    session = OvsHostSession(spec)
    session.ovsdb.keep_open()
    try:
        yield session
    finally:
        session.ovsdb.close()
