"""The Open vSwitch switch and host drivers against a real ovsdb-server/ovs-vswitchd (the lab's).

Each NAPALM method does what NAPALM documents; the diff names exactly the VLANs that change; a commit is
one OVSDB transaction; rollback restores the previous state; a port the portal does not own is never
written; an unreachable device and a rejected change raise classified errors."""

from __future__ import annotations

import socket
import subprocess
import threading

import pytest
from napalm.base.exceptions import CommitError, ConnectionException, MergeConfigException

from network.drivers import (
    HostSpec,
    PermanentDeviceError,
    SwitchSpec,
    TemporaryDeviceError,
    VlansRefused,
    host_session,
    switch_session,
)
from network.drivers.ovs import OvsDriver, parse_candidate, render
from network.drivers.ovsdb import Ovsdb

pytestmark = pytest.mark.lab

OWNED = ("Ethernet1", "Ethernet2")


def driver(bridge, **extra) -> OvsDriver:
    args = {"bridge": bridge["bridge"], "port_map": bridge["port_map"], **extra}
    device = OvsDriver(bridge["db"], optional_args=args, timeout=10)
    device.open()
    return device


def spec(bridge, **extra) -> SwitchSpec:
    return SwitchSpec(
        name="sw-test",
        platform="ovs",
        address=bridge["db"],
        driver_args={"bridge": bridge["bridge"], "port_map": bridge["port_map"]},
        owned_ports=OWNED,
        timeout=10,
        **extra,
    )


def raw_port(lab, ovs_name) -> dict:
    """Every column of a Port row as OVSDB stores it (for "never touched" checks)."""
    return lab.ovsdb().list_rows(
        "Port", ["name", "vlan_mode", "tag", "trunks", "other_config", "external_ids"], ovs_name
    )[0]


# --- the candidate language ---------------------------------------------------------------------------------------


def test_render_and_parse_round_trip():
    desired = {"p2": frozenset(), "p1": frozenset({100, 101, 102, 200})}
    text = render(desired)
    assert text == "port p1 trunks 100-102,200\nport p2 trunks none\n"
    assert parse_candidate(text) == desired


@pytest.mark.parametrize(
    "line", ["port p1 trunks 0", "port p1 trunks 4095", "port p1 tag 5", "vlan 5", "port p1 trunks 5-"]
)
def test_parse_rejects_bad_lines(line):
    with pytest.raises(ValueError):
        parse_candidate(line)


# --- NAPALM methods -----------------------------------------------------------------------------------------------


def test_get_facts_lists_the_bridge_ports_by_inventory_name(ovs_bridge):
    facts = driver(ovs_bridge).get_facts()
    assert facts["vendor"] == "Open vSwitch"
    assert facts["interface_list"] == ["Ethernet1", "Ethernet2", "mgmt"]
    assert set(facts) >= {"uptime", "model", "hostname", "fqdn", "os_version", "serial_number"}


def test_get_vlans_napalm_format(ovs_bridge):
    device = driver(ovs_bridge)
    assert device.get_vlans() == {7: {"name": "VLAN0007", "interfaces": ["mgmt"]}}
    device.load_merge_candidate(config="port Ethernet1 trunks 7,100\nport Ethernet2 trunks 100")
    device.commit_config()
    assert device.get_vlans() == {
        7: {"name": "VLAN0007", "interfaces": ["Ethernet1", "mgmt"]},
        100: {"name": "VLAN0100", "interfaces": ["Ethernet1", "Ethernet2"]},
    }


def test_get_config_running_candidate_startup(ovs_bridge):
    device = driver(ovs_bridge)
    config = device.get_config()
    assert "port Ethernet1 trunks none\n" in config["running"]
    assert "port mgmt access 7\n" in config["running"]
    assert config["startup"] == config["running"]  # OVSDB is persistent
    assert config["candidate"] == ""
    device.load_merge_candidate(config="port Ethernet1 trunks 100")
    assert device.get_config(retrieve="candidate") == {
        "running": "",
        "startup": "",
        "candidate": "port Ethernet1 trunks 100\n",
    }


