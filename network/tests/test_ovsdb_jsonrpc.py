"""The OVSDB JSON-RPC fast path (``network.drivers.ovsdb``) against the lab's real ovsdb-server/ovs-vswitchd:
it reads and writes exactly what ``ovs-vsctl`` would, in one transaction, honours ``--wait``, starts no
process, and classifies errors the same way."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from network.drivers import PermanentDeviceError, TemporaryDeviceError
from network.drivers.ovs import OvsDriver
from network.drivers.ovsdb import _IDLE, Ovsdb

pytestmark = pytest.mark.lab

COLUMNS = ("_uuid", "name", "vlan_mode", "tag", "trunks", "external_ids")


def both(lab) -> tuple[Ovsdb, Ovsdb]:
    return Ovsdb(device="fast", db=lab.db), Ovsdb(device="vsctl", db=lab.db, jsonrpc=False)


@pytest.fixture
def no_processes():
    """Fail the test if anything starts ovs-vsctl (the fast path must not). Patched by hand, not with
    ``monkeypatch``, so that it is undone before the ``ovs_bridge`` teardown (which runs ovs-vsctl)."""
    real = subprocess.run

    def guard(argv, *args, **kwargs):
        if argv and argv[0] == "ovs-vsctl":
            raise AssertionError(f"ovs-vsctl started: {argv}")
        return real(argv, *args, **kwargs)

    subprocess.run = guard
    try:
        yield
    finally:
        subprocess.run = real


def test_reads_match_ovs_vsctl(lab, ovs_bridge):
    fast, vsctl = both(lab)
    names = sorted(ovs_bridge["port_map"].values())
    lists = (
        ("Bridge", ("name", "ports", "external_ids"), ("--if-exists", ovs_bridge["bridge"])),
        ("Port", COLUMNS, ("--if-exists", *names, "nosuch")),
        ("Open_vSwitch", ("ovs_version", "external_ids"), ()),
    )
    assert fast.query(*lists) == vsctl.query(*lists)


def test_run_rows_gives_a_write_and_its_reads_parsed_as_from_ovs_vsctl(lab, ovs_bridge):
    """``run_rows``: one transaction that writes and lists; the listed rows as ``parse_tables`` reads them from
    ``ovs-vsctl --format=json`` (the fast path builds them without printing and parsing JSON)."""
    fast, vsctl = both(lab)
    port = ovs_bridge["port_map"]["Ethernet1"]
    lists = ["--columns=name,vlan_mode,tag,trunks", "list", "Port", port]
    got = fast.run_rows(["set", "Port", port, "vlan_mode=trunk", "trunks=5,6"], lists)
    assert got == vsctl.run_rows(["set", "Port", port, "vlan_mode=trunk", "trunks=5,6"], lists)
    assert got == [[{"name": port, "vlan_mode": "trunk", "tag": [], "trunks": [5, 6]}]]


def test_bridge_ports_reads_only_the_bridge_and_matches_ovs_vsctl(lab, ovs_bridge):
    fast, vsctl = both(lab)
    columns = ("vlan_mode", "tag", "trunks")
    rows = fast.bridge_ports(ovs_bridge["bridge"], columns)
    key = lambda row: row["name"]  # noqa: E731
    assert sorted(rows, key=key) == sorted(vsctl.bridge_ports(ovs_bridge["bridge"], columns), key=key)
    assert {r["name"] for r in rows} == {ovs_bridge["bridge"], *ovs_bridge["port_map"].values()}
    assert fast.bridge_ports("no-such-bridge", columns) is None is vsctl.bridge_ports("no-such-bridge", columns)


def test_bridge_ports_restricted_to_named_and_tagged_ports_in_one_transaction(lab, ovs_bridge):
    """What a host session reads: its uplink and the VM ports (those with a tag), of this bridge only — an
    untagged port and a tagged port of another bridge are left out; the same rows on both paths, and ONE
    transaction on the JSON-RPC path."""
    fast, vsctl = both(lab)
    names = ovs_bridge["port_map"]
    uplink, plain, vm = names["Ethernet1"], names["Ethernet2"], names["mgmt"]  # mgmt has tag 7
    others = [p["name"] for p in fast.list_rows("Port", ("name",)) if p["name"] not in names.values()]
    elsewhere = next(name for name in others if name != ovs_bridge["bridge"])
    fast.run(["set", "Port", elsewhere, "tag=78"])
    columns = ("vlan_mode", "tag", "trunks")
    transactions = []
    real = fast._transact
    object.__setattr__(fast, "_transact", lambda ops, deadline: transactions.append(ops) or real(ops, deadline))

    rows = fast.bridge_ports(ovs_bridge["bridge"], columns, named=[uplink], tagged=True)
    assert len(transactions) == 1  # the bridge and both selections together
    assert sorted(r["name"] for r in rows) == sorted([uplink, vm]) and plain not in {r["name"] for r in rows}
    assert next(r for r in rows if r["name"] == vm)["tag"] == 7
    key = lambda row: row["name"]  # noqa: E731
    expected = vsctl.bridge_ports(ovs_bridge["bridge"], columns, named=[uplink], tagged=True)
    assert sorted(rows, key=key) == sorted(expected, key=key)
    assert fast.bridge_ports("no-such-bridge", columns, named=[uplink], tagged=True) is None

    # ``internal``: whether each port's interface is internal (the host's own stack; this bridge's ports all
    # are), still ONE transaction; the ports of another bridge's internal interfaces are not listed
    transactions.clear()
    rows = fast.bridge_ports(ovs_bridge["bridge"], columns, named=[uplink], tagged=True, internal=True)
    assert len(transactions) == 1
    assert {r["name"]: r["internal"] for r in rows} == {uplink: True, vm: True}
    expected = vsctl.bridge_ports(ovs_bridge["bridge"], columns, named=[uplink], tagged=True, internal=True)
    assert sorted(rows, key=key) == sorted(expected, key=key)
    every = fast.bridge_ports(ovs_bridge["bridge"], columns, internal=True)
    assert sorted(every, key=key) == sorted(vsctl.bridge_ports(ovs_bridge["bridge"], columns, internal=True), key=key)
    assert next(r for r in every if r["name"] == ovs_bridge["bridge"])["internal"]  # the bridge's local port


def test_writes_match_ovs_vsctl_and_wait_for_vswitchd(lab, ovs_bridge, no_processes):
    fast = Ovsdb(device="fast", db=lab.db)
    a, b = ovs_bridge["port_map"]["Ethernet1"], ovs_bridge["port_map"]["Ethernet2"]
    text = json.dumps({"ports": {a: [1, 2]}, "note": 'quotes " and, commas\nnewline'})
    fast.run(
        ["set", "Port", a, "vlan_mode=access", "tag=42"],
        ["set", "Port", b, "vlan_mode=trunk", "trunks=100,200"],
        ["clear", "Port", b, "tag"],
        ["set", "Bridge", ovs_bridge["bridge"], f"external_ids:virtcloud-rollback={json.dumps(text)}"],
    )
    # --wait: ovs-vswitchd has applied it when run() returns
    (root,) = fast.list_rows("Open_vSwitch", ("cur_cfg", "next_cfg"))
    assert root["cur_cfg"] >= root["next_cfg"]
    rows = {r["name"]: r for r in fast.list_rows("Port", COLUMNS, a, b)}
    assert (rows[a]["vlan_mode"], rows[a]["tag"]) == ("access", 42)
    assert (rows[b]["vlan_mode"], rows[b]["trunks"], rows[b]["tag"]) == ("trunk", [100, 200], [])
    # an existing key is overwritten (OVSDB's map "insert" alone would keep the old value), then removed
    fast.run(["set", "Bridge", ovs_bridge["bridge"], "external_ids:virtcloud-rollback=second"])
    (bridge,) = fast.list_rows("Bridge", ("external_ids",), ovs_bridge["bridge"])
    assert bridge["external_ids"]["virtcloud-rollback"] == "second"
    fast.run(["remove", "Bridge", ovs_bridge["bridge"], "external_ids", "virtcloud-rollback"])
    (bridge,) = fast.list_rows("Bridge", ("external_ids",), ovs_bridge["bridge"])
    assert "virtcloud-rollback" not in bridge["external_ids"]


def test_same_stored_value_as_ovs_vsctl(lab, ovs_bridge):
    fast, vsctl = both(lab)
    a, b = ovs_bridge["port_map"]["Ethernet1"], ovs_bridge["port_map"]["Ethernet2"]
    text = 'multi\nline, "quoted" {json}'
    fast.run(["set", "Port", a, "external_ids:k=" + json.dumps(text)])
    vsctl.run(["set", "Port", b, "external_ids:k=" + json.dumps(text)])
    rows = {r["name"]: r["external_ids"]["k"] for r in vsctl.list_rows("Port", ("name", "external_ids"), a, b)}
    assert rows == {a: text, b: text}


def test_missing_port_fails_the_whole_transaction(lab, ovs_bridge, no_processes):
    fast = Ovsdb(device="sw-fast", db=lab.db)
    a = ovs_bridge["port_map"]["Ethernet1"]
    with pytest.raises(PermanentDeviceError, match='sw-fast.*no row "ghost" in table Port') as excinfo:
        fast.run(["set", "Port", a, "trunks=300"], ["set", "Port", "ghost", "trunks=300"])
    assert excinfo.value.permanent
    assert fast.list_rows("Port", ("trunks",), a)[0]["trunks"] == 4095  # nothing of it was written
    with pytest.raises(PermanentDeviceError, match='no row "ghost" in table Port'):
        fast.list_rows("Port", ("name",), "ghost")
    assert fast.list_rows("Port", ("name",), "--if-exists", "ghost") == []


def test_verifying_list_in_the_transaction_sees_the_write(lab, ovs_bridge, no_processes):
    fast = Ovsdb(device="fast", db=lab.db)
    a = ovs_bridge["port_map"]["Ethernet1"]
    out = fast.run(
        ["set", "Port", a, "vlan_mode=trunk", "trunks=5,6"],
        ["--columns=vlan_mode,tag,trunks", "list", "Port", a],
        json_format=True,
    )
    assert json.loads(out) == {
        "headings": ["vlan_mode", "tag", "trunks"],
        "data": [["trunk", ["set", []], ["set", [5, 6]]]],
    }


def test_run_then_query_reads_back_with_the_wait_in_one_round_trip_less(lab, ovs_bridge, monkeypatch):
    """``run_then_query``: the reads ride in the request that waits for ovs-vswitchd (two transactions, not
    three), see ovs-vswitchd's ``cur_cfg`` already at the write's ``next_cfg``, and give what ``ovs-vsctl``
    run then list gives."""
    fast, vsctl = both(lab)
    a, b = ovs_bridge["port_map"]["Ethernet1"], ovs_bridge["port_map"]["Ethernet2"]
    lists = [("Port", ("name", "vlan_mode", "tag", "trunks"), (a, b)), ("Open_vSwitch", ("cur_cfg", "next_cfg"), ())]
    transacts = []
    real = Ovsdb._transact
    monkeypatch.setattr(
        Ovsdb, "_transact", lambda self, ops, deadline: transacts.append(ops) or real(self, ops, deadline)
    )
    ports, (root,) = fast.run_then_query([["set", "Port", a, "vlan_mode=trunk", "trunks=8,9"]], lists)
    assert len(transacts) == 2 and transacts[1][0]["op"] == "wait"
    assert root["cur_cfg"] >= root["next_cfg"]  # read once ovs-vswitchd had applied the write
    assert {r["name"]: r["trunks"] for r in ports} == {a: [8, 9], b: 4095}
    monkeypatch.undo()
    slow_ports, _root = vsctl.run_then_query([["set", "Port", a, "vlan_mode=trunk", "trunks=8,9"]], lists)
    assert slow_ports == ports


def test_other_commands_still_run_ovs_vsctl(lab, ovs_bridge):
    fast = Ovsdb(device="fast", db=lab.db)
    assert fast.run(["port-to-br", ovs_bridge["port_map"]["mgmt"]], wait=False).strip() == ovs_bridge["bridge"]


def test_switch_converge_starts_no_process(lab, ovs_bridge, no_processes):
    args = {"bridge": ovs_bridge["bridge"], "port_map": ovs_bridge["port_map"], "owned_ports": ["Ethernet1"]}
    device = OvsDriver(ovs_bridge["db"], optional_args=args, timeout=10)
    device.open()
    device.load_merge_candidate(config="port Ethernet1 trunks 100-102")
    assert device.compare_config() == "port Ethernet1 trunks add 100-102"
    device.commit_config()
    assert device.owned_port_vlans() == {"Ethernet1": frozenset({100, 101, 102})}
    device.rollback()
    assert device.owned_port_vlans() == {"Ethernet1": frozenset()}
    assert device.is_alive() == {"is_alive": True}
    device.close()
    assert device.is_alive() == {"is_alive": False}


def test_a_session_keeps_one_connection(lab, ovs_bridge, no_processes, monkeypatch):
    """Between ``open`` and ``close`` a driver's transactions (read, commit, wait, verify, rollback) share one
    OVSDB connection; ``close`` leaves it idle for the next session. A kept connection the server dropped is
    a temporary error once (and closed), then the next transaction connects again."""
    _IDLE.clear()  # no connection left idle by an earlier test
    connects = []
    real = socket.socket.connect

    def counted(sock, address):
        connects.append(address)
        return real(sock, address)

    monkeypatch.setattr(socket.socket, "connect", counted)
    args = {"bridge": ovs_bridge["bridge"], "port_map": ovs_bridge["port_map"], "owned_ports": ["Ethernet1"]}
    device = OvsDriver(ovs_bridge["db"], optional_args=args, timeout=10)
    device.open()
    device.load_merge_candidate(config="port Ethernet1 trunks 7")
    device.commit_config()
    assert device.owned_port_vlans() == {"Ethernet1": frozenset({7})}
    device.rollback()
    assert device.owned_port_vlans() == {"Ethernet1": frozenset()}
    assert len(connects) == 1
    kept = device.ovsdb._kept["sock"]
    kept.shutdown(socket.SHUT_RDWR)  # as if ovsdb-server restarted
    with pytest.raises(TemporaryDeviceError, match="connection"):
        device.ovsdb.list_rows("Bridge", ("name",), ovs_bridge["bridge"])
    assert device.ovsdb.list_rows("Bridge", ("name",), ovs_bridge["bridge"])[0]["name"] == ovs_bridge["bridge"]
    assert len(connects) == 2
    device.close()
    assert "sock" not in device.ovsdb._kept and kept.fileno() == -1


def test_the_next_session_reuses_an_idle_connection_unless_the_server_dropped_it(lab, ovs_bridge, monkeypatch):
    """A driver session's connection outlives it, idle, for the next session to the same database: no connect
    for the second session. One the server closed meanwhile (ovsdb-server restarted), or idle longer than the
    server's inactivity probe allows, is never reused: the session connects again and works."""
    from network.drivers import ovsdb as module

    _IDLE.clear()
    connects = []
    real = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connects.append(address) or real(sock, address))
    args = {"bridge": ovs_bridge["bridge"], "port_map": ovs_bridge["port_map"], "owned_ports": ["Ethernet1"]}

    def session(vids: str) -> frozenset[int]:
        device = OvsDriver(ovs_bridge["db"], optional_args=args, timeout=5)
        device.open()
        try:
            device.load_merge_candidate(config=f"port Ethernet1 trunks {vids}")
            device.commit_config()
            return device.owned_port_vlans()["Ethernet1"]
        finally:
            device.close()

    assert session("7") == {7}
    assert session("8") == {8}
    assert len(connects) == 1  # the second session took the first one's connection
    ((_since, idle),) = [entry for (_pid, _path), stack in _IDLE._idle.items() for entry in stack]

    idle.shutdown(socket.SHUT_RDWR)  # as if ovsdb-server restarted while it was idle
    assert session("9") == {9}
    assert len(connects) == 2 and idle.fileno() == -1  # noticed before use, closed, replaced

    monkeypatch.setattr(module._IDLE, "max_age", 0.0)  # idle too long: the server may be about to drop it
    assert session("10") == {10}
    assert len(connects) == 3
    _IDLE.clear()


def test_unreachable_and_silent_databases_are_temporary(tmp_path):
    gone = Ovsdb(device="sw-gone", db=f"unix:{tmp_path}/db.sock", timeout=1)
    with pytest.raises(TemporaryDeviceError, match="sw-gone.*database connection failed"):
        gone.list_rows("Port", ("name",))
    path = tmp_path / "hung.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        hung = Ovsdb(device="sw-hung", db=f"unix:{path}", timeout=0.5)
        with pytest.raises(TemporaryDeviceError, match="sw-hung.*did not answer within 0.5 s"):
            hung.run(["set", "Port", "p", "trunks=5"])
    finally:
        server.close()