def test_merge_compare_commit_diff_names_exactly_the_vlan_changes(lab, ovs_bridge):
    device = driver(ovs_bridge)
    device.load_merge_candidate(config="port Ethernet1 trunks 100-102")
    device.load_merge_candidate(config="port Ethernet2 trunks 200\n# merged: a later line wins\n")
    assert device.compare_config() == "port Ethernet1 trunks add 100-102\nport Ethernet2 trunks add 200"
    assert raw_port(lab, ovs_bridge["port_map"]["Ethernet1"])["trunks"] == 4095  # nothing applied yet
    device.commit_config()
    assert device.compare_config() == ""  # the candidate is consumed by the commit
    device.load_merge_candidate(config="port Ethernet1 trunks 100,300\nport Ethernet2 trunks 200")
    assert device.compare_config() == "port Ethernet1 trunks add 300 remove 101-102"
    device.commit_config()
    assert raw_port(lab, ovs_bridge["port_map"]["Ethernet1"])["trunks"] == [100, 300]
    assert raw_port(lab, ovs_bridge["port_map"]["Ethernet2"])["trunks"] == 200


def test_discard_config_drops_the_candidate(lab, ovs_bridge):
    device = driver(ovs_bridge)
    device.load_merge_candidate(config="port Ethernet1 trunks 100")
    device.discard_config()
    assert device.compare_config() == ""
    device.commit_config()
    assert raw_port(lab, ovs_bridge["port_map"]["Ethernet1"])["trunks"] == 4095


def test_commit_is_one_ovsdb_transaction(ovs_bridge, monkeypatch):
    calls = []
    real_run = Ovsdb.run

    def spy(self, *commands, **kwargs):
        if any(c and c[0] in ("set", "clear", "add", "remove") for c in commands):
            calls.append(commands)
        return real_run(self, *commands, **kwargs)

    monkeypatch.setattr(Ovsdb, "run", spy)
    device = driver(ovs_bridge)
    device.load_merge_candidate(config="port Ethernet1 trunks 100\nport Ethernet2 trunks 100,200")
    device.commit_config()
    assert len(calls) == 1
    touched = {c[2] for c in calls[0] if c[0] == "set" and c[1] == "Port"}
    assert touched == {ovs_bridge["port_map"]["Ethernet1"], ovs_bridge["port_map"]["Ethernet2"]}


def test_rollback_restores_the_previous_state_exactly(lab, ovs_bridge):
    e1 = ovs_bridge["port_map"]["Ethernet1"]
    lab.ovsdb().run(["set", "Port", e1, "vlan_mode=access", "tag=42"])  # an operator left it an access port
    device = driver(ovs_bridge)
    device.load_merge_candidate(config="port Ethernet1 trunks 100\nport Ethernet2 trunks 5")
    assert device.compare_config() == "port Ethernet1 access 42 -> trunks 100\nport Ethernet2 trunks add 5"
    before = raw_port(lab, e1)
    device.commit_config()
    assert raw_port(lab, e1)["vlan_mode"] == "trunk" and raw_port(lab, e1)["tag"] == []
    device.rollback()
    assert raw_port(lab, e1) == before
    assert raw_port(lab, ovs_bridge["port_map"]["Ethernet2"])["trunks"] == 4095
    with pytest.raises(CommitError) as excinfo:  # the record is consumed: nothing left to roll back
        device.rollback()
    assert isinstance(excinfo.value, PermanentDeviceError)


def test_a_native_trunk_keeps_its_native_vlan_when_the_candidate_holds_it(lab, ovs_bridge):
    """An owned trunk with a native VLAN (``native-untagged``, a hypervisor's untagged management network): the
    candidate that holds the native VLAN (the port's static VLANs) changes only its list; the port stays
    native-untagged with its tag (it was made a plain trunk: the host lost its untagged network). A candidate
    without it makes the port a plain trunk of exactly its list, as before."""
    e1 = ovs_bridge["port_map"]["Ethernet1"]
    lab.ovsdb().run(["set", "Port", e1, "vlan_mode=native-untagged", "tag=10", "trunks=4095"])
    device = driver(ovs_bridge)
    device.load_merge_candidate(config="port Ethernet1 trunks 10,100-101")
    assert device.compare_config() == "port Ethernet1 trunks add 100-101"
    device.commit_config()
    port = raw_port(lab, e1)
    assert (port["vlan_mode"], port["tag"], port["trunks"]) == ("native-untagged", 10, [100, 101])
    assert device.get_vlans()[10]["interfaces"] == ["Ethernet1"]
    device.load_merge_candidate(config="port Ethernet1 trunks 10,100-101")
    assert device.compare_config() == ""  # converged: nothing to commit
    device.load_merge_candidate(config="port Ethernet1 trunks 10")
    assert device.compare_config() == "port Ethernet1 trunks remove 100-101"
    device.commit_config()
    port = raw_port(lab, e1)
    assert (port["vlan_mode"], port["tag"], port["trunks"]) == ("native-untagged", 10, 4095)
    device.load_merge_candidate(config="port Ethernet1 trunks 100")
    assert device.compare_config() == "port Ethernet1 vlan_mode native-untagged tag 10 trunks none -> trunks 100"
    device.commit_config()
    port = raw_port(lab, e1)
    assert (port["vlan_mode"], port["tag"], port["trunks"]) == ("trunk", [], 100)


def test_a_session_converges_and_verifies_a_native_trunk_with_its_static_native_vlan(lab, ovs_bridge):
    """Through the session (get_vlans, verification): the native VLAN in the desired set verifies, and a
    native trunk whose empty list trunks every VLAN is read as carrying every VLAN (not its native one only)."""
    e1, e2 = ovs_bridge["port_map"]["Ethernet1"], ovs_bridge["port_map"]["Ethernet2"]
    lab.ovsdb().run(
        ["set", "Port", e1, "vlan_mode=native-tagged", "tag=20", "trunks=4095"],
        ["set", "Port", e2, "vlan_mode=native-untagged", "tag=30"],
        ["clear", "Port", e2, "trunks"],
    )
    with switch_session(spec(ovs_bridge)) as session:
        assert session.port_vlans()["Ethernet1"] == {20}
        assert session.port_vlans()["Ethernet2"] >= {20, 30}  # every VLAN the switch shows
        desired = {"Ethernet1": frozenset({20, 100}), "Ethernet2": frozenset({30, 100})}
        result = session.converge(desired)
        assert result.changed and result.after == desired
        assert not session.converge(desired).changed
    for ovs_name, mode, tag in ((e1, "native-tagged", 20), (e2, "native-untagged", 30)):
        port = raw_port(lab, ovs_name)
        assert (port["vlan_mode"], port["tag"], port["trunks"]) == (mode, tag, 100)


def test_rollback_works_from_a_new_session(lab, ovs_bridge):
    """The rollback record lives on the device (bridge external_ids), like a NOS's rollback checkpoint."""
    first = driver(ovs_bridge)
    first.load_merge_candidate(config="port Ethernet2 trunks 300")
    first.commit_config()
    first.close()
    driver(ovs_bridge).rollback()
    assert raw_port(lab, ovs_bridge["port_map"]["Ethernet2"])["trunks"] == 4095


def test_unowned_ports_are_never_touched(lab, ovs_bridge):
    mgmt = ovs_bridge["port_map"]["mgmt"]
    before = raw_port(lab, mgmt)
    with switch_session(spec(ovs_bridge)) as session:
        session.converge({"Ethernet1": frozenset({7, 100}), "Ethernet2": frozenset({7})})
        session.converge({"Ethernet1": frozenset(), "Ethernet2": frozenset({200})})
        with pytest.raises(PermanentDeviceError, match="mgmt"):
            session.converge({"mgmt": frozenset({100})})
    device = driver(ovs_bridge, owned_ports=list(OWNED))
    with pytest.raises(MergeConfigException, match="not owned"):
        device.load_merge_candidate(config="port mgmt trunks 100")
    device.load_merge_candidate(config="port Ethernet1 trunks 9")
    device.commit_config()
    device.rollback()
    assert raw_port(lab, mgmt) == before


def test_unknown_port_and_bad_config_are_permanent(ovs_bridge):
    device = driver(ovs_bridge)
    with pytest.raises(MergeConfigException, match="no port Ethernet9") as excinfo:
        device.load_merge_candidate(config="port Ethernet9 trunks 100")
    assert isinstance(excinfo.value, PermanentDeviceError) and excinfo.value.permanent
    with pytest.raises(MergeConfigException, match="line 2"):
        device.load_merge_candidate(config="port Ethernet1 trunks 100\nport Ethernet2 trunks 5000")


def test_a_port_removed_before_commit_is_a_permanent_error(lab, ovs_bridge):
    device = driver(ovs_bridge)
    device.load_merge_candidate(config="port Ethernet1 trunks 100")
    lab.ovsdb().run(["del-port", ovs_bridge["port_map"]["Ethernet1"]])
    with pytest.raises(PermanentDeviceError, match="Ethernet1"):
        device.commit_config()


def test_missing_bridge_is_permanent(lab):
    with pytest.raises(PermanentDeviceError, match="no bridge nosuch"):
        OvsDriver(lab.db, optional_args={"bridge": "nosuch"}).open()


def test_unreachable_database_is_temporary(tmp_path):
    device = OvsDriver(f"unix:{tmp_path}/db.sock", optional_args={"bridge": "br0"}, timeout=2)
    with pytest.raises(ConnectionException) as excinfo:
        device.open()
    assert isinstance(excinfo.value, TemporaryDeviceError) and not excinfo.value.permanent
    with pytest.raises(TemporaryDeviceError, match="sw-x"):
        with switch_session(SwitchSpec("sw-x", "ovs", f"unix:{tmp_path}/db.sock", timeout=2)):
            pass


def test_hung_database_is_temporary(tmp_path):
    """A daemon that accepts the connection but never answers (hung, overloaded): a timeout, retryable."""
    path = tmp_path / "hung.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        with pytest.raises(TemporaryDeviceError, match="sw-hung"):
            with switch_session(SwitchSpec("sw-hung", "ovs", f"unix:{path}", timeout=1)):
                pass
    finally:
        server.close()


def test_ssh_transport_unreachable_is_temporary():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    args = {"transport": "ssh", "ssh_host": "127.0.0.1", "ssh_port": port, "bridge": "br0"}
    with pytest.raises(TemporaryDeviceError, match="ssh to 127.0.0.1"):
        OvsDriver("unix:/var/run/openvswitch/db.sock", optional_args=args, timeout=3).open()


def test_unknown_transport_is_permanent():
    with pytest.raises(PermanentDeviceError, match="telnet"):
        OvsDriver("unix:/x", optional_args={"transport": "telnet"})


# --- the session flow -------------------------------------------------------------------------------------------


def test_session_converge_plan_and_idempotence(lab, ovs_bridge):
    with switch_session(spec(ovs_bridge)) as session:
        assert session.port_vlans() == {"Ethernet1": frozenset(), "Ethernet2": frozenset()}
        desired = {"Ethernet1": frozenset({100, 101}), "Ethernet2": frozenset({101})}
        assert session.render(desired) == "port Ethernet1 trunks 100-101\nport Ethernet2 trunks 101\n"
        assert session.plan(desired) == "port Ethernet1 trunks add 100-101\nport Ethernet2 trunks add 101"
        assert session.port_vlans()["Ethernet1"] == frozenset()  # a plan commits nothing
        result = session.converge(desired)
        assert result.changed and result.diff == "port Ethernet1 trunks add 100-101\nport Ethernet2 trunks add 101"
        assert result.before == {"Ethernet1": frozenset(), "Ethernet2": frozenset()}
        assert result.after == desired
        again = session.converge(desired)
        assert not again.changed and again.diff == ""
        only_one = session.converge({"Ethernet2": frozenset()})
        assert only_one.diff == "port Ethernet2 trunks remove 101"
        assert session.port_vlans() == {"Ethernet1": frozenset({100, 101}), "Ethernet2": frozenset()}


def test_a_port_cleared_to_trunk_every_vlan_reads_as_carrying_every_vlan(lab, ovs_bridge):
    """``ovs-vsctl clear Port p trunks`` makes a trunk carry every VLAN; among the owned ports only it read as
    carrying the VLANs the others carry — exactly the desired set, when they agree — and the reconciler never saw
    it. It reads as carrying every id now, and a converge sets its list again."""
    e1 = ovs_bridge["port_map"]["Ethernet1"]
    with switch_session(spec(ovs_bridge)) as session:
        session.converge({"Ethernet1": frozenset({100}), "Ethernet2": frozenset({100})})
    lab.ovsdb().run(["clear", "Port", e1, "trunks"])
    with switch_session(spec(ovs_bridge)) as session:
        assert session.port_vlans()["Ethernet1"] == frozenset(range(1, 4095))
        assert session.port_vlans()["Ethernet2"] == frozenset({100})
        result = session.converge({"Ethernet1": frozenset({100}), "Ethernet2": frozenset({100})})
        assert result.changed and session.port_vlans()["Ethernet1"] == frozenset({100})


def test_session_rolls_back_when_verification_fails(lab, ovs_bridge, monkeypatch):
    """A device that accepts a commit but does not apply it (here: another writer changes the port right
    after our transaction, before ovs-vswitchd has applied it and we read it back) fails verification; the
    session rolls back and raises a permanent error."""
    e1 = ovs_bridge["port_map"]["Ethernet1"]
    real_wait = Ovsdb._wait_applied
    drifts = [["set", "Port", e1, "trunks=999"]]  # once: the rollback's own wait finds none

    def drift_then_wait(self, *args, **kwargs):
        if self.device != "lab" and drifts:  # our session's wait, not the other writer's own
            lab.ovsdb().run(drifts.pop())
        return real_wait(self, *args, **kwargs)

    with switch_session(spec(ovs_bridge)) as session:
        session.converge({"Ethernet1": frozenset({100})})
        monkeypatch.setattr(Ovsdb, "_wait_applied", drift_then_wait)
        with pytest.raises(PermanentDeviceError, match="verification failed.*Ethernet1 has 999, wanted 100,200"):
            session.converge({"Ethernet1": frozenset({100, 200}), "Ethernet2": frozenset({5})})
        monkeypatch.undo()
        assert session.port_vlans() == {"Ethernet1": frozenset({100}), "Ethernet2": frozenset()}


def test_session_rejects_unowned_ports_and_bad_ids(ovs_bridge):
    with switch_session(spec(ovs_bridge)) as session:
        with pytest.raises(PermanentDeviceError, match="not owned"):
            session.plan({"Ethernet3": frozenset({5})})
        with pytest.raises(PermanentDeviceError, match="outside 1-4094"):
            session.converge({"Ethernet1": frozenset({4095})})


def test_concurrent_sessions_on_different_switches(lab, ovs_bridge):
    """Two switches of one OVSDB converge in parallel without stepping on each other."""
    errors = []

    def work(name, vids):
        try:
            with switch_session(lab.switch_spec(name)) as session:
                session.converge({"p-h1": frozenset(vids)})
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n, {110 + i})) for i, n in enumerate(["sw-s1", "sw-s2", "sw-s3"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        for i, name in enumerate(["sw-s1", "sw-s2", "sw-s3"]):
            with switch_session(lab.switch_spec(name)) as session:
                assert session.port_vlans()["p-h1"] == frozenset({110 + i})
    finally:
        lab.converge({})


# --- host driver --------------------------------------------------------------------------------------------------


def host(lab, name="h-s2-1") -> HostSpec:
    return lab.host_spec(name)


def test_host_converge_adds_removes_and_is_idempotent(clean_lab):
    lab = clean_lab
    with host_session(host(lab)) as session:
        assert session.vlans() == frozenset()
        first = session.converge(frozenset({100, 101}))
        assert first.changed and first.diff == "add 100-101"
        assert session.vlans() == frozenset({100, 101})
        again = session.converge(frozenset({100, 101}))
        assert not again.changed and again.diff == ""
        second = session.converge(frozenset({101, 102}))
        assert second.diff == "add 102\nremove 100"
        assert second.before == {"h-s2-1": frozenset({100, 101})}
        assert second.after == {"h-s2-1": frozenset({101, 102})}
        assert session.attachment_point(101) == f"{lab.state['hosts']['h-s2-1']['bridge']}:101"
        with pytest.raises(PermanentDeviceError, match="VLAN 100 is not carried"):
            session.attachment_point(100)


def test_host_keeps_a_vlan_still_used_by_a_vm(clean_lab):
    lab = clean_lab
    with host_session(host(lab)) as session:
        session.converge(frozenset({100}))
    lab.attach_vm("h-s2-1", 100, "vm-a", "198.18.0.1/24")
    with host_session(host(lab)) as session:
        kept = session.converge(frozenset())
        assert not kept.changed
        assert kept.diff == f"keep 100: in use by {lab.vm('vm-a').port}"
        assert session.vlans() == frozenset({100})
        session.plug(lab.vm("vm-a").port, 100)  # plugging again is success ("already exists")
    lab.detach_vm("vm-a")
    with host_session(host(lab)) as session:
        gone = session.converge(frozenset())
        assert gone.changed and gone.diff == "remove 100"
        session.unplug("no-such-port")  # already gone is success


def test_host_converge_on_the_uplink_only(clean_lab):
    """The host driver writes the uplink and nothing else on the bridge."""
    lab = clean_lab
    with host_session(host(lab)) as session:
        session.converge(frozenset({100}))
    lab.attach_vm("h-s2-1", 100, "vm-b", "198.18.0.2/24")
    port = lab.vm("vm-b").port
    before = raw_port(lab, port)
    with host_session(host(lab)) as session:
        session.converge(frozenset({100, 150}))
    assert raw_port(lab, port) == before


@pytest.mark.parametrize("untagged_before", ["0", "[]"])
def test_a_host_uplink_keeps_letting_untagged_frames_in(clean_lab, untagged_before):
    """The host's own untagged network (XCP-ng's management on the same bridge) keeps working: an uplink that
    lets untagged frames in (VLAN 0 listed, or a trunk of every VLAN) still does after every converge, and
    VLAN 0 is never counted as a cluster's."""
    from network.drivers.ovsdb import Ovsdb

    lab, spec = clean_lab, host(clean_lab)
    args = lab.host_driver_args("h-s2-1")
    db = Ovsdb(device="h-s2-1", db=args["db"])
    db.run(["set", "Port", args["uplink"], "vlan_mode=trunk", f"trunks={untagged_before}"])
    try:
        with host_session(spec) as session:
            session.converge(frozenset({100}))
            assert session.vlans() == frozenset({100})
            assert set(db.list_rows("Port", ["trunks"], args["uplink"])[0]["trunks"]) == {0, 100}
            session.converge(frozenset())
            assert session.vlans() == frozenset()
            assert db.list_rows("Port", ["trunks"], args["uplink"])[0]["trunks"] in (0, [0])
    finally:
        db.run(["set", "Port", args["uplink"], "vlan_mode=trunk", "trunks=4095"])


def test_the_hosts_own_vlan_network_stays_on_its_uplink_and_is_never_a_clusters(clean_lab):
    """XCP-ng's VLAN network on the host's bridge (a tagged internal port: the host's own stack, not a VM): its
    VLAN stays on the uplink whatever the portal converges, is never counted as a cluster's (no foreign drift,
    no repair that fails at every reconcile), and is never given to a cluster."""
    from network.drivers.ovsdb import as_set

    lab, spec = clean_lab, host(clean_lab)
    args = lab.host_driver_args("h-s2-1")
    db = Ovsdb(device="h-s2-1", db=args["db"])
    bridge = lab.state["hosts"]["h-s2-1"]["bridge"]

    def uplink_trunks() -> set[int]:
        return set(as_set(db.list_rows("Port", ["trunks"], args["uplink"])[0]["trunks"]))

    db.run(["add-port", bridge, "mgmt20", "tag=20"], ["set", "Interface", "mgmt20", "type=internal"])
    try:
        with host_session(spec) as session:
            first = session.converge(frozenset({100}))
            assert first.after == {"h-s2-1": frozenset({100})} and session.vlans() == frozenset({100})
            assert uplink_trunks() == {20, 100}
            gone = session.converge(frozenset())
            assert gone.after == {"h-s2-1": frozenset()} and "keep" not in gone.diff
            assert uplink_trunks() == {20} and session.vlans() == frozenset()
            with pytest.raises(PermanentDeviceError, match="VLAN 20 is the host's own .internal port mgmt20."):
                session.converge(frozenset({20}))
            with pytest.raises(PermanentDeviceError, match="VLAN 20 is not carried"):
                session.attachment_point(20)
    finally:
        db.run(["--if-exists", "del-port", bridge, "mgmt20"])
        db.run(["set", "Port", args["uplink"], "vlan_mode=trunk", "trunks=4095"])


@pytest.mark.parametrize("mode", ["native-untagged", "native-tagged"])
@pytest.mark.parametrize("trunks_before", ["4095", "[]", "100"])
def test_a_native_vlan_uplink_keeps_its_mode_and_native_vlan(clean_lab, mode, trunks_before):
    """A KVM host whose uplink has a native VLAN (the switch sends its management VLAN 10 untagged, an internal
    port of tag 10 on the bridge): every converge writes the trunk list only, the uplink keeps its mode and tag
    (it was made a plain trunk with no tag: the host lost its management network), VLAN 10 is never counted as a
    cluster's nor given to one."""
    from network.drivers.ovsdb import as_set

    lab, spec = clean_lab, host(clean_lab)
    args = lab.host_driver_args("h-s2-1")
    db = Ovsdb(device="h-s2-1", db=args["db"])
    bridge = lab.state["hosts"]["h-s2-1"]["bridge"]

    def uplink() -> tuple[str, list[int], set[int]]:
        row = db.list_rows("Port", ["vlan_mode", "tag", "trunks"], args["uplink"])[0]
        return as_set(row["vlan_mode"])[0], as_set(row["tag"]), set(as_set(row["trunks"]))

    db.run(["add-port", bridge, "mgmt10", "tag=10"], ["set", "Interface", "mgmt10", "type=internal"])
    db.run(["set", "Port", args["uplink"], f"vlan_mode={mode}", "tag=10", f"trunks={trunks_before}"])
    try:
        with host_session(spec) as session:
            first = session.converge(frozenset({100, 101}))
            assert first.changed and uplink() == (mode, [10], {100, 101})
            assert first.after == {"h-s2-1": frozenset({100, 101})} and session.vlans() == frozenset({100, 101})
            assert not session.converge(frozenset({100, 101})).changed
            gone = session.converge(frozenset())
            assert gone.after == {"h-s2-1": frozenset()} and uplink() == (mode, [10], {4095})
            with pytest.raises(PermanentDeviceError, match="VLAN 10 is the host's own"):
                session.converge(frozenset({10}))
            assert uplink() == (mode, [10], {4095})
    finally:
        db.run(["--if-exists", "del-port", bridge, "mgmt10"])
        uplink_reset = ["set", "Port", args["uplink"], "vlan_mode=trunk", "trunks=4095"]
        db.run(uplink_reset, ["clear", "Port", args["uplink"], "tag"])


@pytest.mark.parametrize("mode", ["access", None])
def test_an_access_uplink_keeps_its_vlan_untagged_as_the_native_one(clean_lab, mode):
    """A host whose uplink is an access port of VLAN 5 (the switch port untagged, the host's management on an
    internal port of tag 5): the first converge makes it a native-untagged trunk of native VLAN 5, the clusters'
    VLANs tagged beside it. It was made a plain trunk with no tag: untagged frames from the wire were dropped and
    the host went off the network. VLAN 5 is never a cluster's."""
    from network.drivers.ovsdb import as_set

    lab, spec = clean_lab, host(clean_lab)
    args = lab.host_driver_args("h-s2-1")
    db = Ovsdb(device="h-s2-1", db=args["db"])
    bridge = lab.state["hosts"]["h-s2-1"]["bridge"]

    def uplink() -> tuple[list[str], list[int], set[int]]:
        row = db.list_rows("Port", ["vlan_mode", "tag", "trunks"], args["uplink"])[0]
        return as_set(row["vlan_mode"]), as_set(row["tag"]), set(as_set(row["trunks"]))

    db.run(["add-port", bridge, "mgmt5", "tag=5"], ["set", "Interface", "mgmt5", "type=internal"])
    db.run(["clear", "Port", args["uplink"], "trunks"], ["set", "Port", args["uplink"], "tag=5"])
    port = args["uplink"]
    db.run(["set", "Port", port, f"vlan_mode={mode}"] if mode else ["clear", "Port", port, "vlan_mode"])
    try:
        with host_session(spec) as session:
            first = session.converge(frozenset({100}))
            assert "native-untagged" in first.diff
            assert uplink() == (["native-untagged"], [5], {100})
            assert first.after == {"h-s2-1": frozenset({100})} and session.vlans() == frozenset({100})
            assert not session.converge(frozenset({100})).changed
            with pytest.raises(VlansRefused, match="VLAN 5 is the host's own") as refused:
                session.converge(frozenset({5, 100, 200}))
            # that VLAN only: the others are converged all the same
            assert set(refused.value.refused) == {5} and refused.value.result.after == {"h-s2-1": {100, 200}}
            assert uplink() == (["native-untagged"], [5], {100, 200})
            session.converge(frozenset())
            assert uplink()[:2] == (["native-untagged"], [5])
    finally:
        db.run(["--if-exists", "del-port", bridge, "mgmt5"])
        uplink_reset = ["set", "Port", args["uplink"], "vlan_mode=trunk", "trunks=4095"]
        db.run(uplink_reset, ["clear", "Port", args["uplink"], "tag"])


@pytest.mark.parametrize("mode", ["access", "native-untagged"])
def test_an_untagged_uplink_without_a_tag_keeps_passing_untagged_frames(clean_lab, mode):
    """``vlan_mode=access`` (or native) with no tag is VLAN 0 to OVS, the untagged frames (the host's own
    network): made a trunk, its list keeps 0 — it was a trunk of the clusters' VLANs only, and the host went off
    the network."""
    from network.drivers.ovsdb import as_set

    lab, spec = clean_lab, host(clean_lab)
    port = lab.host_driver_args("h-s2-1")["uplink"]
    db = Ovsdb(device="h-s2-1", db=lab.host_driver_args("h-s2-1")["db"])
    db.run(["clear", "Port", port, "trunks"], ["clear", "Port", port, "tag"])
    db.run(["set", "Port", port, f"vlan_mode={mode}"])
    try:
        with host_session(spec) as session:
            session.converge(frozenset({100}))
        row = db.list_rows("Port", ["vlan_mode", "trunks"], port)[0]
        assert as_set(row["vlan_mode"]) == ["trunk"] and set(as_set(row["trunks"])) == {0, 100}
    finally:
        db.run(["set", "Port", port, "vlan_mode=trunk", "trunks=4095"], ["clear", "Port", port, "tag"])


def test_a_vm_tag_the_uplink_never_carried_is_not_added(clean_lab):
    """An interface someone else tagged on the host's bridge (VLAN 50, never the portal's): the portal does not
    add 50 to the uplink (it did, and then reported it kept at every converge, failing each repair of the host);
    a VM's VLAN the uplink carries is still kept until its last port goes."""
    lab, spec = clean_lab, host(clean_lab)
    args = lab.host_driver_args("h-s2-1")
    db = Ovsdb(device="h-s2-1", db=args["db"])
    bridge = lab.state["hosts"]["h-s2-1"]["bridge"]
    db.run(["add-port", bridge, "theirs50", "tag=50"])  # (an ordinary interface, as a VM's tap is)
    try:
        with host_session(spec) as session:
            first = session.converge(frozenset({100}))
            assert first.diff == "add 100" and session.vlans() == frozenset({100})
            again = session.converge(frozenset({100}))
            assert not again.changed and again.diff == ""
    finally:
        db.run(["--if-exists", "del-port", bridge, "theirs50"])
        db.run(["set", "Port", args["uplink"], "vlan_mode=trunk", "trunks=4095"])


def test_host_errors_are_classified(lab, tmp_path):
    missing = HostSpec("h-x", "ovs", "eth0", driver_args={**lab.host_driver_args("h-s1-1"), "uplink": "nope"})
    with pytest.raises(PermanentDeviceError, match="h-x.*no uplink port nope"):
        with host_session(missing) as session:
            session.converge(frozenset({100}))
    gone = HostSpec("h-y", "ovs", "eth0", driver_args={"db": f"unix:{tmp_path}/db.sock", "bridge": "br0"}, timeout=2)
    with pytest.raises(TemporaryDeviceError, match="h-y"):
        with host_session(gone) as session:
            session.vlans()
    no_bridge = HostSpec("h-z", "ovs", "eth0", driver_args={"db": lab.db})
    with pytest.raises(PermanentDeviceError, match="no OVS port eth0"):
        with host_session(no_bridge):
            pass


def test_lab_devices_are_in_their_own_namespace(lab):
    """Nothing of the lab is in the root namespace: its switch ports exist only in the OVS namespace."""
    port = lab.state["switches"]["sw-s1"]["port_map"]["p-h1"]
    assert subprocess.run(["ip", "link", "show", port], capture_output=True).returncode != 0
    assert subprocess.run(["ip", "-n", lab.ovs_ns, "link", "show", port], capture_output=True).returncode == 0
